"""What the downstream tasks need of torch.distributed: which process this is, a contiguous share of
a list for each process, and the gather that puts the shares back together in order.

Evaluation splits its chunks (the batches a single process would make) into one contiguous share
per process, so that every batch is the one a single process evaluates (the same padding, the same
numbers) and the gathered outputs hold exactly one entry per item in the split's order: no item is
repeated to even out the shares (as `DistributedSampler` would) and none is dropped.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def share(n: int, rank: int, world: int) -> slice:
    """The contiguous part of n things that process `rank` of `world` takes: the first n % world
    processes take one more than the others; together the parts cover 0..n once."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def gather_lists(local: list, total: int | None = None) -> list:
    """Every process's list, concatenated in rank order, on every process. With `total`, a length
    that differs is an error (an item lost or doubled), not a wrong metric."""
    rank, world = rank_world()
    if world == 1:
        out = list(local)
    else:
        parts: list = [None] * world
        dist.all_gather_object(parts, list(local))
        out = [x for part in parts for x in part]
    if total is not None and len(out) != total:
        raise RuntimeError(f"gathered {len(out)} outputs for {total} items (rank {rank} of {world})")
    return out


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over the processes (itself in one process)."""
    if rank_world()[1] == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / rank_world()[1]
