"""Extraction throughput: images/s of detection + region selection + sample encoding.

    python benchmarks/extract_benchmark.py                       # tiny and r101 on this machine
    python benchmarks/extract_benchmark.py --configs r101 --device cuda --batch-sizes 1,8,16 \
        --precisions fp32,bf16 --images 64

Synthetic 640x480 images (random weights unless --weights: the speed is the same). Prints a table
and writes the rows as JSON to benchmarks/results/extract-<device>-<UTC time>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from extractor.cli import PRECISIONS
from extractor.config import get_config
from extractor.detector import build_detector
from extractor.pipeline import encode_sample, select_regions
from extractor.select import RegionSelector
from extractor.sources import InputRecord


def synthetic_images(count: int, width: int, height: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = np.full((height, width, 3), 180, np.uint8)
        for _ in range(8):
            x, y = rng.integers(0, width - 20), rng.integers(0, height - 20)
            pixels[y: y + rng.integers(10, height // 2), x: x + rng.integers(10, width // 2)] = rng.integers(0, 255, 3)
        images.append(pixels)
    return images


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(detector, images, batch_size: int, device: str) -> float:
    selector = RegionSelector()
    record = InputRecord(key="bench", source="synthetic", path="")
    header = {"detector": detector.config.name, "weights_hash": detector.weights_hash}
    detector([images[0]])  # warm-up (cudnn autotune, allocator)
    _sync(device)
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start: start + batch_size]
        outputs, scales = detector(batch)
        for image, output, scale in zip(batch, outputs, scales):
            boxes, features, probs, attrs = select_regions(output, scale, image.shape[1], image.shape[0], selector)
            encode_sample(record, image.shape[1], image.shape[0], boxes, features, probs, attrs, header)
    _sync(device)
    return len(images) / (time.perf_counter() - started)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,r101")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--images", type=int, default=None, help="default: 16 on GPU, 4 on CPU (r101: 2)")
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the synthetic images")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    for config_name in args.configs.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detector = build_detector(get_config(config_name), args.weights if config_name == "r101" else None,
                                      device=args.device)
        count = args.images or (16 if args.device.startswith("cuda") else (2 if config_name == "r101" else 4))
        images = synthetic_images(count, width, height)
        for precision in args.precisions.split(","):
            detector.autocast_dtype = PRECISIONS[precision]
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                rate = measure(detector, images, batch_size, args.device)
                rows.append(dict(config=config_name, device=args.device, precision=precision,
                                 batch_size=batch_size, images=count, size=args.size,
                                 images_per_second=round(rate, 3)))
                print(f"{config_name:6s} {args.device:8s} {precision:5s} batch {batch_size:3d}  "
                      f"{rate:9.2f} images/s", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = dict(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), device_name=device_name,
                  torch=torch.__version__, threads=torch.get_num_threads(), rows=rows)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"extract-{args.device.replace(':', '')}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
