"""Loader throughput: samples/s per worker for the pretraining data pipeline.

Writes its own shards (tests/shards.py: 36 regions, float16 2048-d features, float16 1601-class
distributions, random captions), then times batches in one process (no DataLoader) and through
the torch DataLoader with N workers, with float16 features in the batch (half_features=True, for
a trainer that casts on the GPU) and with the float32 contract (cast in the main process).
Prints a table and writes JSON to benchmarks/results/. The shared machine's load average is
recorded: other processes on the same cores lower every number.

    .venv/bin/python benchmarks/loader_benchmark.py --workers 1 2 --batches 60
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from pipelines.data.loader import DataConfig, PretrainingData, make_loader  # noqa: E402

from shards import write_shards, write_vocab  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches first (per worker)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="DataLoader worker counts")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--shard-dir", type=Path, default=None, help="reuse/keep shards here")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def make_shards(folder: Path, args) -> dict:
    if not (folder / "sizes.json").is_file():
        write_shards(folder, num_shards=args.shards, per_shard=args.samples_per_shard, num_boxes=args.regions)
    tars = sorted(folder.glob("*.tar"))
    samples = sum(json.loads((folder / "sizes.json").read_text()).values())
    size = sum(t.stat().st_size for t in tars)
    return {"shards": len(tars), "samples": samples, "bytes_per_sample": round(size / samples)}


def time_batches(batches, count: int, warmup: int) -> float:
    """samples/s over `count` batches after `warmup` untimed ones."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    samples, start = 0, time.perf_counter()
    for _ in range(count):
        samples += len(next(iterator)["keys"])
    return samples / (time.perf_counter() - start)


def time_tar_read(folder: Path) -> float:
    """Samples/s of reading the shards' tar members alone (no decoding; every page touched): the
    shard read rate of this reader, from the page cache when the shards were just written."""
    from pipelines.data.tario import iter_tar, open_shard
    tars = sorted(folder.glob("*.tar"))
    start, keys = time.perf_counter(), set()
    for tar in tars:
        stream = open_shard(str(tar))
        for name, data in iter_tar(stream):
            keys.add(name.split(".", 1)[0])
            bytes(data[::4096])  # touch every page of the memory map
        stream.close()
    return len(keys) / (time.perf_counter() - start)


def config(folder: Path, vocab: Path, args, workers: int, half: bool = False) -> DataConfig:
    return DataConfig(shards=str(folder), tokenizer=str(vocab), batch_size=args.batch_size,
                      max_regions=args.regions, num_workers=workers, shuffle_buffer=args.shuffle_buffer,
                      samples_per_epoch=10 ** 9, seed=0, half_features=half)


def run(args) -> dict:
    """Rows: the pipeline in this process (what one worker can make, no transfer); N DataLoader
    workers with float16 features in the batch (half_features=True: the trainer casts on the GPU);
    N workers with the float32 contract (the cast happens in this, the main, process)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.shard_dir or Path(tmp) / "shards"
        vocab = write_vocab(Path(tmp) / "vocab.txt")
        disk = make_shards(folder, args)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what each DataLoader worker gets
        single = time_batches(PretrainingData(config(folder, vocab, args, 0)).dataset(), args.batches, args.warmup)
        torch.set_num_threads(threads)
        tar_rate = time_tar_read(folder)
        rows = [{"mode": "tar read (cached)", "workers": 1, "samples_per_s": round(tar_rate),
                 "per_worker": round(tar_rate)},
                {"mode": "in-process, float32", "workers": 1, "samples_per_s": round(single),
                 "per_worker": round(single)}]
        for half in (True, False):
            for workers in args.workers:
                loader = make_loader(config(folder, vocab, args, workers, half))
                total = time_batches(loader, args.batches, args.warmup * workers)
                rows.append({"mode": f"DataLoader, {'float16' if half else 'float32'}", "workers": workers,
                             "samples_per_s": round(total), "per_worker": round(total / workers)})
    for row in rows:  # the shard read rate each row implies
        row["shard_MB_per_s"] = round(row["samples_per_s"] * disk["bytes_per_sample"] / 1e6, 1)
    return {"disk": disk, "rows": rows}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    result.update(machine=machine(), command=" ".join([Path(sys.executable).name] + sys.argv),
                  batch_size=args.batch_size, regions=args.regions, timed_batches=args.batches)
    print(f"shards: {result['disk']['shards']} x {args.samples_per_shard} samples, "
          f"{result['disk']['bytes_per_sample']:,} bytes/sample on disk ({args.regions} regions, float16)")
    print(f"{'mode':<22} {'workers':>8} {'samples/s':>10} {'per worker':>11} {'shard MB/s':>11}")
    for row in result["rows"]:
        print(f"{row['mode']:<22} {row['workers']:>8} {row['samples_per_s']:>10,} {row['per_worker']:>11,} "
              f"{row['shard_MB_per_s']:>11,}")
    print(f"machine: {result['machine']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"loader-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
