"""What every downstream task shares: options, the task interface, distributed evaluation over
chunks and result writing (the fine-tuning loop is `finetune`).

A task class implements `head` (the task head it needs, or None), `train_items` and `collate`
(one epoch is a pass over the items), `loss` and `evaluate`; `pipelines.tasks.TASKS` maps the CLI
name to the class. Adding a task means a new module and one dict entry; nothing else changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.safe_load import regular_file
from vilbert.task_heads import VLBERT_KINDS

log = logging.getLogger("vilbert.eval")


@dataclass
class TaskOptions:
    data: Path  # annotation folder of the task
    features: Path  # vilbert-extract shards
    out: Path  # results, predictions, fine-tuned checkpoint
    tokenizer: Path | None = None  # BERT tokenizer directory or vocab.txt
    max_seq_length: int | None = None  # None = the task's default
    max_regions: int = 101  # including [IMG]
    batch_size: int | None = None  # items per optimizer step, all processes; None = the task's official value
    micro_batch_size: int | None = None  # items per forward pass and process; None = batch_size / processes
    eval_batch_size: int = 128
    epochs: float | str | None = None  # passes over the training items; "official" = the task's; None: train_steps
    train_steps: int = 0  # optimizer steps, instead of epochs; 0 and no epochs = evaluate only
    lr: float | None = None  # None = the task's default
    warmup: float = 0.1
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    val_split: str | None = None  # validated after each epoch; None = the task's (with epochs), "" = none
    save_every: int = 1000  # a resumable checkpoint every N steps (and after each epoch of `epochs`, at the end)
    keep_last: int = 2
    workers: int = 2  # DataLoader processes building batches (0: the main thread)
    seed: int = 0
    device: str = "cpu"
    splits: tuple[str, ...] = ()  # evaluation splits; () = the task's defaults
    task_token: int | None = None  # vilbert-multi-task task id, used only by models with task tokens
    log_every: int = 50
    bf16: bool = False  # bfloat16 autocast on CUDA
    compile: bool = False  # torch.compile the training step
    compile_mode: str = "default"
    extra: dict = field(default_factory=dict)  # task-specific options (see each task's docstring)


class Task:
    """Interface of a downstream task. Subclasses set `name`, `default_splits`, `official_task_id`
    and, from vilbert-multi-task's vilbert_tasks.yml, the official schedule (`default_lr`,
    `default_epochs`, `default_batch_size`, `default_max_seq_length`); `val_split` and `metric`
    choose the checkpoint kept as best."""

    name = "task"
    default_splits: tuple[str, ...] = ()
    official_task_id = 0
    default_lr = 2e-5  # vilbert-multi-task's per-task settings (vilbert_tasks.yml)
    default_max_seq_length = 20
    default_epochs = 20  # num_epoch
    default_batch_size = 128  # batch_size: items per optimizer step, all GPUs together
    val_split = "val"  # validated after each epoch
    metric = "accuracy"  # of `evaluate`, higher is better: picks the best epoch

    def __init__(self, opts: TaskOptions):
        self.opts = opts
        if opts.lr is None:
            opts.lr = self.default_lr
        if opts.max_seq_length is None:
            opts.max_seq_length = self.default_max_seq_length
        if opts.batch_size is None:
            opts.batch_size = self.default_batch_size
        if opts.epochs == "official":
            opts.epochs = float(self.default_epochs)
        if opts.val_split is None:  # validation is the default of epoch schedules
            opts.val_split = self.val_split if opts.epochs else ""

    # -- to implement --------------------------------------------------------------------
    arch = "vilbert"  # the model's architecture, set by `prepare`: VL-BERT tasks use VL-BERT's heads

    def head(self) -> tuple[str, str, int] | None:
        """(head name, kind, size) this task trains and reads, or None (may depend on `self.arch`)."""
        return None

    def train_items(self) -> list:
        """The training items; one epoch is one pass over them."""
        raise NotImplementedError

    def collate(self, items: list, rng: np.random.Generator) -> dict:
        """The training batch of `items` (rng: for what a batch draws, e.g. retrieval's negatives)."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, split: str) -> tuple[dict, list]:
        """-> (metrics, predictions), the same in every process (see `map_chunks`)."""
        raise NotImplementedError

    def eval_inputs(self, split: str) -> list | None:
        """The items `evaluate` reads for `split`, with their annotations and features checked:
        raises, naming the file and reason, if the split cannot be evaluated. Also called for every
        evaluation split before fine-tuning starts, so that a mistake is not found hours later
        (None: the task checked its splits when it was built)."""
        return None

    def settings(self) -> dict:
        """What this task's data fixes that a model fine-tuned on it depends on (VQA, GQA: the answer
        vocabulary, whose order gives the head's outputs their meaning), JSON-serialisable. A resumed
        run and a re-evaluation must have the same: fine-tuned checkpoints store it in their metadata
        as {"task_settings": {name: settings()}}, and `prepare` compares it. Default: nothing."""
        return {}

    def has_labels(self, split: str) -> bool:
        """Whether `split` has the labels `evaluate` scores (else it gives predictions only, as for
        VQA test-dev or VCR test), read from the split's files; raises as `eval_inputs` does if the
        split cannot be read. Default: always."""
        return True

    # -- shared ---------------------------------------------------------------------------
    def check_settings(self, model) -> None:
        """ValueError if the model was fine-tuned on this task with other `settings()` (its
        checkpoint metadata's "task_settings"); settings only one side knows are not compared."""
        stored = (getattr(model, "checkpoint_metadata", None) or {})
        stored = stored.get("task_settings") if isinstance(stored, dict) else None
        theirs = stored.get(self.name) if isinstance(stored, dict) else None
        if not isinstance(theirs, dict):
            return
        mine = self.settings()
        differ = sorted(k for k in theirs.keys() & mine.keys() if theirs[k] != mine[k])
        if not differ:
            return
        if "answers" in differ:
            def vocab(s):
                count = f"{s['answer_count']} answers, " if "answer_count" in s else ""
                return f"{count}sha256 {str(s['answers'])[:12]}…"
            raise ValueError(f"the model was fine-tuned on {self.name} with another answer vocabulary "
                             f"({vocab(theirs)}; this run's: {vocab(mine)}): its answer head's outputs mean other "
                             "answers; pass the answers.json of its run (--answers)")
        shown = "; ".join(f"{k}: {theirs[k]!r} (this run: {mine[k]!r})" for k in differ)
        raise ValueError(f"the model was fine-tuned on {self.name} with other settings: {shown}")

    def train_batch(self, rng: np.random.Generator) -> dict:
        """A batch of `batch_size` training items drawn with replacement."""
        items = self.train_items()
        return self.collate([items[i] for i in rng.integers(0, len(items), size=self.opts.batch_size)], rng)

    def load_common(self) -> None:
        """Tokenizer, feature shards and annotation folder, which every current task needs."""
        from .features import FeatureStore
        from .text import load_tokenizer

        if not self.opts.tokenizer:
            raise ValueError(f"{self.name} needs --tokenizer (a BERT tokenizer directory or vocab.txt)")
        self.tokenizer = load_tokenizer(self.opts.tokenizer)
        self.store = FeatureStore(self.opts.features)
        self.data = Path(self.opts.data)

    def prepare(self, model) -> None:
        """Give the model this task's head (a fresh one unless it already has a matching one), after
        checking that a model fine-tuned on this task was so with this task's `settings()`."""
        self.arch = model.config.arch
        self.check_settings(model)
        spec = self.head()
        if spec is None:
            return
        name, kind, n = spec
        have = model.task_heads.spec.get(name)
        if have is None:
            model.add_task_head(name, kind, n)
            log.info("added a new %s head %r with %d outputs", kind, name, n)
        elif have[0] != kind and (have[0] in VLBERT_KINDS or kind in VLBERT_KINDS):  # ViLBERT's kinds interchange
            raise ValueError(f"the model's {name!r} head is of kind {have[0]!r}, the {self.name} task on a "
                             f"{self.arch} model uses {kind!r}")
        elif have[1] != n:
            raise ValueError(f"the model's {name!r} head has {have[1]} outputs, the {self.name} data needs {n}")

    def task_ids(self, model, batch_size: int, device) -> torch.Tensor | None:
        """(B, 1) task token ids for vilbert-multi-task checkpoints, else None."""
        if not model.config.task_specific_tokens:
            return None
        tid = self.opts.task_token if self.opts.task_token is not None else self.official_task_id
        return torch.full((batch_size, 1), tid, dtype=torch.long, device=device)

    def backbone(self, model, batch: dict):
        ids = batch["input_ids"]
        return model.backbone(ids, batch["image_feat"], batch["image_loc"], batch["token_type_ids"],
                              batch["attention_mask"], batch["image_mask"],
                              self.task_ids(model, ids.shape[0], ids.device))

    def to_device(self, batch: dict) -> dict:
        """Tensors to the model's device (without waiting, from the pinned batches of the workers)."""
        device = torch.device(self.opts.device)
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device else v
                for k, v in batch.items()}

    def map_chunks(self, chunks: list[list], build, run) -> list:
        """The outputs of `run(chunk, batch)` (one per item of the chunk; batch = build(chunk), made
        in the DataLoader workers, on the device) over every chunk, in order, in every process.
        Under torchrun each process runs a contiguous share of the chunks, so each batch is the one
        a single process runs, and the gathered list holds exactly one output per item."""
        from .distributed import gather_lists, rank_world, share
        from .loading import ChunkBatches, batch_loader

        rank, world = rank_world()
        mine = chunks[share(len(chunks), rank, world)]
        pin = str(self.opts.device).startswith("cuda")
        loader = batch_loader(ChunkBatches(mine, build), self, self.opts.workers, pin)
        outputs = []
        for chunk, batch in zip(mine, loader):
            got = run(chunk, self.to_device(batch))
            if len(got) != len(chunk):
                raise RuntimeError(f"{self.name}: {len(got)} outputs for a chunk of {len(chunk)} items")
            outputs += got
        return gather_lists(outputs, sum(len(c) for c in chunks))


