"""The checks of `vilbert-multitask`'s config file (`multitask.load_config` reads it): each field's type
and bounds, each task's `extra` options against those the task takes, split names that are plain
names, duplicate keys, the batch arithmetic and the paths the run writes under OUT. A mistake is one
`ConfigError` line naming the file and the field, found before any training."""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, fields
from pathlib import Path

from common.names import plain_name
from pipelines.train.distributed import split_batch


class ConfigError(ValueError):
    """A bad multi-task config file: one line, naming the file and the field."""


MAX_BATCH = 2 ** 24  # items a step: beyond it StepBatches' item orders alone would not fit in memory
MAX_SEED = 2 ** 63 - 1  # torch.manual_seed's range


def _number(lo=None, hi=None, integer=False, lo_open=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            return f"expected {'an integer' if integer else 'a number'}, got {v!r}"
        if isinstance(v, float) and not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) \
                or (hi is not None and v > hi):
            what = "an integer" if integer else "a number"
            if lo is None and hi is None:
                bounds = "finite"
            elif hi is None:
                bounds = f"{'>' if lo_open else '>='} {lo}"
            elif lo is None:
                bounds = f"<= {hi}"
            else:
                bounds = f"in {'(' if lo_open else '['}{lo}, {hi}]"
            return f"expected {what} {bounds}, got {v!r}"
    return check


def _of(kind, name):
    def check(v):
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            return f"expected {name}, got {v!r}"
    return check


def _choice(*names):
    return lambda v: None if v in names and isinstance(v, str) else \
        f"expected one of {', '.join(names)}, got {v!r}"


def _path(folder: bool, file: bool = False):
    def check(v):
        if not isinstance(v, str) or not v:
            return f"expected a path, got {v!r}"
        p = Path(v)
        if folder and not p.is_dir():
            return f"folder not found: {v}" if not p.exists() else f"not a folder: {v}"
        if file and not p.is_file():
            return f"file not found: {v}" if not p.exists() else f"not a file: {v}"
        if not p.exists():
            return f"not found: {v}"
    return check


def _split(v):
    if not isinstance(v, str):
        return f"expected a split name, got {v!r}"
    if v and not plain_name(v):  # "" = none
        return f"{v!r} is not a plain split name (it becomes a file name in --out: no '/', '..' or leading '.')"


def _splits(v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return f"expected a list of split names, got {v!r}"
    bad = [x for x in v if not plain_name(x)]
    if bad:
        return f"{bad[0]!r} is not a plain split name (it becomes a file name in --out: no '/', '..' or leading '.')"


def _train_split(v):
    if not isinstance(v, str) or not all(plain_name(part.strip()) for part in v.split(",")):
        return f"expected plain split names joined by commas (e.g. train,val), got {v!r}"


def _list_of(kind, name):
    return lambda v: None if isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool)
                                                         for x in v) else f"expected a list of {name}, got {v!r}"


ENTRY_CHECKS = {"task": _of(str, "a task name"), "data": _path(True), "features": _path(True),
                "tokenizer": _path(False), "batch_size": _number(1, MAX_BATCH, integer=True),
                "micro_batch_size": _number(1, MAX_BATCH, integer=True), "lr": _number(0, 1e3, lo_open=True),
                "max_seq_length": _number(3, 2 ** 20, integer=True), "val_split": _split,
                "splits": _splits, "task_token": _number(0, 2 ** 31 - 1, integer=True),
                "extra": _of(dict, "a mapping of task options")}
SHARED_CHECKS = {"tasks": _of(list, "a list of task entries"), "tokenizer": _path(False),
                 "epochs": _number(0, 10 ** 6, lo_open=True), "train_iterations": _number(1, 10 ** 12, integer=True),
                 "warmup": _number(0, 1), "weight_decay": _number(0, 1e3), "clip_grad": _number(0),
                 "train_iter_gap": _number(1, 10 ** 12, integer=True),
                 "plateau_patience": _number(0, 10 ** 9, integer=True),
                 "plateau_threshold": _number(0), "plateau_continue_threshold": _number(0),
                 "plateau_cooldown": _number(0, 10 ** 9, integer=True),
                 "plateau_reset_after_epochs": _list_of(int, "epoch numbers"), "task_tokens": _of(bool, "true/false"),
                 "max_regions": _number(2, 2 ** 16, integer=True),
                 "eval_batch_size": _number(1, MAX_BATCH, integer=True),
                 "seed": _number(0, MAX_SEED, integer=True), "workers": _number(0, 1024, integer=True),
                 "save_every": _number(0, 10 ** 12, integer=True), "keep_last": _number(1, 10 ** 6, integer=True),
                 "log_every": _number(1, 10 ** 12, integer=True), "bf16": _of(bool, "true/false")}
PATHS = ("data", "features", "tokenizer")

# each task's own options (TaskOptions.extra; vilbert-eval's TASK_OPTIONS, as each task's docstring lists
# them) with their types; hard_targets: true is vilbert-eval's --hard-targets (soft_targets: false)
_BOOL = _of(bool, "true/false")
EXTRA_CHECKS = {
    "answers": _path(False, file=True), "num_answers": _number(1, MAX_BATCH, integer=True),
    "min_answer_count": _number(1, 2 ** 31 - 1, integer=True), "train_split": _train_split,
    "gt_features": _path(True), "eval_on_gt": _BOOL, "soft_targets": _BOOL, "hard_targets": _BOOL,
    "visualize": _number(0, 10 ** 6, integer=True), "images": _path(True), "refs_file": _of(str, "a file name"),
    "iou_rule": _choice("vilbert-multi-task", "vl-bert", "refer", "continuous"),
    "score_head": _choice("auto", "alignment", "retrieval"), "max_images": _number(1, 2 ** 31 - 1, integer=True),
    "hard_pool": _number(1, 10 ** 6, integer=True), "pair_batch": _number(1, MAX_BATCH, integer=True),
    "karpathy_file": _of(str, "a file name")}
