"""The multi-task trainer of `vilbert-multitask` (the schedule and config are `multitask`'s).

Each task keeps its own stream of batches, as `finetune.StepBatches` makes them for a single-task
run: its passes over `task.train_items()` in orders drawn from (the task's seed, its pass), the last
batch of a pass filled up from its start, a batch's random draws and dropout seeded by its place in
the task's stream. So a task's k-th batch is the same whatever the other tasks do, and a run resumed
from OUT/checkpoints/ continues exactly where it was killed (weights, optimizer, schedule, each task's
batches consumed, losses, validations and plateau states are saved after each epoch, every
`save_every` iterations and at the end).

Under torchrun every task's batch is shared as in single-task fine-tuning: micro-batch m of process r
reads slot `m x processes + r` of the batch (its items, random draws and dropout seed those of the
same slot in one process), so a step reads the same items whatever the number of processes. One DDP
module (`TaskLosses`: the model and every task's loss) carries every task's step; its
`find_unused_parameters` lets the heads of the other tasks (no gradient in this task's step) stay
out of the all-reduce, their gradients None as in one process, so AdamW leaves them untouched. The
tasks step together in every process (the schedule and the plateau states are the same
everywhere: a validation's metrics are those rank 0 gathered); losses are averaged over the
processes; rank 0 writes metrics, predictions and checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipelines.train.checkpoints import rng_state, save_checkpoint, set_rng_state
from pipelines.train.distributed import DistInfo, wrap_model
from pipelines.train.optim import build_optimizer, build_scheduler

from .base import Task, autocast, log, write_json
from .distributed import mean_over_processes
from .finetune import StepBatches, TaskLoss, make_plan, micro_seed, resume_from
from .loading import batch_loader
from .multitask import (
    MultiTaskConfig,
    Plateau,
    iterations_per_epoch,
    loss_scales,
    runs_at,
    total_iterations,
    validates_after,
)

STATE_KEYS = ("optimizer", "scheduler", "iteration", "consumed", "losses", "history", "plateau", "rng", "settings")


def task_seed(seed: int, index: int) -> int:
    """The seed of the index-th task's batch stream and dropout."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class TaskLosses(torch.nn.Module):
    """Every task's loss on the one model: `forward(t, batch)` is task t's (finetune.TaskLoss), so that
    a single DDP wrap (one set of all-reduce buckets) serves all the tasks' steps."""

    def __init__(self, model, tasks: list[Task]):
        super().__init__()
        self.model, self.steps = model, torch.nn.ModuleList(TaskLoss(model, t) for t in tasks)

    def forward(self, t: int, batch: dict) -> torch.Tensor:
        return self.steps[t](batch)


