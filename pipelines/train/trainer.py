"""The pretraining loop: one process, many GPUs or many nodes (torchrun), same code.

`Trainer(config).fit(batches)` consumes an endless iterator of batches in the trainer's batch
contract (see `pipelines/data/loader.py`), accumulates gradients up to `batch_size` samples per
optimizer step, and handles precision, DDP, non-finite losses, logging and checkpoints.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from vilbert import ViLBert, load_bert_weights, load_preset
from vilbert.pretraining import default_capacity, predicted_positions

from .checkpoints import (
    check_resumed_settings,
    newest_resumable,
    read_resumable,
    refuse_later_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .distributed import resolve_device, setup_distributed, split_batch, wrap_model
from .metrics import (
    LOSS_SUMS,
    STEP_SUMS,
    MetricsLogger,
    accumulate_step,
    new_step_sums,
    plot_losses,
    read_metrics,
    step_metrics,
)
from .objectives import check_resumed_objective, resolve_objective
from .optim import build_optimizer, build_scheduler

log = logging.getLogger("vilbert.train")
RESUME_KEYS = ("optimizer", "scaler", "step", "samples", "skipped", "scheduler", "rng")


@dataclass
class TrainConfig:
    out: Path = Path("runs/pretrain")
    preset: str = "vilbert-base"
    model_overrides: dict = field(default_factory=dict)  # ViLBertConfig fields on top of the preset
    bert: Path | None = None  # local Hugging Face BERT directory for the text stream
    objective: int | str | None = None  # ViLBERT 0: masked losses on mismatched pairs too; 1: not; 2: no
    # negatives; "vlbert": VL-BERT's; None: the architecture's default (1 / "vlbert"); see objectives.py
    text_corpus: str | None = None  # objective vlbert: the text-only corpus (recorded; the CLI mixes it in)
    text_ratio: float | None = None  # text-only rows per caption row
    text_seq_len: int | None = None
    lr: float = 1e-4
    bert_lr_scale: float = 0.1
    weight_decay: float = 0.01
    warmup: float = 0.1
    batch_size: int = 512  # samples per optimizer step, all processes together
    micro_batch_size: int = 64  # samples per forward pass and process
    epochs: float = 10.0
    samples_per_epoch: int = 0  # 0: the data's own count (sizes.json)
    max_steps: int = 0  # 0: epochs * samples_per_epoch / batch_size
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, ...
    profile_steps: int = 0  # >0: record this many steps (after 5 to warm up) with torch.profiler into OUT/profile
    static_heads: bool | None = None  # fixed-size masked-head selection (no host sync); None: on CUDA or compile
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    nan_policy: str = "skip"  # skip the update, or "stop"
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = True

    def to_json_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


class Trainer:
    def __init__(self, config: TrainConfig, recipe: dict | None = None):
        self.cfg = config
        self.recipe = recipe or {}
        self.dist = setup_distributed(config.device if config.device != "auto" else
                                      ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = resolve_device(config.device, self.dist.local_rank)
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        _, self.accumulation = split_batch(config.batch_size, config.micro_batch_size, self.dist.world_size)
        self.effective_batch = config.batch_size
        self.ckpt_root = Path(config.out) / "checkpoints"

        torch.manual_seed(config.seed)
        self.model, bert_params = self._build_model()
        self.cfg = config = replace(config, objective=resolve_objective(self.model.config.arch, config.objective))
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay, bert_params, config.bert_lr_scale)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.step = 0
        self.samples = 0
        self.skipped = 0
        # Non-finite steps are skipped on the device (the fused optimizer's found_inf) and read back
        # at the next log or save: (step, device flag, batch keys) of the steps since then.
        self._device_skip = not self.scaler.is_enabled() and config.nan_policy == "skip" \
            and bool(self.optimizer.defaults.get("fused"))
        self._pending: list[tuple[int, torch.Tensor, list]] = []
        self.static_heads = config.static_heads if config.static_heads is not None else \
            (self.device.type == "cuda" or config.compile)
        self._scheduler_state = None
        self.resumed_metadata: dict = {}

    # ---- construction ---------------------------------------------------------------------
    def _build_model(self) -> tuple[ViLBert, set[str]]:
        model = ViLBert(load_preset(self.cfg.preset, **self.cfg.model_overrides))
        bert_params: set[str] = set()
        if self.cfg.bert:
            report = load_bert_weights(model, self.cfg.bert)
            bert_params = set(report.loaded)
            if self.dist.is_main:
                log.info("BERT %s: %s", self.cfg.bert, report.summary())
        return model.to(self.device), bert_params

    def total_steps(self, samples_per_epoch: int) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        n = self.cfg.samples_per_epoch or samples_per_epoch
        if n <= 0:
            raise ValueError("samples per epoch unknown: pass --samples-per-epoch or --max-steps")
        return max(1, math.ceil(self.cfg.epochs * n / self.effective_batch))

    def resume(self, path: Path | None = None) -> bool:
        """Continue from checkpoint `path`, or else the newest complete one under OUT/checkpoints,
        if any: weights, optimizer, scheduler, scaler, counters and RNG states. Call before building
        the data stream, so that it can be seeded with the resumed step."""
        if path:
            found = read_resumable(Path(path), RESUME_KEYS, self.device)
            if isinstance(found, str):
                raise ValueError(found)
            refuse_later_checkpoints(self.ckpt_root, Path(path), int(found[2]["step"]))
        else:
            found = newest_resumable(self.ckpt_root, RESUME_KEYS, self.device, log)
            if found is None:
                return False
        ckpt, model, state = found
        saved, current = model.config.to_dict(), self.model.config.to_dict()
        differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
                  for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if differ:
            raise ValueError(f"{ckpt}: the checkpoint's model config differs from this run's ("
                             + "; ".join(differ) + "); use the same --preset/--set, or another --out")
        check_resumed_objective(ckpt, getattr(model, "checkpoint_metadata", {}), self.cfg.objective)
        check_resumed_settings(ckpt, getattr(model, "checkpoint_metadata", {}), self.cfg.to_json_dict())
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.samples, self.skipped = state["step"], state["samples"], state["skipped"]
        self._scheduler_state = state["scheduler"]
        self.resumed_metadata = getattr(model, "checkpoint_metadata", {})
        set_rng_state(state["rng"])
        if self.dist.is_main:
            log.info("resumed from %s (step %d)", ckpt, self.step)
        return True

    # ---- one optimizer step -----------------------------------------------------------------
    def _forward(self, model, batch: dict):
        capacity = self._masked_capacity(batch)
        tensors = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        for k, v in tensors.items():  # float16 features (DataConfig.half_features) are cast here, on the device
            if v.dtype == torch.float16:
                tensors[k] = v.float()
        targets = tensors.get("region_targets")
        if capacity and targets is not None and targets.dim() == 2 and len(targets) < capacity[1]:
            # compact targets (M, C) padded to the region capacity: one shape for compiled code
            tensors["region_targets"] = torch.nn.functional.pad(targets, (0, 0, 0, capacity[1] - len(targets)))
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = model(**tensors, mask_loss_on_mismatch=self.cfg.objective == 0, masked_capacity=capacity,
                        objective="vlbert" if self.cfg.objective == "vlbert" else "vilbert")
        return out, tensors

    def _masked_capacity(self, batch: dict) -> tuple[int, int] | None:
        """Fixed head sizes (tokens, regions) for static_heads, or None. With torch.compile (or a
        batch already on the device): default_capacity, one shape per batch shape (positions past
        it are dropped and counted as masked_overflow, about once in 10^9 batches). Otherwise the
        host batch is counted on the host (exact, no device sync) and rounded up to a bucket."""
        if not self.static_heads:
            return None
        lm, regions = batch["lm_labels"], batch["region_labels"]
        if self.cfg.compile or lm.device.type != "cpu":
            return default_capacity(lm.numel()), default_capacity(regions.numel())
        tokens, masked = predicted_positions(lm, regions, batch["align_labels"], self.cfg.objective == 0)
        return bucket_size(int(tokens.sum()), lm.numel()), bucket_size(int(masked.sum()), regions.numel())

    def _train_step(self, model, batches: Iterator[dict], stats: dict) -> None:
        keys = []
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for micro in range(self.accumulation):
            t0 = time.perf_counter()
            batch = next(batches)
            stats["data_wait_s"] += time.perf_counter() - t0
            keys += list(batch.get("keys", []))
            sync = micro == self.accumulation - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                out, tensors = self._forward(model, batch)
                finite &= torch.isfinite(out.loss.detach())
                self.scaler.scale(out.loss / self.accumulation).backward()
            accumulate_step(stats, out, tensors)
        if self.dist.world_size > 1:  # every rank must agree to skip
            flag = finite.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        if self._device_skip:
            self._device_step(finite, keys)
            return
        if not bool(finite):  # host sync: the step is known bad here (nan_policy "stop", fp16, no fused optimizer)
            self._record_skip(self.step + 1, keys)
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _device_step(self, finite: torch.Tensor, keys: list) -> None:
        """Clip and update with no host sync: a non-finite loss or gradient norm sets the fused
        optimizer's found_inf, which skips the update on the device (as GradScaler does)."""
        if self.cfg.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            finite = finite & torch.isfinite(norm)
        bad = (~finite).float()
        self.optimizer.found_inf = bad
        self.optimizer.step()
        del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self._pending.append((self.step + 1, bad, keys[:20]))

    def _settle_skips(self) -> None:
        """Read the skip flags of the steps since the last call (one host sync) and report them."""
        if not self._pending:
            return
        flags = torch.stack([bad for _, bad, _ in self._pending]).tolist()
        for (step, _, keys), bad in zip(self._pending, flags):
            if bad:
                self._record_skip(step, keys)
        self._pending = []

    def _record_skip(self, step: int, keys: list) -> None:
        self.skipped += 1
        msg = f"non-finite loss at step {step}; batch keys: {keys[:20]}"
        if self.cfg.nan_policy == "stop":
            raise FloatingPointError(msg)
        log.warning("%s (update skipped)", msg)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self, batches: Iterator[dict], samples_per_epoch: int = 0) -> dict:
        total = self.total_steps(samples_per_epoch)
        scheduler = build_scheduler(self.optimizer, total, self.cfg.warmup)
        if self._scheduler_state is not None:
            scheduler.load_state_dict(self._scheduler_state)
            for group, lr in zip(self.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr  # building the scheduler reset them to step 0's values
        # parameters without a gradient in some steps: the skipped co-attention layers; VL-BERT's
        # mask / text-only embeddings (used only with masked regions / text-only rows)
        unused = not self.model.config.with_coattention or self.model.config.arch == "vlbert"
        model = wrap_model(self.model, self.dist, self.device, unused, self.cfg.compile, self.cfg.compile_mode)
        model.train()
        logger = MetricsLogger(self.cfg.out, self.step, self.cfg.tensorboard) if self.dist.is_main else None
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=not self.dist.is_main)
        stats, t_log, last = new_step_sums(self.device), time.perf_counter(), {}
        batches = iter(batches)
        profiler = self._profiler()
        try:
            while self.step < total:
                self._train_step(model, batches, stats)
                profiler.step()
                scheduler.step()
                self.step += 1
                self.samples += self.effective_batch
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == total:
                    last = self._log(stats, t_log, scheduler, logger, bar)
                    stats, t_log = new_step_sums(self.device), time.perf_counter()
                if self.step % self.cfg.save_every == 0 or self.step == total:
                    self.save(scheduler)
        finally:
            profiler.stop()
            bar.close()
            if logger is not None:
                logger.close()
                if read_metrics(logger.csv_path):
                    plot_losses(logger.csv_path, Path(self.cfg.out) / "loss_curves.png")
        return last

    def _profiler(self):
        """torch.profiler over `profile_steps` steps after 5 warm-up steps (main process), written
        for TensorBoard / chrome://tracing to OUT/profile; a no-op object otherwise."""
        if not (self.cfg.profile_steps > 0 and self.dist.is_main):
            return _NoProfiler()
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        prof = profile(activities=activities, schedule=schedule(wait=4, warmup=1, active=self.cfg.profile_steps),
                       on_trace_ready=tensorboard_trace_handler(str(Path(self.cfg.out) / "profile")))
        prof.start()
        return prof

    @torch.no_grad()
    def evaluate(self, batches) -> dict:
        """Mean losses and accuracies over one pass of `batches` (all processes together)."""
        self.model.eval()
        stats = new_step_sums(self.device)
        for batch in batches:
            out, tensors = self._forward(self.model, batch)
            accumulate_step(stats, out, tensors)
        self.model.train()
        vals = torch.stack([stats[k] for k in STEP_SUMS]
                           + [torch.tensor(float(stats["micro_steps"]), device=self.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(vals)
        sums = dict(zip(STEP_SUMS + ("micro_steps",), vals.tolist()))
        n = max(1.0, sums["micro_steps"])
        return {**{k: sums[k] / n for k in LOSS_SUMS}, **step_metrics(sums), "samples": sums["align_total"]}

    def _log(self, stats, t_log, scheduler, logger, bar) -> dict:
        self._settle_skips()
        n = max(1, stats["micro_steps"])
        vals = torch.stack([stats[k] for k in STEP_SUMS])
        if self.dist.world_size > 1:
            dist.all_reduce(vals)
            vals[:len(LOSS_SUMS)] /= self.dist.world_size  # the losses come first
        sums = dict(zip(STEP_SUMS, vals.tolist()))
        elapsed = time.perf_counter() - t_log
        row = {
            "step": self.step, "samples": self.samples, **{k: sums[k] / n for k in LOSS_SUMS}, **step_metrics(sums),
            "lr": scheduler.get_last_lr()[-1], "samples_per_s": sums["align_total"] / max(elapsed, 1e-9),
            "data_wait_s": stats["data_wait_s"], "skipped_steps": self.skipped, "masked_overflow": sums["overflow"],
        }
        if logger is not None:
            logger.log(row)
            shown = ("mrc", "mrc_accuracy") if self.cfg.objective == "vlbert" else ("align", "align_accuracy")
            bar.set_postfix({"loss": f"{row['loss']:.3f}", shown[0]: f"{row.get(shown[1], float('nan')):.2f}",
                             "sps": f"{row['samples_per_s']:.0f}"})
        return row

    def save(self, scheduler) -> Path | None:
        self._settle_skips()
        if not self.dist.is_main:
            return None
        state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "samples": self.samples,
            "skipped": self.skipped, "rng": rng_state(),
        }
        meta = {"train_config": self.cfg.to_json_dict(), "feature_recipe": self.recipe, "step": self.step}
        path = save_checkpoint(self.ckpt_root, self.step, self.model, state, meta, self.cfg.keep_last)
        csv_path = Path(self.cfg.out) / "metrics.csv"
        if csv_path.exists() and read_metrics(csv_path):  # keep the curves current in long runs
            plot_losses(csv_path, Path(self.cfg.out) / "loss_curves.png")
        return path


class _NoProfiler:
    def step(self) -> None:
        pass

    def stop(self) -> None:
        pass


def bucket_size(count: int, positions: int) -> int:
    """count rounded up to a multiple of max(8, positions / 64) (at most positions, at least 8)."""
    step = max(8, positions // 64 // 8 * 8)
    return min(positions, max(step, -(-count // step) * step))
