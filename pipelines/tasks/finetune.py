"""`vilbert-eval`'s fine-tuning: epochs over the task's training items, on one process or many
(torchrun), resumable.

* **Schedule.** `batch_size` items per optimizer step, all processes together: `micro_batch_size`
  per forward pass and process, gradients accumulated up to the batch (as pretraining). An epoch is
  one pass over `task.train_items()` in an order drawn from (seed, epoch), cut into
  ceil(N / batch) steps; the last step of an epoch is filled up from the start of the same order
  (as `DistributedSampler` pads). Step s, micro-batch m of process r reads the slice
  `(m * world + r) * micro` of the step, so the items of a step do not depend on how many
  processes share it. AdamW (no decay on biases and LayerNorm) with linear warmup over `warmup` of
  the steps and linear decay to 0 (pipelines.train.optim), gradient clipping at `clip_grad`.
* **Batches** are built by `task.collate` in DataLoader workers (pipelines.tasks.loading); a batch's
  random draws (retrieval's negatives) come from a generator seeded by its place in the run, and so
  does its dropout (the torch seed is set before each pass), so workers, the main thread, a
  resumed run and any number of processes give the same batches and masks.
* **Validation** on `val_split` after each epoch (and at the end); the weights of the best epoch by
  `task.metric` are kept in OUT/best/.
* **Checkpoints** OUT/checkpoints/step-NNNNNNNN/ (pipelines.train.checkpoints: written aside and
  renamed) after each epoch of `epochs`, every `save_every` steps and at the end, with the optimizer, schedule,
  RNG states, losses and validation history: the same command re-run after a kill continues from
  the newest one and ends exactly where the unbroken run ends (fp32).
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipelines.train.checkpoints import (
    differences,
    newest_resumable,
    recover_model_dir,
    rng_state,
    save_checkpoint,
    save_model_dir,
    set_rng_state,
)
from pipelines.train.distributed import DistInfo, split_batch, wrap_model
from pipelines.train.optim import build_optimizer, build_scheduler

from .base import Task, TaskOptions, autocast
from .distributed import mean_over_processes
from .loading import batch_loader

log = logging.getLogger("vilbert.eval")
STATE_KEYS = ("optimizer", "scheduler", "step", "rng", "losses", "history", "best", "settings")


@dataclass
class Plan:
    items: int  # training items (one epoch)
    world: int  # processes
    micro: int  # items per forward pass and process
    accumulation: int  # forward passes per optimizer step and process
    batch: int  # items per optimizer step, all processes: micro x accumulation x world
    steps_per_epoch: int
    total_steps: int


def make_plan(opts: TaskOptions, items: int, world: int) -> Plan:
    if items == 0:
        raise ValueError(f"{opts.data}: no training items")
    micro, accumulation = split_batch(opts.batch_size, opts.micro_batch_size, world)
    batch = opts.batch_size
    per_epoch = -(-items // batch)
    total = opts.train_steps or max(1, math.ceil(float(opts.epochs) * per_epoch))
    return Plan(items, world, micro, accumulation, batch, per_epoch, total)


class StepBatches(Dataset):
    """The micro-batches of one process from `start` (a step) to the end of the plan, in order."""

    def __init__(self, task: Task, items: list, plan: Plan, seed: int, rank: int, start: int):
        self.task, self.items, self.plan, self.seed, self.rank, self.start = task, items, plan, seed, rank, start
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return (self.plan.total_steps - self.start) * self.plan.accumulation

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's item order, filled up to whole steps from its own start."""
        if epoch not in self._orders:
            self._orders = {epoch: np.resize(np.random.default_rng([self.seed, epoch]).permutation(self.plan.items),
                                             self.plan.steps_per_epoch * self.plan.batch)}
        return self._orders[epoch]

    def __getitem__(self, j: int) -> dict:
        p = self.plan
        step, m = self.start + j // p.accumulation, j % p.accumulation
        epoch, s = divmod(step, p.steps_per_epoch)
        slot = m * p.world + self.rank  # this micro-batch's place among the step's
        lo = s * p.batch + slot * p.micro
        rng = np.random.default_rng([self.seed, epoch, s, slot])
        return self.task.collate([self.items[i] for i in self.order(epoch)[lo:lo + p.micro]], rng)


