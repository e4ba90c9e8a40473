"""vilbert-import / vilbert-export throughput: records/s per source format.

Writes a source of each format in its producer's layout (tests/extractor/import_helpers.py: 36
regions of 2048 float32 features by default, as the published features), imports it into shards
(decode, check, float16 encode, tar write), then exports the shards to h5 and butd-tsv. Prints a
table and writes JSON to benchmarks/results/. Disk and page cache count: run it twice and read the
second, or compare formats within one run.

    .venv/bin/python benchmarks/import_benchmark.py --records 200
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "extractor"))
sys.path.insert(0, str(ROOT))

import extractor.pipeline  # noqa: E402, F401  (imported up front: the first import would time its import)
from extractor.import_cli import export_main, main  # noqa: E402

import import_helpers as sources  # noqa: E402

WRITERS = {
    "butd-tsv": lambda folder, images: sources.write_butd_tsv(folder / "feats.tsv", images),
    "lxmert-tsv": lambda folder, images: sources.write_lxmert_tsv(folder / "feats.tsv", images),
    "vilbert-lmdb": lambda folder, images: sources.write_vilbert_lmdb(folder / "feats.lmdb", images),
    "npz": lambda folder, images: sources.write_npz(folder / "feats", images),
    "h5": lambda folder, images: sources.write_volta_h5(folder / "feats.h5", images),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200, help="images per source")
    p.add_argument("--boxes", type=int, default=36, help="regions per image")
    p.add_argument("--dim", type=int, default=2048, help="feature width")
    p.add_argument("--formats", default=",".join(WRITERS), help="comma-separated import formats")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(args) -> list[dict]:
    images = sources.make_images(args.records, dim=args.dim, min_boxes=args.boxes, max_boxes=args.boxes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in args.formats.split(","):
            folder = tmp / fmt
            folder.mkdir()
            src = WRITERS[fmt](folder, [dict(i, image_id=str(100 + n)) if fmt == "butd-tsv" else i
                                        for n, i in enumerate(images)])
            started = time.perf_counter()
            summary = main([str(src), str(folder / "shards"), "--format", fmt, "--quiet"])
            seconds = time.perf_counter() - started
            rows.append({"step": f"import {fmt}", "records": summary["done"], "seconds": round(seconds, 3),
                         "records_per_s": round(summary["done"] / seconds, 1),
                         "source_MB": round(size_of(src) / 1e6, 1)})
        shards = tmp / args.formats.split(",")[0] / "shards"
        for fmt, name in (("h5", "out.h5"), ("butd-tsv", "out.tsv")):
            started = time.perf_counter()
            summary = export_main([str(shards), str(tmp / name), "--format", fmt, "--quiet"])
            seconds = time.perf_counter() - started
            rows.append({"step": f"export {fmt}", "records": summary["exported"], "seconds": round(seconds, 3),
                         "records_per_s": round(summary["exported"] / seconds, 1),
                         "source_MB": round(size_of(shards) / 1e6, 1)})
    return rows


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version()}


def main_benchmark(argv=None) -> dict:
    args = parse_args(argv)
    rows = run(args)
    result = {"rows": rows, "records": args.records, "boxes": args.boxes, "dim": args.dim, "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.executable).name] + sys.argv)}
    print(f"{args.records} images x {args.boxes} regions x {args.dim} features (whole command, timed end to end)")
    print(f"{'step':<22} {'records':>8} {'seconds':>8} {'records/s':>10} {'input MB':>9}")
    for row in rows:
        print(f"{row['step']:<22} {row['records']:>8} {row['seconds']:>8} {row['records_per_s']:>10,} "
              f"{row['source_MB']:>9,}")
    print(f"machine: {result['machine']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"import-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main_benchmark()