def from_rank0(obj):
    """Rank 0's `obj` in every process (itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class MultiTaskTrainer:
    def __init__(self, model, tasks: list[Task], config: MultiTaskConfig, out: Path, device: torch.device,
                 info: DistInfo | None = None, source: str = ""):
        self.model, self.tasks, self.config, self.out, self.device = model, tasks, config, Path(out), device
        self.source = source  # the weights it starts from (the CLI's --checkpoint / --preset ...)
        self.info = info or DistInfo()
        self.items = [t.train_items() for t in tasks]
        plans = [make_plan(t.opts, len(items), self.info.world_size) for t, items in zip(tasks, self.items)]
        self.per_epoch = iterations_per_epoch([p.steps_per_epoch for p in plans])
        self.total = total_iterations(self.per_epoch, config.epochs, config.train_iterations)
        # a task takes at most one batch an iteration: its stream is planned to the end of the run
        self.plans = [dataclasses.replace(p, total_steps=self.total) for p in plans]
        self.lrs = [t.opts.lr for t in tasks]
        self.scales = loss_scales(self.lrs)
        self.base_lr = min(self.lrs)
        self.seeds = [task_seed(config.seed, i) for i in range(len(tasks))]
        self.optimizer = build_optimizer(model, self.base_lr, config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.total, config.warmup)
        self.plateaus = [Plateau(config.plateau_patience, config.plateau_threshold,
                                 config.plateau_continue_threshold, config.plateau_cooldown) for _ in tasks]
        self.iteration, self.consumed = 0, [0] * len(tasks)
        self.losses: list[list] = [[] for _ in tasks]  # per task: [iteration, loss] of each of its batches
        self.history: list[list] = [[] for _ in tasks]
        self.root = self.out / "checkpoints"
        self._saved_at, self._loaders, self._step_fn = -1, None, None

    def settings(self) -> dict:
        """What a resumed run must share with the run it continues."""
        c = self.config
        return {"tasks": [t.name for t in self.tasks], "lrs": self.lrs, "batches": [p.batch for p in self.plans],
                "micro": [p.micro for p in self.plans], "items": [p.items for p in self.plans],
                "iterations": self.total, "iterations_per_epoch": self.per_epoch, "warmup": c.warmup,
                "weight_decay": c.weight_decay, "clip_grad": c.clip_grad, "seed": c.seed, "gap": c.train_iter_gap,
                "plateau": [c.plateau_patience, c.plateau_threshold, c.plateau_continue_threshold,
                            c.plateau_cooldown, list(c.plateau_reset_after_epochs)],
                "max_seq_length": [t.opts.max_seq_length for t in self.tasks], "max_regions": c.max_regions,
                "val_split": [t.opts.val_split for t in self.tasks],
                "heads": [list(t.head() or ()) for t in self.tasks],
                "task_tokens": [self.task_token(t) for t in self.tasks], "model": self.source,
                "task_settings": self.task_settings()}

    def task_token(self, task: Task):
        """The task token id the model reads for `task` (None: a model without task tokens reads none)."""
        if not getattr(getattr(self.model, "config", None), "task_specific_tokens", False):
            return None
        return task.opts.task_token if task.opts.task_token is not None else \
            getattr(task, "shown_task_id", task.official_task_id)

    def task_settings(self) -> dict:
        """Each task's own settings (Task.settings(), where the task has it)."""
        return {t.name: getattr(t, "settings", dict)() for t in self.tasks}

    # -- resume ------------------------------------------------------------------------------
    def resume(self) -> bool:
        found = resume_from(self.root, STATE_KEYS, self.device, self.model, self.optimizer, self.scheduler,
                            self.settings(), "trained")
        if found is None:
            return False
        ckpt, state = found
        self.iteration, self.consumed = state["iteration"], list(state["consumed"])
        self.losses, self.history = state["losses"], state["history"]
        for plateau, s in zip(self.plateaus, state["plateau"]):
            plateau.load(s)
        self._saved_at = self.iteration
        set_rng_state(state["rng"])
        log.info("multi-task: resumed from %s (iteration %d of %d)", ckpt, self.iteration, self.total)
        return True

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        c, rank = self.config, self.info.rank
        for t, task in enumerate(self.tasks):
            p = self.plans[t]
            log.info("%s: %d items, %d batches of %d an epoch (%d x %d x %d processes), lr %.2e, loss x %.3g",
                     task.name, p.items, p.steps_per_epoch, p.batch, p.micro, p.accumulation, p.world, self.lrs[t],
                     self.scales[t])
        log.info("multi-task: %d iterations of %d tasks, %d an epoch, AdamW at lr %.2e", self.total, len(self.tasks),
                 self.per_epoch, self.base_lr)
        # after resume(): DDP starts every process from rank 0's weights, which are the checkpoint's everywhere
        self._step_fn = wrap_model(TaskLosses(self.model, self.tasks), self.info, self.device, True)
        pin = self.device.type == "cuda"
        self._loaders = [batch_loader(StepBatches(task, self.items[t], self.plans[t], self.seeds[t], rank,
                                                  self.consumed[t]), task, c.workers, pin)
                         for t, task in enumerate(self.tasks)]
        batches = [iter(loader) for loader in self._loaders]
        pending, t0, done0 = [], time.perf_counter(), self.iteration
        self.model.train()
        while self.iteration < self.total:
            ran = 0
            for t in range(len(self.tasks)):
                if not runs_at(self.iteration, self.plateaus[t].paused, c.train_iter_gap):
                    continue
                pending.append((t, self.iteration, self.task_step(t, batches[t])))
                if ran == 0:  # as train_tasks.py: the schedule steps after the iteration's first optimizer step
                    self.scheduler.step()
                ran += 1
            if ran == 0:
                self.scheduler.step()
            self.iteration += 1
            it = self.iteration
            epoch_end = it % self.per_epoch == 0 or it == self.total
            evaluate = [t for t, task in enumerate(self.tasks)
                        if task.opts.val_split and validates_after(it, self.plans[t].steps_per_epoch, self.total)]
            save = epoch_end or (c.save_every and it % c.save_every == 0)
            if pending and (evaluate or save or it % c.log_every == 0):
                pending = self._settle(pending)
                rate = (it - done0) / max(time.perf_counter() - t0, 1e-9)
                log.info("iteration %d/%d (epoch %.2f) lr %.2e, %.2f iterations/s: %s", it, self.total,
                         it / self.per_epoch, self.scheduler.get_last_lr()[0], rate,
                         ", ".join(f"{task.name} {self._recent(t):.4f}" for t, task in enumerate(self.tasks)))
            for t in evaluate:
                self.validate(t)
            if it % self.per_epoch == 0 and it // self.per_epoch in c.plateau_reset_after_epochs:
                for plateau in self.plateaus:  # train_tasks.py: the controllers start over after epochs 5 and 7
                    plateau.reset()
            if save:
                self.save()
        self._settle(pending)
        if self._saved_at != self.iteration:
            self.save()
        self.model.eval()
        return self.summary()

    def task_step(self, t: int, batches) -> torch.Tensor:
        """One optimizer step on the next batch of task t (its micro-batches accumulated, then all-reduced
        over the processes), its loss times the task's scale -> this process's unscaled loss (on the
        device)."""
        task, p, c = self.tasks[t], self.plans[t], self.config
        ddp = self._step_fn if isinstance(self._step_fn, torch.nn.parallel.DistributedDataParallel) else None
        total = torch.zeros((), device=self.device)
        for m in range(p.accumulation):
            batch = task.to_device(next(batches))
            seed = micro_seed(self.seeds[t], self.consumed[t], m * p.world + self.info.rank)  # the slot's seed
            torch.default_generator.manual_seed(seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            with ddp.no_sync() if ddp is not None and m < p.accumulation - 1 else contextlib.nullcontext():
                with autocast(task.opts):
                    loss = self._step_fn(t, batch)
                (loss * (self.scales[t] / p.accumulation)).backward()
            total += loss.detach().float()
        if c.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.consumed[t] += 1
        return total / p.accumulation

    def _settle(self, pending: list) -> list:
        if not pending:
            return []
        values = mean_over_processes(torch.stack([loss for _, _, loss in pending])).tolist()  # one host sync
        for (t, it, _), v in zip(pending, values):
            if not math.isfinite(v):
                raise FloatingPointError(f"{self.tasks[t].name}: loss became {v} in iteration {it + 1}; the "
                                         "checkpoints saved before it are intact (lower its lr, or check the features)")
            self.losses[t].append([it, v])
        return []

    def _recent(self, t: int) -> float:
        recent = [v for _, v in self.losses[t][-self.config.log_every:]]
        return sum(recent) / len(recent) if recent else float("nan")

    def validate(self, t: int) -> None:
        """Evaluate task t's val_split (all processes, in shares), feed its plateau controller with rank
        0's metrics (every process pauses alike), write OUT/TASK/metrics.json (rank 0)."""
        task = self.tasks[t]
        for loader in self._loaders or ():
            if hasattr(loader, "pause"):  # the batch-building threads idle while the main thread evaluates
                loader.pause()
        with autocast(task.opts):
            metrics, predictions = task.evaluate(self.model, task.opts.val_split)
        self.model.train()
        metrics = from_rank0(metrics)  # gathered alike in every process; rank 0's decides, to the bit
        value = metrics.get(task.metric)
        if not isinstance(value, (int, float)):
            raise ValueError(f"{task.name}: val_split {task.opts.val_split}: evaluation gives no {task.metric!r} "
                             f"(got {sorted(metrics)}); validate on a split with labels, or val_split: none")
        since = self.history[t][-1]["iteration"] if self.history[t] else 0
        losses = [v for it, v in self.losses[t] if it >= since]
        paused = self.plateaus[t].step(value)
        record = {"iteration": self.iteration, "epoch": round(self.iteration / self.plans[t].steps_per_epoch, 4),
                  "batches": self.consumed[t], "train_loss": sum(losses) / len(losses) if losses else None,
                  **metrics, "paused": paused}
        self.history[t].append(record)
        log.info("%s: epoch %.2f %s %s %.4f%s", task.name, record["epoch"], task.opts.val_split, task.metric, value,
                 " (plateau: now trained every %d iterations)" % self.config.train_iter_gap if paused else "")
        if not self.info.is_main:
            return
        folder = Path(task.opts.out)
        write_json(folder / "metrics.json", {"task": task.name, "val_split": task.opts.val_split,
                                             "metric": task.metric, "history": self.history[t]})
        write_json(folder / f"predictions_{task.opts.val_split}.json", predictions)

    def save(self) -> None:
        self._saved_at = self.iteration
        if not self.info.is_main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "iteration": self.iteration, "consumed": self.consumed, "losses": self.losses,
                 "history": self.history, "plateau": [p.state() for p in self.plateaus], "rng": rng_state(),
                 "settings": self.settings()}
        save_checkpoint(self.root, self.iteration, self.model, state,
                        {"tasks": [t.name for t in self.tasks], "iteration": self.iteration,
                         "task_settings": self.task_settings()}, self.config.keep_last)

    def summary(self) -> dict:
        tasks = {}
        for t, task in enumerate(self.tasks):
            values = [v for _, v in self.losses[t]]
            k = max(1, len(values) // 10)
            tasks[task.name] = {
                "lr": self.lrs[t], "loss_scale": self.scales[t], "batch_size": self.plans[t].batch,
                "steps_per_epoch": self.plans[t].steps_per_epoch, "batches": self.consumed[t],
                "passes": round(self.consumed[t] / self.plans[t].steps_per_epoch, 4),  # over its training items
                "train_loss_first": sum(values[:k]) / k if values else None,
                "train_loss_last": sum(values[-k:]) / k if values else None,
                "metric": task.metric, "val_split": task.opts.val_split, "history": self.history[t]}
        return {"iterations": self.total, "iterations_per_epoch": self.per_epoch, "processes": self.info.world_size,
                "epochs": round(self.total / self.per_epoch, 4), "base_lr": self.base_lr, "tasks": tasks}