def micro_seed(seed: int, step: int, slot: int) -> int:
    """The torch seed of micro-batch `slot` of `step`: its dropout does not depend on which process
    runs it, or on whether the run was resumed."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(2, np.uint64)[0] >> 1)


def resume_from(root: Path, keys, device, model, optimizer, scheduler, settings: dict, made: str):
    """Load the newest usable checkpoint in `root` into model, optimizer and scheduler, once it is
    shown to be made with `settings` and the model's config (else one ValueError naming what differs)
    -> (its path, its training state), or None when there is none."""
    found = newest_resumable(root, keys, device, log)
    if found is None:
        return None
    ckpt, saved, state = found
    now = {**settings, **{f"model {k}": v for k, v in model.config.to_dict().items()}}
    then = {**state["settings"], **{f"model {k}": v for k, v in saved.config.to_dict().items()}}
    unrecorded = sorted(k for k in now if k not in then)  # settings that later versions began to record
    differ = differences(then, now)
    if differ:
        raise ValueError(f"{ckpt}: {made} with other settings than this run's (" + "; ".join(differ[:6])
                         + "); re-run the same command to resume, or choose another --out")
    if unrecorded:
        log.warning("%s: made by an earlier version, which did not record %s: resuming without comparing them "
                    "(give the same starting model, data and answers as the run it continues)", ckpt,
                    ", ".join(unrecorded))
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return ckpt, state


class TaskLoss(torch.nn.Module):
    """model + task.loss as one module, so that DDP (and torch.compile) see the whole step."""

    def __init__(self, model, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict) -> torch.Tensor:
        return self.task.loss(self.model, batch)


class FineTuner:
    def __init__(self, model, task: Task, opts: TaskOptions, info: DistInfo, device: torch.device, source: str = ""):
        self.model, self.task, self.opts, self.info, self.device = model, task, opts, info, device
        self.source = source  # the model the run starts from (vilbert-eval: the checkpoint, preset, ...)
        self.items = task.train_items()
        self.plan = make_plan(opts, len(self.items), info.world_size)
        self.optimizer = build_optimizer(model, opts.lr, opts.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.plan.total_steps, opts.warmup)
        self.step, self.losses, self.history, self.best = 0, [], [], None
        self.root = Path(opts.out) / "checkpoints"
        self._saved_at, self._batches, self._step_fn = -1, None, None
        self.written: set[Path] = set()  # the checkpoints of this run (saved, or resumed from): --no-save drops them

    def settings(self) -> dict:
        """What a resumed run must share with the run it continues: the schedule, the task's
        data-fixed settings (its answer list, ...), the task token the model reads and the model the
        run started from."""
        o = self.opts
        return {"task": self.task.name, "lr": o.lr, "batch": self.plan.batch, "steps": self.plan.total_steps,
                "steps_per_epoch": self.plan.steps_per_epoch, "items": self.plan.items, "warmup": o.warmup,
                "weight_decay": o.weight_decay, "clip_grad": o.clip_grad, "seed": o.seed,
                "max_seq_length": o.max_seq_length, "max_regions": o.max_regions, "val_split": o.val_split,
                "head": list(self.task.head() or ()), "task_token": self.task_token(), "model": self.source,
                **{f"task {k}": v for k, v in self.task_settings().items()}}

    def task_settings(self) -> dict:
        return dict(getattr(self.task, "settings", dict)() or {})

    def task_token(self):
        """The task token id the model reads (None: a model without task tokens reads none)."""
        if not getattr(self.model.config, "task_specific_tokens", False):
            return None
        if self.opts.task_token is not None:
            return self.opts.task_token
        return getattr(self.task, "shown_task_id", self.task.official_task_id)

    def task_metadata(self) -> dict:
        """What every model directory of the run records, for a later evaluation to check."""
        return {"task_settings": {self.task.name: self.task_settings()}}

    # -- resume ------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the newest usable checkpoint in OUT/checkpoints, if there is one."""
        found = resume_from(self.root, STATE_KEYS, self.device, self.model, self.optimizer, self.scheduler,
                            self.settings(), "fine-tuned")
        if found is None:
            return False
        ckpt, state = found
        self.written.add(Path(ckpt))
        self.step, self.losses, self.history, self.best = state["step"], state["losses"], state["history"], \
            state["best"]
        self._saved_at = self.step
        if self.best is not None and self.info.is_main and recover_model_dir(Path(self.opts.out) / "best"):
            log.warning("%s: OUT/best put back from where a killed save had moved it", self.task.name)
        set_rng_state(state["rng"])
        log.info("%s: resumed from %s (step %d of %d)", self.task.name, ckpt, self.step, self.plan.total_steps)
        return True

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        p, o = self.plan, self.opts
        if self.info.is_main:
            log.info("%s: %d items, %d steps of %d (%d per process and pass x %d passes x %d processes), "
                     "%d steps an epoch", self.task.name, p.items, p.total_steps, p.batch, p.micro, p.accumulation,
                     p.world, p.steps_per_epoch)
        data = StepBatches(self.task, self.items, p, o.seed, self.info.rank, self.step)
        batches = self._batches = iter(batch_loader(data, self.task, o.workers, self.device.type == "cuda"))
        pending, t0, done0 = [], time.perf_counter(), self.step
        self.model.train()
        while self.step < p.total_steps:
            pending.append(self.train_step(batches))
            epoch_end = self.step % p.steps_per_epoch == 0 or self.step == p.total_steps
            if epoch_end or self.step % o.log_every == 0 or (o.save_every and self.step % o.save_every == 0):
                pending = self._settle(pending)
                if self.info.is_main:
                    recent = self.losses[-o.log_every:]
                    rate = (self.step - done0) * p.batch / max(time.perf_counter() - t0, 1e-9)
                    log.info("%s step %d/%d (epoch %.2f) loss %.4f lr %.2e, %.1f items/s", self.task.name, self.step,
                             p.total_steps, self.step / p.steps_per_epoch, sum(recent) / len(recent),
                             self.scheduler.get_last_lr()[0], rate)
            if epoch_end and o.val_split:
                self.validate()
            if (epoch_end and o.epochs) or self.step == p.total_steps or (o.save_every and
                                                                          self.step % o.save_every == 0):
                self.save()
        self._settle(pending)
        if self._saved_at != self.step:
            self.save()
        self.model.eval()
        return {"losses": self.losses, "history": self.history, "best": self.best, "plan": asdict(p)}

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over the next `accumulation` batches -> its mean loss (on the device,
        not read back: no host sync)."""
        p, o = self.plan, self.opts
        if self._step_fn is None:
            self._step_fn = wrap_model(TaskLoss(self.model, self.task), self.info, self.device, True, o.compile,
                                       o.compile_mode)
        inner = getattr(self._step_fn, "_orig_mod", self._step_fn)  # under torch.compile
        ddp = inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None
        total = torch.zeros((), device=self.device)
        for m in range(p.accumulation):
            batch = self.task.to_device(next(batches))
            self._seed_dropout(micro_seed(o.seed, self.step, m * p.world + self.info.rank))
            with ddp.no_sync() if ddp is not None and m < p.accumulation - 1 else contextlib.nullcontext():
                with autocast(o):
                    loss = self._step_fn(batch)
                (loss / p.accumulation).backward()
            total += loss.detach().float()
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / p.accumulation

    def _seed_dropout(self, seed: int) -> None:
        """The generator of the model's device only (torch.manual_seed would also queue lazy seeds,
        with a stack trace each, for every other backend)."""
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def _settle(self, pending: list) -> list:
        """The losses of the steps since the last call, averaged over the processes (one host sync):
        a non-finite one stops the run (before any checkpoint holds the weights it made)."""
        if not pending:
            return []
        values = mean_over_processes(torch.stack(pending)).tolist()
        first = self.step - len(values) + 1
        for k, v in enumerate(values):
            if not math.isfinite(v):
                raise FloatingPointError(f"{self.task.name}: loss became {v} at step {first + k}; the checkpoints "
                                         "saved before it are intact (lower --lr, or check the features)")
        self.losses += values
        return []

    def validate(self) -> None:
        """Evaluate `val_split` (all processes), record it, keep the best weights in OUT/best/."""
        o, p = self.opts, self.plan
        if hasattr(self._batches, "pause"):  # a batch-building thread: idle while the main thread evaluates
            self._batches.pause()
        with autocast(o):
            metrics, _ = self.task.evaluate(self.model, o.val_split)
        self.model.train()
        metric = self.task.metric
        if not isinstance(metrics.get(metric), (int, float)):
            raise ValueError(f"--val-split {o.val_split}: evaluation gives no {metric!r} (got {sorted(metrics)}); "
                             "validate on a split with labels, or --val-split none")
        epoch_losses = self.losses[(math.ceil(self.step / p.steps_per_epoch) - 1) * p.steps_per_epoch:]
        record = {"epoch": round(self.step / p.steps_per_epoch, 4), "step": self.step,
                  "train_loss": sum(epoch_losses) / max(1, len(epoch_losses)), **metrics}
        self.history.append(record)
        if self.info.is_main:
            log.info("%s epoch %.2f %s %s: %.4f", self.task.name, record["epoch"], o.val_split, metric, metrics[metric])
        if self.best is None or metrics[metric] > self.best["value"]:
            self.best = {"epoch": record["epoch"], "step": self.step, "split": o.val_split, "metric": metric,
                         "value": metrics[metric]}
            if self.info.is_main:
                save_model_dir(self.model, Path(o.out) / "best", {"task": self.task.name, **self.best,
                                                                   **self.task_metadata()})

    def save(self) -> None:
        self._saved_at = self.step
        if not self.info.is_main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "step": self.step, "rng": rng_state(), "losses": self.losses, "history": self.history,
                 "best": self.best, "settings": self.settings()}
        self.written.add(save_checkpoint(self.root, self.step, self.model, state,
                                         {"task": self.task.name, "step": self.step, **self.task_metadata()},
                                         self.opts.keep_last))

    def drop_weights(self) -> None:
        """--no-save: the run's checkpoints and its OUT/best, nothing else of OUT (a file of the user's
        in OUT/checkpoints, a checkpoint set aside as damaged, stay); OUT/checkpoints if then empty."""
        for path in sorted(self.written):
            shutil.rmtree(path, ignore_errors=True)
        if self.best is not None:  # validated by this run (or by the run it resumed)
            shutil.rmtree(Path(self.opts.out) / "best", ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # only when empty
