"""Batches built in DataLoader workers, for fine-tuning and evaluation alike.

A dataset here returns whole batches (the task's `collate` / `make_batch` of a list of items), so
the DataLoader runs with `batch_size=None`: with `workers` > 0 each batch is made in a worker
process (the feature stores reopened there: their own file handles and a small region cache) and
pinned when the model is on CUDA, so that `Task.to_device` copies it without blocking; with 0, in
a background thread of the main process. Batch k is a function of k alone (its items and, for
training, a generator seeded by its position), so the workers give the same batches as the
thread, in the same order.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch.utils.data import DataLoader, Dataset

WORKER_CACHE = 64  # regions each worker keeps per feature store (4096 x 101 x 2048 floats would be 3.4 GB each)


class ChunkBatches(Dataset):
    """Batch k = build(chunks[k])."""

    def __init__(self, chunks: list, build):
        self.chunks, self.build = chunks, build

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        return self.build(self.chunks[k])


def _reopen_stores(task, worker_id: int) -> None:
    from .features import FeatureStore

    for value in vars(task).values():
        if isinstance(value, FeatureStore):
            value.reopen(cache_size=WORKER_CACHE)


class Prefetched:
    """dataset[0], dataset[1], ... with the next one built in a background thread meanwhile (what
    `workers=0` means: no process to start, the building hidden behind the model). `pause()` waits
    until the thread is idle; it stays so until the next batch is asked for (so the main thread can
    use the tokenizer and feature stores alone, e.g. to validate)."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.next, self.future = dataset, 0, None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return self

    def _submit(self) -> None:
        if self.future is None and self.next < len(self.dataset):
            self.future, self.next = self.pool.submit(self.dataset.__getitem__, self.next), self.next + 1

    def __next__(self):
        self._submit()
        if self.future is None:
            self.pool.shutdown(wait=False)
            raise StopIteration
        batch, self.future = self.future.result(), None
        self._submit()
        if self.future is None:  # that was the last one
            self.pool.shutdown(wait=False)
        return batch

    def pause(self) -> None:
        if self.future is not None:
            wait([self.future])


def batch_loader(dataset: Dataset, task, workers: int, pin: bool):
    """Batches from `workers` DataLoader processes, or with 0 from a background thread
    (`Prefetched`). The DataLoader is given its own generator, so making its iterator never draws
    from the global torch RNG."""
    workers = min(workers, len(dataset))
    if not workers:
        return Prefetched(dataset)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust tokenizer's threads do not survive a fork
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin, prefetch_factor=2,
                      generator=torch.Generator().manual_seed(0),
                      worker_init_fn=functools.partial(_reopen_stores, task))
