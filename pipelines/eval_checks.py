"""`vilbert-eval`'s checks before any work (a mistake is one line, found before hours of fine-tuning):
the model fits the tokenizer and the text length, split names are plain names, the validation split
has labels, options the model cannot use, what OUT already holds (`check_out_holds`), and the lock on
OUT (rank 0 takes it, every rank hears).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import click

from common.names import plain_name
from common.outputs import out_lock
from pipelines.tasks.base import log, read_json

FINE_TUNED = ("finetuned", "best", "checkpoints")  # what a fine-tuning run of vilbert-eval leaves in OUT


def check_fit(config, vocabulary: int, opts, source: str) -> None:
    """ValueError before any work if the tokenizer does not fit the model; a --max-seq-length beyond
    the model's positions is cut to them (texts are padded to the longest, so short ones never
    noticed; a long one would have indexed past the position table). VL-BERT's visual elements and
    END take the two positions after the words: its texts are cut to max_position_embeddings - 2."""
    if vocabulary > config.vocab_size:
        raise ValueError(f"--tokenizer has {vocabulary} tokens, the model reads {config.vocab_size} (vocab_size of "
                         f"{source}): use the tokenizer the model was trained with")
    positions = config.max_position_embeddings
    fits = positions - 2 if getattr(config, "arch", "vilbert") == "vlbert" else positions  # (a task token: none)
    if opts.max_seq_length > fits:
        why = ", 2 of them taken by VL-BERT's visual elements and END" if fits != positions else ""
        log.warning("--max-seq-length %d does not fit the %d positions of %s%s: texts are cut to %d tokens",
                    opts.max_seq_length, positions, source, why, fits)
        opts.max_seq_length = fits


def check_feature_widths(task, config, source: str) -> None:
    """The task's region features (its detections, and its ground-truth-box store when given) as wide
    as the model reads: one line naming the folder, before any work."""
    for store, option in ((task.store, "--features"), (getattr(task, "gt_store", None), "--gt-boxes")):
        if store is None:
            continue
        width = store.feature_size()
        if width != config.v_feature_size:
            raise ValueError(f"{store.folder} ({option}): region features are {width} wide, the model reads "
                             f"{config.v_feature_size} (v_feature_size of {source}); extract them with the "
                             "detector the model was pretrained on")


def plain_split(ctx, param, value):
    """A click callback: split names become file names in OUT (predictions_SPLIT.json), so each must be
    a plain name, never a path."""
    for name in (value if isinstance(value, tuple) else (value,)):
        if name is None:
            continue
        for part in name.split(",") if param.name == "train_split" else (name,):
            if not part.strip():
                raise click.BadParameter(f"{name!r}: a split name is empty" + (" (several are joined by commas, "
                                         "e.g. train,val)" if "," in name else ""), ctx, param)
            if not plain_name(part):
                raise click.BadParameter(f"{name!r} is not a plain split name (no path separators, '..' or "
                                         "leading '.')", ctx, param)
    return value


def model_source(checkpoint, official_checkpoint, preset, official_config=None) -> str:
    """The model a run starts from, as its settings record it (paths absolute, so that the same model
    named another way is the same source)."""
    if checkpoint:
        return f"checkpoint {Path(checkpoint).resolve()}"
    if official_checkpoint:
        config = f" (config {Path(official_config).resolve()})" if official_config else ""
        return f"official checkpoint {Path(official_checkpoint).resolve()}{config}"
    return f"randomly initialised {Path(preset).resolve() if Path(preset).is_file() else preset}"


def check_val_labels(task, split: str) -> None:
    """ValueError if the validation split has no labels (VQA test-dev, VCR test): validating on it
    would fail only after the first epoch."""
    if split and not getattr(task, "has_labels", lambda s: True)(split):
        raise ValueError(f"--val-split {split}: the {task.name} split {split!r} has no labels in "
                         f"{task.opts.data}, so it cannot pick the best epoch; validate on a labelled split, or "
                         "--val-split none")


def check_model_options(model, task, opts, fine_tune: bool) -> None:
    """Options the model cannot honour: a --task-token on a model without task tokens (a warning:
    it is ignored) or beyond its table (an error), and --score-head retrieval on a model without
    that head when nothing is trained (it would score with a freshly initialised head)."""
    if opts.task_token is not None and not model.config.task_specific_tokens:
        log.warning("--task-token %d is ignored: the model has no task tokens (task_specific_tokens is off)",
                    opts.task_token)
    elif opts.task_token is not None and not 0 <= opts.task_token < model.config.num_task_tokens:
        raise ValueError(f"--task-token {opts.task_token}: the model has task tokens 0 to "
                         f"{model.config.num_task_tokens - 1} (num_task_tokens {model.config.num_task_tokens})")
    heads = getattr(model.task_heads, "spec", {})
    if opts.extra.get("score_head") == "retrieval" and "retrieval" not in heads:
        if not fine_tune:
            raise ValueError("--score-head retrieval: the model has no 'retrieval' head (it has "
                             f"{sorted(heads) or 'none'}); evaluating would score with a random one: use "
                             "--score-head alignment (or auto), or fine-tune one with --epochs / --train-steps")
        log.warning("--score-head retrieval: the model has no 'retrieval' head; a new one is trained from scratch")


def check_out_holds(out: Path, task_name: str, fine_tune: bool, model_paths: dict) -> None:
    """ValueError (one line) before any work when the run would destroy what OUT holds: another
    command's run (vilbert-multitask's results.json, vilbert-train's metrics.csv), a results.json
    that is not vilbert-eval's or is of another task, a fine-tuned run that an evaluation alone would
    replace the results of, or a model to fine-tune (`model_paths`: option -> path) that lies where
    fine-tuning writes (OUT/finetuned, OUT/best, OUT/checkpoints)."""
    out = Path(out)
    if (out / "metrics.csv").exists() or (out / "tensorboard").exists():
        raise ValueError(f"{out}: holds a vilbert-train run (metrics.csv, tensorboard/); give another --out")
    results = out / "results.json"
    held = read_json(results, "results of an earlier run") if results.exists() else None
    if held is not None:
        if isinstance(held, dict) and isinstance(held.get("tasks"), dict) and "config" in held:
            raise ValueError(f"{out}: holds a vilbert-multitask run ({results}); give another --out (its model: "
                             f"--checkpoint {out / 'finetuned'})")
        if not (isinstance(held, dict) and isinstance(held.get("task"), str) and isinstance(held.get("splits"), dict)):
            raise ValueError(f"{results}: not the results of a vilbert-eval run, and this run would replace it; "
                             "give another --out")
        if held["task"] != task_name:
            raise ValueError(f"{out}: holds a {held['task']} run ({results}), not {task_name}; give another --out")
    fine_tuned = [name for name in FINE_TUNED if (out / name).exists()]
    if not fine_tune and (fine_tuned or (held is not None and held.get("train_steps"))):
        what = ", ".join([f"{n}/" for n in fine_tuned] + ([f"results.json of {held['train_steps']} steps"]
                                                          if held is not None and held.get("train_steps") else []))
        raise ValueError(f"{out}: holds a fine-tuned run ({what}); an evaluation alone would replace its results "
                         f"and predictions: evaluate into another --out (the model: --checkpoint {out / 'best'} or "
                         f"{out / 'finetuned'})")
    if fine_tune:
        base = out.resolve()
        for option, path in model_paths.items():
            if not path:
                continue
            where = Path(path).resolve()
            for name in FINE_TUNED:
                if where == base / name or (base / name) in where.parents:
                    raise ValueError(f"{option} {path}: lies in {out / name}, which this fine-tuning writes over; "
                                     "copy the model out of --out, or give another --out")


@contextlib.contextmanager
def run_lock(out: Path, info, command: str = "vilbert-eval"):
    """out_lock on OUT for the run, taken by rank 0 only (the one that writes); under torchrun every
    rank hears whether it was refused, so that all stop together instead of waiting on rank 0."""
    from pipelines.tasks.distributed import gather_lists

    with contextlib.ExitStack() as stack:
        error = None
        if info.is_main:
            try:
                stack.enter_context(out_lock(out, command))
            except (ValueError, OSError) as e:
                error = str(e)
        if info.world_size > 1:
            error = gather_lists([error])[0]  # rank 0's
        if error:
            raise ValueError(error)
        yield
