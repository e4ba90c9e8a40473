"""Streaming pretraining data: region-feature WebDataset shards -> padded, masked batches.

    loader = make_loader(DataConfig(shards="shards/", tokenizer="bert-base-uncased/"), train=True)
    trainer = Trainer(train_config, recipe=loader.recipe)
    trainer.fit(loader.forever(), samples_per_epoch=loader.samples_per_epoch)

Training resamples shards (with replacement, per worker) in virtual epochs of `samples_per_epoch`
(default: the sum of sizes.json). Evaluation reads every shard once: a deterministic shard
shuffle, then split by node and by DataLoader worker. The batch contract is documented in
`pipelines/data/batching.py`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import torch
import webdataset as wds

from .batching import BatchBuilder
from .samples import decode_samples, read_shards
from .shards import (
    ErrorCounter,
    count_samples,
    expand_shards,
    read_recipe,
    refuse_without_class_targets,
    region_widths,
    uncounted,
)
from .tokenization import CaptionTokenizer, load_tokenizer


@dataclass
class DataConfig:
    shards: object  # directory, brace pattern, pipe: URL, or a list of them
    tokenizer: str  # directory with a BERT tokenizer / vocab.txt, or a vocab.txt
    batch_size: int = 64  # samples per batch and process
    max_seq_len: int = 36
    max_regions: int = 36
    objective: int | str = 1  # 0, 1, 2 or "vlbert", see batching.OBJECTIVES
    samples_per_epoch: int = 0  # training; 0: the sum of sizes.json
    shuffle_buffer: int = 1000  # samples per worker (about 0.27 MB each with 36 regions)
    caption_pool: int = 1024  # recent captions per worker to draw negatives from
    num_workers: int = 4
    pin_memory: bool = True  # only takes effect with CUDA
    prefetch_factor: int = 2
    seed: int | None = None  # None: fresh randomness each run (training)
    eval_seed: int = 0  # shard order and masks of evaluation passes
    allow_mixed_recipes: bool = False
    half_features: bool = False  # True: image_feat/region_targets stay float16; cast them on the device


class NoUsableSamples(RuntimeError):
    """Every shard was read and none holds a usable (captioned, well-formed) sample."""


class StarvationGuard:
    """Training resamples shards forever, so shards without a single usable sample (all corrupt,
    or none captioned) would keep it reading without ever making a batch. This guard sits on both
    ends of the decoding: it records the distinct shards opened and the samples decoded, and once
    every shard has been opened without one sample, the next shard raises NoUsableSamples."""

    def __init__(self, urls: list[str], errors: ErrorCounter):
        self.urls, self.errors = set(urls), errors
        self.opened: set[str] = set()
        self.samples = 0

    def shards(self, source: Iterator[dict]) -> Iterator[dict]:
        for shard in source:
            if not self.samples:
                if self.opened >= self.urls:
                    counts = ", ".join(f"{k} {v}" for k, v in self.errors.counts().items())
                    raise NoUsableSamples(
                        f"all {len(self.urls)} shard(s) were read and none holds a usable sample (skipped: "
                        f"{counts}); nothing to train on. Captions come from a KEY.txt beside each image, "
                        "vilbert-extract --captions FILE.tsv, or the .txt inside img2dataset shards")
                self.opened.add(shard["url"])
            yield shard

    def decoded(self, source: Iterator) -> Iterator:
        for sample in source:
            self.samples += 1
            yield sample


def _split(rank: int | None, world_size: int | None):
    """Split a shard stream by node: explicit rank/world_size, else torch.distributed / env."""
    if rank is None or world_size is None:
        return wds.split_by_node
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return lambda src: islice(src, rank, None, world_size)


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    info = wds.utils.pytorch_worker_info()
    return info[0], info[1]


class PretrainingData:
    """Builds the webdataset pipeline once the shards, recipe and tokenizer are checked."""

    def __init__(self, cfg: DataConfig, train: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        self.cfg, self.train = cfg, train
        self.rank, self.world_size = _world(rank, world_size)
        self.node_split = _split(rank, world_size)
        self.urls = expand_shards(cfg.shards)
        self.recipe = read_recipe(self.urls, cfg.allow_mixed_recipes)
        refuse_without_class_targets(self.urls)
        # (F, C) of the first readable sample, and its shard: a sample of other widths is skipped, not
        # batched. No readable shard at all: None and why (the stream then stops with its own reason)
        try:
            self.widths, self.widths_source = region_widths(self.urls)
        except ValueError as error:
            self.widths, self.widths_source = None, str(error)
        self.samples_per_epoch = cfg.samples_per_epoch or count_samples(self.urls) or 0
        if train and not self.samples_per_epoch:
            raise ValueError(f"{cfg.shards!r}: no sample count ({uncounted(self.urls) or 'sizes.json'}); pass "
                             "--samples-per-epoch")
        self.tokenizer = CaptionTokenizer(load_tokenizer(cfg.tokenizer), cfg.max_seq_len)
        self.errors = ErrorCounter()

    def batches_per_worker(self) -> int:
        workers = max(1, self.cfg.num_workers)
        return math.ceil(self.samples_per_epoch / (self.cfg.batch_size * self.world_size * workers))

    def builder(self) -> BatchBuilder:
        cfg = self.cfg
        seed = cfg.eval_seed if not self.train else cfg.seed
        return BatchBuilder(self.tokenizer, cfg.max_regions, cfg.objective, seed=seed,
                            deterministic=not self.train, pool_size=cfg.caption_pool,
                            half_output=cfg.half_features)

    def dataset(self) -> wds.DataPipeline:
        cfg = self.cfg
        expected = None if cfg.allow_mixed_recipes else self.recipe
        decode = decode_samples(self.errors, cfg.max_regions, expected, self.widths)
        guard = StarvationGuard(self.urls, self.errors)
        if self.train:
            source = [wds.ResampledShards(self.urls, seed=cfg.seed or 0, deterministic=cfg.seed is not None),
                      guard.shards]
            shuffle = ([wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, seed=cfg.seed)]
                       if cfg.shuffle_buffer > 1 else [])  # seed None: fresh randomness
        else:
            source = [wds.SimpleShardList(self.urls, seed=cfg.eval_seed), self.node_split, wds.split_by_worker]
            shuffle = []
        pipeline = wds.DataPipeline(
            *source,
            read_shards(self.errors),
            decode,
            *([guard.decoded] if self.train else []),
            *shuffle,
            wds.batched(cfg.batch_size, collation_fn=self.builder(), partial=not self.train),
        )
        return pipeline.with_epoch(self.batches_per_worker()) if self.train else pipeline


class PretrainingLoader:
    """A torch DataLoader over the pipeline (batches are made in the workers), plus what the
    trainer records: `recipe`, `samples_per_epoch`, and `error_counts()` of skipped data."""

    def __init__(self, data: PretrainingData):
        self.data, self.cfg = data, data.cfg
        workers = data.cfg.num_workers
        self.pin = data.cfg.pin_memory and torch.cuda.is_available()
        self.loader = torch.utils.data.DataLoader(
            data.dataset(), batch_size=None, num_workers=workers, pin_memory=self.pin,
            persistent_workers=workers > 0 and data.train,
            prefetch_factor=data.cfg.prefetch_factor if workers > 0 else None,
        )

    @property
    def recipe(self) -> dict:
        return self.data.recipe

    @property
    def samples_per_epoch(self) -> int:
        return self.data.samples_per_epoch

    def error_counts(self) -> dict[str, int]:
        return self.data.errors.counts()

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            if not self.cfg.half_features:  # workers send float16 (half the bytes); the contract is float32
                for name in ("image_feat", "region_targets"):
                    if batch[name].dtype == torch.float16:
                        batch[name] = torch.empty(batch[name].shape, pin_memory=self.pin).copy_(batch[name])
            yield batch

    def forever(self) -> Iterator[dict]:
        """Endless batches: virtual epoch after virtual epoch (training)."""
        return itertools.chain.from_iterable(itertools.repeat(self))


def make_loader(cfg: DataConfig, train: bool = True, rank: int | None = None,
                world_size: int | None = None) -> PretrainingLoader:
    """The loader for training (`train=True`) or one evaluation pass (`train=False`).
    rank/world_size default to torch.distributed (or RANK/WORLD_SIZE)."""
    return PretrainingLoader(PretrainingData(cfg, train, rank, world_size))