def autocast(opts: TaskOptions):
    """bfloat16 autocast on CUDA when asked (`--bf16`), else a no-op context."""
    on_cuda = str(opts.device).startswith("cuda")
    return torch.autocast("cuda" if on_cuda else "cpu", dtype=torch.bfloat16, enabled=opts.bf16 and on_cuda)


def batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def write_json(path: Path, obj) -> Path:
    """Written whole or not at all (a temporary file of this process, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
    return path


def answers_settings(answers) -> dict:
    """A task's `settings()` for an answer vocabulary: the sha256 (hex) of the list as JSON
    (json.dumps(list(answers)), default separators, ASCII) and its length."""
    answers = list(answers)
    return {"answers": hashlib.sha256(json.dumps(answers).encode("utf-8")).hexdigest(), "answer_count": len(answers)}


def keep_answer_list(path: Path, answers) -> None:
    """Write the answer vocabulary to `path` (OUT/answers.json), which a fine-tuned head depends on. Where
    OUT holds a fine-tuning run (finetuned/, best/ or checkpoints/), an answer list already there that
    differs is refused, not overwritten: that run's weights go with it. An OUT of evaluations only gets
    the new list."""
    answers = list(answers)
    runs = [path.parent / name for name in ("finetuned", "best", "checkpoints") if (path.parent / name).exists()]
    if runs and (path.exists() or path.is_symlink()):
        try:
            before = json.loads(regular_file(path, "answer list").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: the answer list of the run in this --out cannot be read ({e}); "
                             "choose another --out") from None
        if before != answers:
            n = len(before) if isinstance(before, list) else "?"
            raise ValueError(f"{path}: the run in this --out ({runs[0].name}/) was fine-tuned with another answer "
                             f"vocabulary ({n} answers, this run {len(answers)}); pass --answers {path} to go on "
                             "with it, or choose another --out")
        return
    write_json(path, answers)


def split_names(value: str, option: str = "--train-split") -> list[str]:
    """The split names of `value`, several joined by commas ("train,val"): each one non-empty and named
    once (a split named twice would be trained on twice); a one-line error naming `option` otherwise."""
    names = [name.strip() for name in str(value).split(",")]
    if not all(names):
        raise ValueError(f"{option} {value!r}: a split name is empty (several are joined by commas, e.g. train,val)")
    twice = next((name for k, name in enumerate(names) if name in names[:k]), None)
    if twice is not None:
        raise ValueError(f"{option} {value!r}: split {twice!r} is named twice (its items would count twice)")
    return names


def first_seen(seen: dict, key, where, what: str, path) -> None:
    """Record that `key` (an id of the data) is at `where` (a line or record), or raise the one-line
    error "PATH: WHAT KEY appears twice (FIRST and WHERE)": an id given twice would be counted twice."""
    if key in seen:
        raise ValueError(f"{path}: {what} {key!r} appears twice ({seen[key]} and {where}); each must be given once")
    seen[key] = where


def no_items(path, split: str, what: str) -> ValueError:
    """The error of a split with nothing to evaluate (or train on): it would exit 0 with no metric."""
    return ValueError(f"{path}: split {split!r} has no {what}")


def read_json(path: Path, what: str):
    regular_file(path, what)  # "PATH: WHAT not found"; a FIFO would block the read
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({what}): {e}") from e
