r"""Extraction throughput: images/s of detection + region selection + sample encoding; with
--compare-precision, the accuracy of bf16 / fp16 autocast against fp32 instead.

    python benchmarks/extract_benchmark.py                       # tiny and r101 on this machine
    python benchmarks/extract_benchmark.py --configs r101 --device cuda --batch-sizes 1,8,16 \
        --precisions fp32,bf16 --memory-formats contiguous,channels_last --images 64 --size 1000x600
    python benchmarks/extract_benchmark.py --configs r101 --device cuda --weights faster_rcnn_from_caffe.pkl \
        --compare-precision bf16,fp16 --images 16
    python benchmarks/extract_benchmark.py --configs r101 --images 2 --size 320x240 --threads 1 \
        --compare-precision fp16 --test-size 240,400 --proposals 50   # fp16 on CPU: slow reference kernels

Synthetic 640x480 images (random weights unless --weights: the speed is the same). Prints a table
and writes JSON to benchmarks/results/extract-<device>-<UTC time>.json. Each row also
counts, on its first batch, the FLOPs per image (torch.utils.flop_counter: detector, all proposals
through the res5 head) and so the TFLOP/s reached and its share of the device's dense bf16 peak
(benchmarks/peak.py: the data sheet on a known GPU, the measured matmul rate on a CPU; 40 images/s of
R101-C4 at 1000x600 is 7.9 % of an H100's 989 TFLOP/s), and the ops per image that make the host wait for
the GPU (pipelines/train/host_syncs.py; device-to-host copies are only seen on a GPU).

--compare-precision runs the same images in fp32 and in each given precision. Feature drift is
measured on the SAME boxes (the fp32-selected ones, fed back through the fixed-box path that
--gt-boxes uses), separately from box drift (the selected boxes of the normal detection path that
have an fp32-selected box at IoU > 0.9). The row "fp32 (fixed vs detected)" checks that the
fixed-box path reproduces the detection path's fp32 features. Random weights (no --weights) make
this a plumbing check only: the drift that matters is the one of the real weights. Results go to
benchmarks/results/extract-precision-<device>-<UTC time>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import box_iou

from extractor.cli import PRECISIONS
from extractor.config import get_config
from extractor.detector import build_detector
from extractor.pipeline import encode_sample, select_regions
from extractor.select import RegionSelector
from extractor.sources import InputRecord
from pipelines.train.host_syncs import HostSyncCounter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak import bf16_peak
from report import time_profile, write_json


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


def run_batch(detector, batch, selector: RegionSelector | None = None) -> list[tuple]:
    """Detection and region selection of one batch, as extraction runs them. -> per image,
    select_regions' (boxes, features, class distributions, attributes)."""
    selector = selector or RegionSelector.for_recipe(detector.config.recipe)
    outputs, scales = detector(batch)
    return [select_regions(output, scale, image.shape[1], image.shape[0], selector)
            for image, output, scale in zip(batch, outputs, scales)]


DETECTOR_PARTS = ("backbone", "proposal_generator", "roi_heads")


def count_per_image(detector, images, batch_size: int) -> tuple[float, dict, float]:
    """Detection + selection of one batch: (GFLOP per image, GFLOP per image of each of the
    detector's parts, host-syncing ops per image)."""
    batch = images[:batch_size]
    with FlopCounterMode(display=False) as flops, HostSyncCounter() as syncs:
        run_batch(detector, batch)
    counts = flops.get_flop_counts()  # by module path, e.g. "BottomUpDetector.backbone"
    parts = {part: round(sum(counts.get(f"{type(detector).__name__}.{part}", {}).values()) / 1e9 / len(batch), 3)
             for part in DETECTOR_PARTS}
    return flops.get_total_flops() / 1e9 / len(batch), parts, syncs.total / len(batch)


def measure(detector, images, batch_size: int, device: str) -> float:
    selector = RegionSelector.for_recipe(detector.config.recipe)
    record = InputRecord(key="bench", source="synthetic", path="")
    header = {"detector": detector.config.name, "weights_hash": detector.weights_hash}
    detector([images[0]])  # warm-up (cudnn autotune, allocator)
    _sync(device)
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start: start + batch_size]
        for image, (boxes, features, probs, attrs) in zip(batch, run_batch(detector, batch, selector)):
            encode_sample(record, image.shape[1], image.shape[0], boxes, features, probs, attrs, header)
    _sync(device)
    return len(images) / (time.perf_counter() - started)


# ----- --compare-precision: lower precisions against fp32 on the same images -------------------

