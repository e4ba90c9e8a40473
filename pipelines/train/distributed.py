"""Processes: the torchrun environment (`setup_distributed`, `teardown_distributed`), each process's
device, the model as a step runs it (DDP, compile), and how a batch splits into micro-batches over
the processes (`split_batch`), shared by pretraining, fine-tuning and multi-task training."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_ADDR/MASTER_PORT); NCCL on GPU, gloo on
    CPU. A partial or malformed set (WORLD_SIZE without RANK, say) is one ValueError naming what is
    wrong, before any process group is made."""
    env = os.environ

    def number(name: str, default: str | None = None) -> int:
        value = env.get(name, default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"${name}={value!r} is not a whole number (torchrun sets it); run under torchrun, "
                             "or unset WORLD_SIZE") from None

    world = number("WORLD_SIZE", "1")
    if world < 1:
        raise ValueError(f"$WORLD_SIZE={world} is not a number of processes (torchrun sets it >= 1)")
    if world == 1:
        return DistInfo()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         "not: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together; "
                         "run under torchrun, or unset WORLD_SIZE for one process")
    rank, local_rank = number("RANK"), number("LOCAL_RANK", "0")
    if not 0 <= rank < world:
        raise ValueError(f"$RANK={rank} is not one of the {world} processes of WORLD_SIZE={world}")
    info = DistInfo(rank, world, local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info


def teardown_distributed() -> None:
    """The process group set up by setup_distributed, destroyed before exit: under torchrun one left
    to the interpreter's exit can abort the process ('terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: torch.nn.Module, info: DistInfo, device: torch.device, find_unused_parameters: bool,
               compiled: bool = False, compile_mode: str = "default") -> torch.nn.Module:
    """The module as a training step runs it: DDP over the processes (gradients kept in the
    all-reduce buckets), then torch.compile when asked (mode "default" or e.g. "reduce-overhead")."""
    if info.world_size > 1:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: no copy, less memory
    if compiled:
        module = torch.compile(module, mode=None if compile_mode == "default" else compile_mode)
    return module


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def split_batch(batch: int, micro: int | None, world: int,
                names: tuple[str, str] = ("--batch-size", "--micro-batch-size")) -> tuple[int, int]:
    """-> (micro-batch per process, accumulation steps) with micro x accumulation x world == batch
    exactly; without a micro-batch, one pass per process (batch / world). ValueError in the words of
    `names` (the batch and micro-batch options) when the batch cannot be split so: the step would
    silently train on another number of items than the one asked for."""
    B, M = names
    if micro is None:
        if batch % world:
            lower, upper = batch // world * world, -(-batch // world) * world
            raise ValueError(f"{B} {batch} does not divide among {world} processes: give a multiple of {world} "
                             f"({' or '.join(str(n) for n in (lower, upper) if n)}), or a {M}")
        return batch // world, 1
    per_pass = micro * world
    if per_pass > batch:
        raise ValueError(f"{B} {batch} is smaller than {M} {micro} x {world} process(es) = {per_pass} items a step: "
                         f"give a {B} of at least {per_pass} or a smaller {M}")
    if batch % per_pass:
        lower, upper = batch // per_pass * per_pass, -(-batch // per_pass) * per_pass
        raise ValueError(f"{B} {batch} is not a multiple of {M} {micro} x {world} process(es) = {per_pass}: "
                         f"give {B} {lower} or {upper}, or a {M} that divides it")
    return micro, batch // per_pass
