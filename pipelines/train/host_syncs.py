"""Count the ops that make the host wait for the GPU, on any device (CPU included).

On a GPU, CUDA's sync debug mode reports host synchronisations, but CI has no GPU. This counter
sees every op the dispatcher runs and flags the ones whose result the host needs before it can
go on, on any device:

  - a scalar read (`.item()`, `int(t)`, `bool(t)`, `if t:`): `aten::_local_scalar_dense`;
  - an output shape that depends on the data: `nonzero`, boolean-mask indexing (`x[mask]`,
    `x[mask] = v`), `masked_select`, `unique`, `repeat_interleave` without `output_size`,
    `bincount`, `equal`, torchvision's `nms`;
  - a blocking copy from an accelerator to the host (only seen where there is one).

`torch.nonzero_static`, `torch.where(cond, a, b)`, long-index gathers and `masked_fill` are not
flagged: they keep the shapes fixed. What it cannot know on the CPU: which tensors a GPU run keeps
on the host on purpose (torch's non-fused AdamW reads its CPU step counters with `.item()`: counted
here, no wait on a GPU), and `.tolist()` / `.numpy()` / `.cpu()` of a tensor already on the CPU,
which dispatch nothing (not counted here, a wait on a GPU). Ops run inside another op's kernel are
not seen either. So a count of 0 for eager PyTorch code without such calls means no sync; on a
GPU, CUDA's sync debug mode (benchmarks/train_step_benchmark.py `host_syncs`) has the last word. Use::

    with HostSyncCounter() as syncs:
        step()
    syncs.total, syncs.counts  # e.g. 0, Counter() -- or 2, Counter({'aten::nonzero': 2})
    syncs.ops                  # ops that compute, not views (about the GPU kernel launches)
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALWAYS_SYNC = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::argwhere", "aten::masked_select",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive", "aten::bincount", "aten::equal", "torchvision::nms",
})
INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
COPIES = frozenset({"aten::_to_copy", "aten::copy_", "aten::_copy_from"})
# ops that only make tensor metadata or memory, beyond the views (OpOverload.is_view): no kernel
NO_KERNEL = frozenset({"aten::_unsafe_view", "aten::empty", "aten::empty_like", "aten::empty_strided",
                       "aten::scalar_tensor", "aten::lift_fresh", "aten::_local_scalar_dense"})


def _on_host(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu"


def _on_accelerator(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type not in ("cpu", "meta")


def syncs_host(name: str, args: tuple, kwargs: dict) -> bool:
    """True when op `name` (schema name, e.g. "aten::nonzero") with these arguments syncs."""
    if name in ALWAYS_SYNC:
        return True
    if name in INDEXING:  # a boolean mask becomes indices of a data-dependent count
        indices = [i for i in (args[1] if len(args) > 1 else kwargs.get("indices", ())) if i is not None]
        masks = [i for i in indices if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
        value = args[2] if len(args) > 2 else kwargs.get("values")
        if name != "aten::index" and len(indices) == 1 and masks and isinstance(value, torch.Tensor) \
                and value.numel() == 1:
            return False  # `x[mask] = scalar` runs as masked_fill_
        return bool(masks)
    if name == "aten::repeat_interleave":
        repeats = args[0] if len(args) == 1 else args[1]  # .Tensor(repeats) or .self_Tensor(self, repeats)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in COPIES and not kwargs.get("non_blocking", False):
        if name == "aten::_to_copy":
            target = kwargs.get("device")
            return _on_accelerator(args[0]) and target is not None and torch.device(target).type == "cpu"
        return len(args) > 1 and _on_host(args[0]) and _on_accelerator(args[1])
    return False


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode counting host-syncing ops by name (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.ops = 0  # ops that compute (not views, not allocations): about the kernel launches on a GPU
        self._paused = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @contextlib.contextmanager
    def paused(self):
        """Ops run inside are not counted (e.g. reading the host copy of a batch)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if not self._paused:
            self.ops += not func.is_view and name not in NO_KERNEL
            if syncs_host(name, args, kwargs):
                self.counts[name] += 1
        return func(*args, **kwargs)


def count_step_syncs(trainer, model, batch: dict, stats: dict) -> HostSyncCounter:
    """The host-syncing ops of one optimizer step of a `pipelines.train.trainer.Trainer` on `batch`
    (one micro-batch per accumulation step). Counting the masked positions of the host copy of
    the batch (static heads) is host work, not a sync, and is left out."""
    counter = HostSyncCounter()
    host_count = trainer._masked_capacity

    def on_host(host_batch):
        with counter.paused():
            return host_count(host_batch)

    trainer._masked_capacity = on_host
    try:
        with counter:
            trainer._train_step(model, iter([batch] * trainer.accumulation), stats)
    finally:
        del trainer._masked_capacity  # the instance attribute shadowed the method
    return counter
