"""`vilbert-multitask`'s configuration and schedule: 12-in-1 multi-task fine-tuning (vilbert-multi-task's
`train_tasks.py`), one model trained on several tasks at once (the trainer is `multitask_train`).

* **Config** (`MultiTaskConfig`, `load_config`): a YAML or JSON file with a list of task entries
  (`TaskEntry`: a name of `pipelines.tasks.TASKS`, its annotation folder and feature shards, optional
  tokenizer, batch size, lr, sequence length, validation split, task options) and the settings the
  tasks share. A bad file is one `ConfigError` line naming the file and the field.
* **Schedule** (as `train_tasks.py: main`): an iteration takes one batch of each task in turn, in the
  config's order, each with its own backward pass and optimizer step; the learning-rate schedule
  steps once per iteration. An epoch is as many iterations as the task with the most batches has
  batches (`iterations_per_epoch`); a task with fewer starts its next pass when it runs out. One
  AdamW at the smallest task lr; each task's loss is multiplied by its lr over that one
  (`loss_scales`). A task is validated after each of its own epochs (every `steps_per_epoch`
  iterations) and at the end; once its validation has plateaued (`Plateau`, vilbert/utils.py:
  `MultiTaskStopOnPlateau`) it trains only in iterations divisible by `train_iter_gap` (`runs_at`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.safe_load import regular_file

from .base import log
from .multitask_config import ENTRY_CHECKS, SHARED_CHECKS, ConfigError, check_extra, checked, parse


@dataclass
class TaskEntry:
    task: str  # a name of pipelines.tasks.TASKS
    data: Path  # annotation folder
    features: Path  # vilbert-extract shards
    tokenizer: Path | None = None  # default: the config's `tokenizer`
    batch_size: int | None = None  # items per optimizer step; None = the task's official value
    micro_batch_size: int | None = None  # items per forward pass (gradients accumulated up to batch_size)
    lr: float | None = None  # None = the task's official lr
    max_seq_length: int | None = None  # None = the task's official length
    val_split: str | None = None  # None = the task's; "none" = not validated (never paused)
    splits: list = field(default_factory=list)  # evaluated with the final model after training
    task_token: int | None = None  # None = the task's official id
    extra: dict = field(default_factory=dict)  # the task's own options (TaskOptions.extra: answers, gt_features...)


@dataclass
class MultiTaskConfig:
    tasks: list  # of TaskEntry
    tokenizer: Path | None = None  # BERT tokenizer directory or vocab.txt, for every task without its own
    epochs: float = 20.0  # train_tasks.py --num_train_epochs
    train_iterations: int = 0  # instead of epochs: this many iterations (>= 1 when given; 0: not given)
    warmup: float = 0.1  # --warmup_proportion, linear warmup then linear decay (--lr_scheduler warmup_linear)
    weight_decay: float = 0.01
    clip_grad: float = 0.0  # max gradient norm per optimizer step; 0 = none (train_tasks.py clips nothing)
    train_iter_gap: int = 4  # --train_iter_gap: a plateaued task trains every Nth iteration
    plateau_patience: int = 1  # MultiTaskStopOnPlateau(patience=1, threshold=0.001, continue_threshold=0.005,
    plateau_threshold: float = 0.001  # cooldown=1), relative thresholds
    plateau_continue_threshold: float = 0.005
    plateau_cooldown: int = 1
    plateau_reset_after_epochs: list = field(default_factory=lambda: [6, 8])  # train_tasks.py: lr_reduce_list [5, 7]
    task_tokens: bool = True  # --task_specific_tokens: a task token per task (added if the model has none)
    max_regions: int = 101
    eval_batch_size: int = 128
    seed: int = 0
    workers: int = 2  # DataLoader processes per task (0: a background thread each)
    save_every: int = 1000  # a resumable checkpoint every N iterations (and after each epoch, at the end)
    keep_last: int = 2
    log_every: int = 50
    bf16: bool = False


# -- reading the file ------------------------------------------------------------------------------

def load_config(path) -> MultiTaskConfig:
    """The config in `path` (.json: JSON, else YAML), every field checked; ConfigError otherwise."""
    from . import TASKS

    path = Path(path)
    try:
        regular_file(path, "multi-task config")  # a FIFO is refused, never waited on
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    doc = parse(text, path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'tasks' list at the top, got {type(doc).__name__}")
    shared = checked(doc, SHARED_CHECKS, MultiTaskConfig, "", path)
    if "epochs" in doc and "train_iterations" in doc:  # as vilbert-eval's --epochs / --train-steps
        raise ConfigError(f"{path}: epochs and train_iterations: give one of them, not both")
    if not shared["tasks"]:
        raise ConfigError(f"{path}: tasks: empty (give at least one task entry)")
    entries, seen = [], set()
    for i, raw in enumerate(shared["tasks"]):
        where = f"tasks[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: tasks[{i}]: expected a mapping (task, data, features, ...), got {raw!r}")
        e = TaskEntry(**checked(raw, ENTRY_CHECKS, TaskEntry, where, path))
        if e.task not in TASKS:
            raise ConfigError(f"{path}: {where}task: unknown task {e.task!r} (one of {', '.join(sorted(TASKS))})")
        if e.task in seen:
            raise ConfigError(f"{path}: {where}task: {e.task!r} is listed twice")
        seen.add(e.task)
        e.extra = check_extra(e.task, e.extra, where, path)
        if e.tokenizer is None and shared.get("tokenizer") is None:
            raise ConfigError(f"{path}: {where}tokenizer: missing (give it in the entry or at the top level)")
        entries.append(e)
    shared["tasks"] = entries
    return MultiTaskConfig(**shared)


def val_split_of(entry: TaskEntry) -> str:
    """The split an entry is validated on: its val_split, the task's when not given, "" for none."""
    from . import TASKS

    if entry.val_split is None:
        return TASKS[entry.task].val_split
    return "" if entry.val_split in ("none", "") else entry.val_split