_REFER = ("gt_features", "eval_on_gt", "soft_targets", "hard_targets", "visualize", "images", "refs_file", "iou_rule")
TASK_EXTRA = {"vqa": ("answers", "num_answers", "min_answer_count", "train_split"),
              "gqa": ("answers", "num_answers", "train_split"),
              "refcoco": _REFER, "refcoco+": _REFER, "refcocog": _REFER,
              "retrieval": ("score_head", "max_images", "hard_pool", "pair_batch", "karpathy_file"),
              "vcr": ("gt_features",), "nlvr2": (), "snli-ve": ()}
EXTRA_PATHS = ("answers", "gt_features", "images")


def check_extra(task: str, extra: dict, where: str, path: Path) -> dict:
    """`extra` checked against the options `task` takes -> the options as the task reads them."""
    takes = TASK_EXTRA.get(task, tuple(EXTRA_CHECKS))
    for key in extra:
        if key not in takes:
            raise ConfigError(f"{path}: {where}extra.{key}: not an option of {task} (its options are "
                              f"{', '.join(takes) or 'none'})")
    out = {}
    for key, value in extra.items():
        if value is None:
            continue
        problem = EXTRA_CHECKS[key](value)
        if problem:
            raise ConfigError(f"{path}: {where}extra.{key}: {problem}")
        out[key] = value
    if "hard_targets" in out:
        hard = out.pop("hard_targets")
        if "soft_targets" in out and out["soft_targets"] == hard:
            raise ConfigError(f"{path}: {where}extra.hard_targets: {hard} contradicts soft_targets: {hard}")
        out["soft_targets"] = not hard
    return out


def checked(doc: dict, checks: dict, cls, where: str, path: Path) -> dict:
    names = [f.name for f in fields(cls)]
    for key in doc:
        if key not in checks:
            raise ConfigError(f"{path}: {where}{key}: unknown field (the fields are {', '.join(names)})")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    for name in required:
        if name not in doc:
            raise ConfigError(f"{path}: {where}{name}: missing")
    out = {}
    for key, value in doc.items():
        if value is None and key not in required:
            continue
        problem = checks[key](value)
        if problem:
            raise ConfigError(f"{path}: {where}{key}: {problem}")
        out[key] = Path(value) if key in PATHS else value
    return out


def parse(text: str, path: Path):
    """The document in `text` (.json: JSON, else YAML); a key given twice in one mapping is refused."""
    def no_twice(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ConfigError(f"{path}: {key}: given twice in one mapping")
            seen.add(key)
        return dict(pairs)

    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=no_twice)
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def mapping(loader, node, deep=False):
            nodes = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
            keys = [loader.construct_object(k, deep=deep) for k in nodes]
            for n, (k, key_node) in enumerate(zip(keys, nodes)):
                if k in keys[:n]:
                    raise ConfigError(f"{path}: {k}: given twice in one mapping (line {key_node.start_mark.line + 1})")
            return yaml.SafeLoader.construct_mapping(loader, node, deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
        return yaml.load(text, Loader=Loader)  # a SafeLoader
    except ConfigError:
        raise
    except Exception as e:  # json's and yaml's errors alike
        mark = getattr(e, "problem_mark", None)  # yaml's: where it is, apart from what it is
        first = f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None and getattr(
            e, "problem", None) else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({first})") \
            from None


def check_batch(path: Path, i: int, batch: int, micro: int | None, world: int) -> None:
    """Task i's batch split as finetune.make_plan makes it (`split_batch`), refused in the config's words."""
    try:
        split_batch(batch, micro, world, names=("batch_size", "micro_batch_size"))
    except ValueError as error:
        raise ConfigError(f"{path}: tasks[{i}].batch_size / micro_batch_size: {error}") from None


def written_paths(out: Path, config, val_splits: list) -> tuple[list, list]:
    """(folders, files) the run writes under `out`."""
    folders, files = [out / "checkpoints", out / "finetuned"], [out / "results.json"]
    for e, val in zip(config.tasks, val_splits):
        folder = out / e.task
        folders.append(folder)
        files += [folder / "metrics.json", folder / "answers.json",
                  *(folder / f"predictions_{s}.json" for s in dict.fromkeys([*([val] if val else []), *e.splits]))]
        if e.extra.get("visualize"):
            folders += [folder / "visualize", *(folder / "visualize" / s for s in e.splits)]
    return folders, files


def check_out_paths(out: Path, config, val_splits: list, made_by_us) -> None:
    """ValueError (one line) before any work when something in `out` is in the way of what the run
    writes: a file where it writes a folder, a folder where it writes a file, or an OUT/finetuned
    that this command did not make (`made_by_us(folder)`)."""
    folders, files = written_paths(Path(out), config, val_splits)
    for p in folders:
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise ValueError(f"{p}: exists and is not a folder, and the run writes a folder there; move it away "
                             "or choose another --out")
    for p in files:
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise ValueError(f"{p}: exists and is not a file, and the run writes a file there; move it away or "
                             "choose another --out")
    finetuned = Path(out) / "finetuned"
    if finetuned.exists() and not made_by_us(finetuned):
        raise ValueError(f"{finetuned}: exists and was not written by vilbert-multitask (no config.json with its "
                         "metadata); the run would replace it: move it away or choose another --out")