def detect_and_select(detector, images, selector: RegionSelector, dtype):
    """The normal path in `dtype`. -> per image (selected boxes (N_i, 4) original pixels,
    their features (N_i, D)), as CPU float32 tensors."""
    detector.autocast_dtype = dtype
    outputs, scales = detector(images)
    selected = []
    for image, output, scale in zip(images, outputs, scales):
        boxes, features, _, _ = select_regions(output, scale, image.shape[1], image.shape[0], selector)
        selected.append((torch.from_numpy(boxes), torch.from_numpy(features).float()))
    return selected


def on_fixed_boxes(detector, images, boxes, dtype):
    """The fixed-box path (as --gt-boxes) in `dtype` on per-image boxes [(N_i, 4)] in original
    pixels. -> features (sum N_i, D), class distributions (sum N_i, C+1), CPU float32."""
    detector.autocast_dtype = dtype
    outputs, _ = detector(images, [b.numpy() for b in boxes])
    features = torch.cat([o.features.float().cpu() for o in outputs])
    probs = torch.cat([o.cls_probs.float().cpu() for o in outputs])
    return features, probs


def feature_drift(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """reference, other (N, D) features of the same boxes."""
    diff = (other - reference).abs()
    cosine = F.cosine_similarity(other, reference, dim=1)  # (N,)
    return dict(feature_max_abs_diff=diff.max().item(), feature_mean_abs_diff=diff.mean().item(),
                fp32_feature_max_abs=reference.abs().max().item(),
                cosine_mean=cosine.mean().item(), cosine_min=cosine.min().item())


def class_drift(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """reference, other (N, C+1) class distributions of the same boxes."""
    return dict(cls_prob_max_abs_diff=(other - reference).abs().max().item(),
                top1_class_agreement=(other.argmax(1) == reference.argmax(1)).float().mean().item())


def box_match(reference: list, other: list, threshold: float = 0.9) -> dict:
    """Fraction of the fp32-selected boxes with a selected box of `other` at IoU > threshold."""
    matched = total = 0
    for ref_boxes, other_boxes in zip(reference, other):  # (N, 4), (M, 4) per image
        total += len(ref_boxes)
        if len(ref_boxes) and len(other_boxes):
            matched += int((box_iou(ref_boxes, other_boxes).max(dim=1).values > threshold).sum())
    return dict(boxes_selected=sum(len(b) for b in other), box_match_iou90=matched / max(1, total))


def compare_precisions(detector, images, precisions: list, base: dict) -> list:
    """One row per precision (plus the fp32 fixed-vs-detected check), see the module doc."""
    selector = RegionSelector.for_recipe(detector.config.recipe)
    reference = detect_and_select(detector, images, selector, None)
    ref_boxes = [boxes for boxes, _ in reference]
    ref_features, ref_probs = on_fixed_boxes(detector, images, ref_boxes, None)
    detected = torch.cat([features for _, features in reference])
    base = dict(base, fp32_boxes=sum(len(b) for b in ref_boxes))
    rows = [dict(base, precision="fp32 (fixed vs detected)", **feature_drift(detected, ref_features))]
    for name in precisions:
        dtype = PRECISIONS[name]
        features, probs = on_fixed_boxes(detector, images, ref_boxes, dtype)
        selected = [boxes for boxes, _ in detect_and_select(detector, images, selector, dtype)]
        rows.append(dict(base, precision=name, **feature_drift(ref_features, features),
                         **class_drift(ref_probs, probs), **box_match(ref_boxes, selected)))
    detector.autocast_dtype = None
    return rows


def print_precision_rows(rows: list) -> None:
    columns = [("config", "config", "{}"), ("precision", "precision", "{}"), ("boxes", "fp32_boxes", "{}"),
               ("feat max|d|", "feature_max_abs_diff", "{:.3g}"), ("feat mean|d|", "feature_mean_abs_diff", "{:.3g}"),
               ("fp32 max|f|", "fp32_feature_max_abs", "{:.3g}"), ("cos mean", "cosine_mean", "{:.7f}"),
               ("cos min", "cosine_min", "{:.7f}"), ("cls max|d|", "cls_prob_max_abs_diff", "{:.3g}"),
               ("top1 agree", "top1_class_agreement", "{:.3f}"), ("boxes IoU>0.9", "box_match_iou90", "{:.3f}")]
    widths = [6, 24] + [13] * (len(columns) - 2)
    print(" ".join(f"{title:>{w}}" for (title, _, _), w in zip(columns, widths)))
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "-" for _, key, fmt in columns]
        print(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))


def build(config_name: str, args):
    config = get_config(config_name, recipe=args.recipe)
    if args.test_size:
        low, high = (int(v) for v in args.test_size.split(","))
        config = config.replace(test_min_size=low, test_max_size=high)
    if args.proposals:
        config = config.replace(rpn_post_nms_topk=args.proposals)
    weights = args.weights if config_name == "r101" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_detector(config, weights, device=args.device), weights