# -- the schedule ----------------------------------------------------------------------------------

def loss_scales(lrs: list[float]) -> list[float]:
    """Each task's loss factor: its lr over the smallest (train_tasks.py: loss_scale = task_lr / base_lr);
    the optimizer runs at the smallest."""
    base = min(lrs)
    return [lr / base for lr in lrs]


def iterations_per_epoch(steps_per_epoch: list[int]) -> int:
    """An epoch of the run: the batches of the task that has the most (train_tasks.py's `median_num_iter`,
    the last of the sorted counts, with every task's num_epoch equal to --num_train_epochs)."""
    return max(steps_per_epoch)


def total_iterations(per_epoch: int, epochs: float, train_iterations: int = 0) -> int:
    return train_iterations or max(1, math.ceil(epochs * per_epoch))


def runs_at(iteration: int, paused: bool, gap: int) -> bool:
    """Whether a task trains in `iteration` (0-based over the run): always, unless it is paused, then
    only when the iteration is a multiple of `gap`."""
    return not paused or iteration % gap == 0


def validates_after(done: int, steps_per_epoch: int, total: int) -> bool:
    """Whether a task is validated once `done` iterations are done: after each of its epochs (every
    `steps_per_epoch` iterations) and after the last iteration."""
    return done % steps_per_epoch == 0 or done == total


class Plateau:
    """vilbert-multi-task's MultiTaskStopOnPlateau (mode max, relative thresholds): a validation score
    that beats the best by more than `threshold` (relative) is the new best; `patience` + 1 scores in a
    row that do not pause the task; a paused task trains again when a score falls more than
    `continue_threshold` (relative) below the best. After pausing or resuming, the next score's miss is
    not counted (`cooldown`). `reset()` forgets everything (train_tasks.py: after epochs 5 and 7)."""

    def __init__(self, patience: int = 1, threshold: float = 0.001, continue_threshold: float = 0.005,
                 cooldown: int = 1):
        self.patience, self.threshold, self.continue_threshold, self.cooldown = (patience, threshold,
                                                                                 continue_threshold, cooldown)
        self.reset()

    def reset(self) -> None:
        self.best, self.misses, self.cooling, self.paused = None, 0, 0, False

    def step(self, value: float) -> bool:
        """Record one validation score -> whether the task is paused now."""
        value = float(value)
        if self.best is None or value > self.best * (1 + self.threshold):
            self.best, self.misses = value, 0
        else:
            self.misses += 1
        if self.cooling > 0:
            self.cooling, self.misses = self.cooling - 1, 0
        if self.misses > self.patience:
            self.paused, self.cooling, self.misses = True, self.cooldown, 0
        elif self.paused and value < self.best * (1 - self.continue_threshold):
            self.paused, self.cooling, self.misses = False, self.cooldown, 0
        return self.paused

    def state(self) -> dict:
        return {"best": self.best, "misses": self.misses, "cooling": self.cooling, "paused": self.paused}

    def load(self, state: dict) -> None:
        self.best, self.misses, self.cooling, self.paused = (state["best"], state["misses"], state["cooling"],
                                                             state["paused"])


def add_task_tokens(model, seed: int = 0) -> bool:
    """Give a ViLBERT model without task tokens its task embedding (train_tasks.py
    --task_specific_tokens: a new, randomly initialised table) -> whether one was added."""
    config = model.config
    if config.task_specific_tokens:
        return False
    if config.arch != "vilbert":
        log.warning("task tokens: a %s model has none; the tasks are trained without", config.arch)
        return False
    embeddings = model.backbone.embeddings
    table = torch.nn.Embedding(config.num_task_tokens, config.hidden_size)
    with torch.no_grad():
        table.weight.normal_(0.0, config.initializer_range, generator=torch.Generator().manual_seed(seed))
    embeddings.task_embeddings = table.to(embeddings.word_embeddings.weight.device)
    config.task_specific_tokens = True
    log.info("task tokens: added a new table of %d task embeddings", config.num_task_tokens)
    return True
