"""What every downstream task shares: options, the task interface, the fine-tuning loop, model
loading (ours or an official checkpoint) and result writing.

A task class implements `head` (the task head it needs, or None), `train_batch`, `loss` and
`evaluate`; `pipelines.tasks.TASKS` maps the CLI name to the class. Adding a task (VCR, NLVR2,
SNLI-VE) means a new module and one dict entry; nothing else changes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("vilbert.eval")


@dataclass
class TaskOptions:
    data: Path  # annotation folder of the task
    features: Path  # vilbert-extract shards
    out: Path  # results, predictions, fine-tuned checkpoint
    tokenizer: Path | None = None  # BERT tokenizer directory or vocab.txt
    max_seq_length: int | None = None  # None = the task's default
    max_regions: int = 101  # including [IMG]
    batch_size: int = 32
    eval_batch_size: int = 128
    train_steps: int = 0  # 0 = evaluate only
    lr: float | None = None  # None = the task's default
    warmup: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    splits: tuple[str, ...] = ()  # evaluation splits; () = the task's defaults
    task_token: int | None = None  # vilbert-multi-task task id, used only by models with task tokens
    log_every: int = 50
    bf16: bool = False  # bfloat16 autocast on CUDA
    extra: dict = field(default_factory=dict)  # task-specific options (see each task's docstring)


class Task:
    """Interface of a downstream task. Subclasses set `name`, `default_splits`, `official_task_id`."""

    name = "task"
    default_splits: tuple[str, ...] = ()
    official_task_id = 0
    default_lr = 2e-5  # vilbert-multi-task's per-task settings (vilbert_tasks.yml)
    default_max_seq_length = 20

    def __init__(self, opts: TaskOptions):
        self.opts = opts
        if opts.lr is None:
            opts.lr = self.default_lr
        if opts.max_seq_length is None:
            opts.max_seq_length = self.default_max_seq_length

    # -- to implement --------------------------------------------------------------------
    def head(self) -> tuple[str, str, int] | None:
        """(head name, kind, size) this task trains and reads, or None."""
        return None

    def train_batch(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, split: str) -> tuple[dict, list]:
        """-> (metrics, predictions)"""
        raise NotImplementedError

    def eval_inputs(self, split: str) -> list | None:
        """The items `evaluate` reads for `split`, with their annotations and features checked:
        raises, naming the file and reason, if the split cannot be evaluated. Also called for every
        evaluation split before fine-tuning starts, so that a mistake is not found hours later
        (None: the task checked its splits when it was built)."""
        return None

    # -- shared ---------------------------------------------------------------------------
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
        """Give the model this task's head (a fresh one unless it already has a matching one)."""
        spec = self.head()
        if spec is None:
            return
        name, kind, n = spec
        have = model.task_heads.spec.get(name)
        if have is None:
            model.task_heads.add(model.config, name, kind, n)
            log.info("added a new %s head %r with %d outputs", kind, name, n)
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
        return {k: v.to(self.opts.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(opts: TaskOptions):
    """bfloat16 autocast on CUDA when asked (`--bf16`), else a no-op context."""
    on_cuda = str(opts.device).startswith("cuda")
    return torch.autocast("cuda" if on_cuda else "cpu", dtype=torch.bfloat16, enabled=opts.bf16 and on_cuda)


def finetune(model, task: Task, opts: TaskOptions) -> list[float]:
    """AdamW (no decay on biases/LayerNorm) with linear warmup and decay, gradient clipping 1.0.
    The next batch is built in a background thread while the model trains on the current one."""
    if opts.train_steps <= 0:
        return []
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(opts.seed)  # used by the one worker thread only
    torch.manual_seed(opts.seed)
    opt = build_optimizer(model, opts.lr, opts.weight_decay)
    sched = build_scheduler(opt, opts.train_steps, opts.warmup)
    model.train()
    losses, t0 = [], time.time()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(task.train_batch, rng)
        for step in range(opts.train_steps):
            batch = pending.result()
            if step + 1 < opts.train_steps:
                pending = pool.submit(task.train_batch, rng)
            with autocast(opts):
                loss = task.loss(model, task.to_device(batch))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{task.name}: loss became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if opts.log_every and (step + 1) % opts.log_every == 0:
                recent = losses[-opts.log_every:]
                log.info("%s step %d/%d loss %.4f lr %.2e (%.1fs)", task.name, step + 1, opts.train_steps,
                         sum(recent) / len(recent), sched.get_last_lr()[0], time.time() - t0)
    model.eval()
    return losses


def batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({what}): {e}") from e