def image_count(args, config_name: str) -> int:
    return args.images or (16 if args.device.startswith("cuda") else (2 if config_name == "r101" else 4))


def run_precision_comparison(args, width: int, height: int) -> list:
    rows = []
    for config_name in args.configs.split(","):
        detector, weights = build(config_name, args)
        count = image_count(args, config_name)
        base = dict(config=config_name, device=args.device, images=count, size=args.size,
                    test_size=[detector.config.test_min_size, detector.config.test_max_size],
                    proposals=detector.config.rpn_post_nms_topk,
                    weights=weights or "random-init")
        rows += compare_precisions(detector, synthetic_images(count, width, height),
                                   args.compare_precision.split(","), base)
    print_precision_rows(rows)
    if any(row["weights"] == "random-init" for row in rows):
        print("NOTE: random weights -- a plumbing check only; the drift that matters is that of the "
              "real detector weights (--weights).")
    return rows


def run_throughput(args, width: int, height: int, peak_tflops: float) -> list:
    rows = []
    for config_name in args.configs.split(","):
        detector, _ = build(config_name, args)
        count = image_count(args, config_name)
        images = synthetic_images(count, width, height)
        for precision, memory_format in ((p, m) for p in args.precisions.split(",")
                                         for m in args.memory_formats.split(",")):
            detector.autocast_dtype = PRECISIONS[precision]
            if memory_format != "auto":
                detector.use_channels_last(memory_format == "channels_last")
            memory_format = "channels_last" if detector.channels_last else "contiguous"
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                rate = measure(detector, images, batch_size, args.device)
                gflop, gflop_parts, syncs = count_per_image(detector, images, batch_size)
                rows.append(dict(config=config_name, device=args.device, precision=precision,
                                 memory_format=memory_format, batch_size=batch_size, images=count, size=args.size,
                                 images_per_second=round(rate, 3), gflop_per_image=round(gflop, 1),
                                 gflop_per_image_by_part=gflop_parts,
                                 tflops=round(rate * gflop / 1000, 2),
                                 pct_of_bf16_peak=round(100 * rate * gflop / 1000 / peak_tflops, 1),
                                 sync_ops_per_image=syncs))
                print(f"{config_name:6s} {args.device:8s} {precision:5s} {memory_format:13s} batch {batch_size:3d}  "
                      f"{rate:9.2f} images/s  {gflop:8.1f} GFLOP/image  {rate * gflop / 1000:7.2f} TFLOP/s  "
                      f"{rows[-1]['pct_of_bf16_peak']:5.1f} % of bf16 peak  {syncs:5.1f} sync ops/image", flush=True)
                if args.profile:
                    batch = images[:batch_size]
                    print(time_profile(partial(run_batch, detector, batch), args.device, args.profile,
                                       repeat=1), flush=True)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,r101")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--recipe", default="caffe", choices=["caffe", "detectron2"])
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--memory-formats", default="auto",
                        help="contiguous,channels_last to compare the conv layouts (auto: vilbert-extract's "
                             "default, channels_last)")
    parser.add_argument("--compare-precision", default=None, metavar="P[,P]",
                        help="e.g. bf16,fp16: compare these with fp32 instead of timing")
    parser.add_argument("--images", type=int, default=None, help="default: 16 on GPU, 4 on CPU (r101: 2)")
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the synthetic images")
    parser.add_argument("--test-size", default=None, metavar="MIN,MAX",
                        help="override the detector's resize (shortest, longest edge), e.g. for fp16 on CPU "
                             "(slow kernels); changes the features, so only for plumbing runs")
    parser.add_argument("--proposals", type=int, default=None,
                        help="RPN proposals kept (as vilbert-extract --proposals; default: the config's)")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also print the top ROWS ops/kernels of each measured setting (torch.profiler)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    peak = {}
    if args.compare_precision:
        rows, kind = run_precision_comparison(args, width, height), "extract-precision"
    else:
        peak["bf16_peak_tflops"], peak["peak_source"] = bf16_peak(args.device)
        print(f"bf16 peak: {peak['bf16_peak_tflops']:.4g} TFLOP/s ({peak['peak_source']})", flush=True)
        rows, kind = run_throughput(args, width, height, peak["bf16_peak_tflops"]), "extract"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"{kind}-{args.device.replace(':', '')}-{stamp}.json"
    write_json(path, "extract_benchmark.py", argv, args.device, rows, threads=torch.get_num_threads(), **peak)
    return rows


if __name__ == "__main__":
    main()
