"""Host-memory flatness: process RSS over long extraction, data-loading and training streams.

    .venv/bin/python benchmarks/memory_benchmark.py                      # every stream, CPU, one thread
    .venv/bin/python benchmarks/memory_benchmark.py --streams extract --images 5000

Streams (CPU):
  extract    the extraction pipeline (run_extraction, what vilbert-extract runs; tiny detector, random
             weights) over --images small synthetic JPEGs in a temporary folder, --extract-workers
             decoding processes; RSS sampled every --every-images written samples
  loader-N   the pretraining loader (make_loader(...).forever(), what vilbert-train iterates) on
             shards written by tests/shards.py (36 regions, float16 2048-d features), N DataLoader
             workers (0 = in-process), --samples samples; RSS sampled every --every-batches batches
  train      Trainer.fit with the vilbert-tiny preset for --steps steps of 64 on those shards (1 worker)

Memory is read from /proc/<pid>/status and /proc/<pid>/maps, for this process and (summed) for its
child processes (DataLoader workers; pages forked from this process count in both): VmRSS, its
private part RssAnon (heap: where a leak shows) and its file-backed part RssFile (the loader
memory-maps shards, so samples held in the shuffle buffer keep shard pages mapped; a shard mapped
twice counts twice), and how many shard files are mapped at once. Per stream and process: the values
after warm-up (the first sample past --warmup of the stream), at the end, the maximum, and the
slope in MiB per 1,000 samples over the second half of the stream, both least-squares and robust
(Theil-Sen: the median of the slopes between every two points). A leak tilts both; a transient peak
(glibc keeps a freed block of the heap until it trims it: ~100 MiB now and then in the extraction
stream, before and after any change) tilts a least-squares fit over 20 points by tens of MiB per
1,000 samples, the median not. "Flat" when the robust RssAnon slope is below --flat-threshold
(VmRSS of the loader rises and falls with each virtual epoch of --samples-per-epoch samples, as the
shuffle buffer refills). The trainer's progress bar is hidden.
Prints a table, writes JSON (with every sample point) to benchmarks/results/memory-<UTC time>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common.shard_writer import ShardWriter  # noqa: E402
from pipelines.data.loader import DataConfig, PretrainingData, PretrainingLoader  # noqa: E402

from report import write_json  # noqa: E402
from shards import write_shards, write_vocab  # noqa: E402

MIB = 1024.0


# ----- reading RSS ----------------------------------------------------------------------------

def proc_memory(pid="self") -> dict:
    """VmRSS, RssAnon and RssFile of one process in MiB, and how many shard files (.tar) it has
    memory-mapped ({} if it is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile"):
                    fields[name] = int(value.split()[0]) / MIB  # kB -> MiB
        with open(f"/proc/{pid}/maps") as handle:
            fields["tar_maps"] = sum(1 for line in handle if line.rstrip().endswith(".tar"))
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return fields


def child_pids() -> list:
    pids = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            pids += [int(pid) for pid in open(path).read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(set(pids))


def children_memory() -> dict:
    """proc_memory's fields summed over the live child processes, and their count."""
    total = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0, "tar_maps": 0, "count": 0}
    for pid in child_pids():
        fields = proc_memory(pid)
        if fields:
            for name in ("VmRSS", "RssAnon", "RssFile", "tar_maps"):
                total[name] += fields.get(name, 0)
            total["count"] += 1
    return total


class RssSampler:
    """Records RSS every `every` samples: points of (samples, main and children VmRSS/RssAnon)."""

    def __init__(self, every: int):
        self.every, self.count, self._next = every, 0, every
        self.points: list = []
        self.started = time.perf_counter()

    def tick(self, samples: int = 1) -> None:
        self.count += samples
        if self.count >= self._next:
            main, kids = proc_memory(), children_memory()
            self.points.append(dict(
                samples=self.count, children=kids["count"],
                main=dict(rss=main["VmRSS"], anon=main["RssAnon"], file=main["RssFile"], tar_maps=main["tar_maps"]),
                workers=dict(rss=kids["VmRSS"], anon=kids["RssAnon"], file=kids["RssFile"],
                             tar_maps=kids["tar_maps"])))
            self._next += self.every

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


# ----- summary ---------------------------------------------------------------------------------

def slope_per_1000(xs, ys) -> float:
    """Least-squares slope of ys (MiB) against xs (samples), in MiB per 1,000 samples."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0] * 1000)


def robust_slope_per_1000(xs, ys) -> float:
    """Theil-Sen: the median slope over every pair of points, in MiB per 1,000 samples."""
    if len(xs) < 2:
        return float("nan")
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    i, j = np.triu_indices(len(x), 1)
    distinct = x[j] != x[i]
    return float(np.median((y[j] - y[i])[distinct] / (x[j] - x[i])[distinct]) * 1000)


def summarize(stream: str, sampler: RssSampler, warmup: float, threshold: float) -> list:
    """One row for this process and one for its children (if it had any)."""
    points, total = sampler.points, sampler.count
    after = [p for p in points if p["samples"] >= warmup * total] or points
    second = [p for p in points if p["samples"] >= total / 2]
    rows = []
    for process in ("main", "workers"):
        if process == "workers" and not any(p["children"] for p in after):
            continue
        series = {key: [p[process][key] for p in after] for key in ("rss", "anon", "file", "tar_maps")}
        xs = [p["samples"] for p in second]
        slopes = {key: slope_per_1000(xs, [p[process][key] for p in second]) for key in ("rss", "anon")}
        robust = robust_slope_per_1000(xs, [p[process]["anon"] for p in second])
        rows.append(dict(
            stream=stream, process=process, samples=total, seconds=round(sampler.seconds, 1),
            rss_start_mib=round(series["rss"][0], 1), rss_end_mib=round(series["rss"][-1], 1),
            rss_max_mib=round(max(p[process]["rss"] for p in points), 1),
            slope_mib_per_1000=round(slopes["rss"], 3),
            anon_start_mib=round(series["anon"][0], 1), anon_end_mib=round(series["anon"][-1], 1),
            anon_slope_mib_per_1000=round(slopes["anon"], 3),
            anon_robust_slope_mib_per_1000=round(robust, 3),
            file_min_mib=round(min(series["file"]), 1), file_max_mib=round(max(series["file"]), 1),
            tar_maps_max=max(series["tar_maps"]),
            flat=bool(abs(robust) < threshold)))
    return rows


# ----- the streams ---------------------------------------------------------------------------

def write_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """`count` JPEGs of coloured rectangles on grey, one at a time (none kept in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = np.full((height, width, 3), 180, np.uint8)  # (H, W, 3)
        for _ in range(6):
            x, y = rng.integers(0, width - 8), rng.integers(0, height - 8)
            pixels[y: y + rng.integers(4, height // 2), x: x + rng.integers(4, width // 2)] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"img{index:06d}.jpg", quality=90)
    return folder


class SampledWriter(ShardWriter):
    """The real shard writer, ticking the sampler once per written sample."""

    def __init__(self, *args, sampler: RssSampler, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler = sampler

    def write(self, key, members) -> None:
        super().write(key, members)
        self.sampler.tick()


def extraction_stream(args, tmp: Path) -> RssSampler:
    from extractor.config import get_config
    from extractor.detector import build_detector
    from extractor.pipeline import ExtractionSettings, run_extraction
    from extractor.select import RegionSelector
    from extractor.sources import discover_inputs

    width, height = (int(v) for v in args.image_size.split("x"))
    images = write_images(tmp / "images", args.images, width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = build_detector(get_config("tiny"), None, device="cpu")
    sampler = RssSampler(args.every_images)
    writer = SampledWriter(tmp / "extracted", sampler=sampler, shard_size=args.shard_size)
    settings = ExtractionSettings(batch_size=args.extract_batch_size, workers=args.extract_workers,
                                  progress=False)
    summary = run_extraction(detector, discover_inputs(str(images), exclude=str(tmp / "extracted")),
                             writer, RegionSelector(), settings)
    if summary["failed"]:
        raise RuntimeError(f"extraction failed on {summary['failed']} images: {summary}")
    return sampler


def data_config(shards: Path, vocab: Path, args, workers: int) -> DataConfig:
    return DataConfig(shards=str(shards), tokenizer=str(vocab), batch_size=64, max_regions=36,
                      num_workers=workers, shuffle_buffer=args.shuffle_buffer,
                      samples_per_epoch=args.samples_per_epoch, seed=0)


def loader_stream(args, shards: Path, vocab: Path, workers: int) -> RssSampler:
    """make_loader(...).forever() for --samples samples, as vilbert-train iterates it."""
    loader = PretrainingLoader(PretrainingData(data_config(shards, vocab, args, workers)))
    sampler = RssSampler(64 * args.every_batches)
    batches = loader.forever()
    for batch in batches:
        sampler.tick(len(batch["keys"]))
        del batch
        if sampler.count >= args.samples:
            break
    del batches, loader  # shuts the persistent workers down before the next stream
    gc.collect()
    return sampler


def sampled(batches, sampler: RssSampler):
    for batch in batches:
        sampler.tick(len(batch["keys"]))
        yield batch


def training_stream(args, shards: Path, vocab: Path, tmp: Path) -> RssSampler:
    """Trainer.fit, vilbert-tiny, batch 64 fp32 on CPU, 1 loader worker, no TensorBoard."""
    from pipelines.train.trainer import TrainConfig, Trainer

    data = PretrainingData(data_config(shards, vocab, args, workers=1))
    config = TrainConfig(out=tmp / "run", preset="vilbert-tiny", batch_size=64, micro_batch_size=64,
                         model_overrides={"vocab_size": data.tokenizer.vocab_size, "v_feature_size": 2048},
                         max_steps=args.steps, save_every=10 ** 9, log_every=10, precision="fp32",
                         device="cpu", tensorboard=False)
    trainer = Trainer(config, recipe=data.recipe)
    loader = PretrainingLoader(data)
    sampler = RssSampler(64 * args.every_batches)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # its progress bar
        trainer.fit(sampled(loader.forever(), sampler), samples_per_epoch=loader.samples_per_epoch)
    del loader, trainer
    gc.collect()
    return sampler


def run_streams(args) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        streams = args.streams.split(",")
        if any(s != "extract" for s in streams):
            shards, vocab = tmp / "shards", write_vocab(tmp / "vocab.txt")
            write_shards(shards, num_shards=args.shards, per_shard=args.samples_per_shard, num_boxes=36)
        for stream in streams:
            if stream == "extract":
                sampler = extraction_stream(args, tmp)
            elif stream.startswith("loader-"):
                sampler = loader_stream(args, shards, vocab, int(stream.split("-")[1]))
            elif stream == "train":
                sampler = training_stream(args, shards, vocab, tmp)
            else:
                raise SystemExit(f"unknown stream {stream!r}")
            stream_rows = summarize(stream, sampler, args.warmup, args.flat_threshold)
            for row in stream_rows:
                row["points"] = sampler.points if row["process"] == "main" else None
            rows += stream_rows
            print_rows(stream_rows, header=stream == streams[0])
    return rows


def print_rows(rows: list, header: bool) -> None:
    if header:
        print(f"{'':<27} {'---- VmRSS MiB ----':^32} {'------ RssAnon MiB ------':^33} {'RssFile MiB':^13} {'tar':>4}")
        print(f"{'stream':<10} {'process':<8} {'samples':>7} {'start':>7} {'end':>7} {'max':>7} {'/1k':>8} "
              f"{'start':>7} {'end':>7} {'/1k':>8} {'robust':>8} {'min':>6} {'max':>6} {'maps':>4} {'flat':>5}")
    for r in rows:
        print(f"{r['stream']:<10} {r['process']:<8} {r['samples']:>7} {r['rss_start_mib']:>7.0f} "
              f"{r['rss_end_mib']:>7.0f} {r['rss_max_mib']:>7.0f} {r['slope_mib_per_1000']:>8.3f} "
              f"{r['anon_start_mib']:>7.0f} {r['anon_end_mib']:>7.0f} {r['anon_slope_mib_per_1000']:>8.3f} "
              f"{r['anon_robust_slope_mib_per_1000']:>8.3f} {r['file_min_mib']:>6.0f} {r['file_max_mib']:>6.0f} "
              f"{r['tar_maps_max']:>4} "
              f"{'yes' if r['flat'] else 'NO':>5}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="extract,loader-0,loader-1,train")
    p.add_argument("--images", type=int, default=2000, help="extract: synthetic images")
    p.add_argument("--image-size", default="160x120", help="extract: WIDTHxHEIGHT")
    p.add_argument("--extract-batch-size", type=int, default=4)
    p.add_argument("--extract-workers", type=int, default=1, help="extract: decoding processes")
    p.add_argument("--shard-size", type=int, default=1000, help="extract: samples per written shard")
    p.add_argument("--every-images", type=int, default=50, help="extract: RSS sample interval")
    p.add_argument("--samples", type=int, default=50000, help="loader-N: samples to iterate")
    p.add_argument("--steps", type=int, default=600, help="train: optimizer steps of 64 samples")
    p.add_argument("--every-batches", type=int, default=10, help="loader-N / train: RSS sample interval")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--samples-per-epoch", type=int, default=10000, help="virtual epoch of the loader")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of each stream before 'start'")
    p.add_argument("--flat-threshold", type=float, default=1.0, help="robust RssAnon slope, MiB per 1,000 samples")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run_streams(args)
    settings = {k: str(v) for k, v in vars(args).items()}
    host = dict(cores=os.cpu_count(), load_average_1m=round(os.getloadavg()[0], 2),
                python=platform.python_version())
    path = args.out / f"memory-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    write_json(path, "memory_benchmark.py", argv, "cpu", rows, settings=settings, host=host)
    result = dict(rows=rows, settings=settings, host=host)
    print(f"start: after {args.warmup:.0%} of the stream; /1k: least-squares slope over the second half, MiB per "
          f"1,000 samples; robust: Theil-Sen slope of RssAnon; flat: |robust| < {args.flat_threshold}; tar maps: "
          f"most shard-file mappings at once")
    return result


if __name__ == "__main__":
    main()
