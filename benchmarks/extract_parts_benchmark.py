"""Two parts of extraction on their own: JPEG decoding and the region selection of an image where
fewer than 10 boxes reach the score threshold.

    python benchmarks/extract_parts_benchmark.py --threads 1

decode: `extractor.images.decode_image` (what the extraction workers run) on smooth noisy JPEGs
(quality 90) of two sizes, images/s on one core. selection: 300 proposals x 1,600 classes of
near-uniform scores (a randomly initialised detector; nothing reaches 0.2), the rank-by-rank
all-pairs loop against the widening score floor that RegionSelector uses, ms per image, and
whether their 10 best boxes agree. hand-off: 1000x750 JPEGs decoded in one DataLoader worker and
handed to the main process as numpy arrays (pickled through a pipe, as before) or as tensors
(`extractor.images.pixel_tensor`: shared memory, as now): images/s through the worker, and the
main process's CPU ms per image (`ms`), which is what the GPU-feeding process spends.
Prints a table and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extractor.images import decode_image, pixel_tensor
from extractor.select import RegionSelector

from report import print_table, write_json

RESULTS = Path(__file__).parent / "results"


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = (np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 256], -1)
              + rng.normal(0, 20, (height, width, 3)))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def per_second(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats / (time.perf_counter() - start)


def decode_rows(repeats: int) -> list[dict]:
    rows = []
    for width, height in ((640, 480), (1000, 750)):
        data = jpeg(width, height)
        rate = per_second(lambda data=data: decode_image(data), repeats)
        rows.append({"part": f"decode JPEG {width}x{height} ({len(data):,} bytes)", "per_second": round(rate, 1),
                     "ms": round(1000 / rate, 2), "same_result": None})
    return rows


def selection_rows(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 200 + 5], 1)  # (300, 4)
    scores = (torch.randn(300, 1601, generator=g) * 0.05).softmax(1)[:, 1:]  # (300, 1600), all far below 0.2
    selector = RegionSelector()
    loop = selector.best_surviving_scores_all_pairs(boxes, scores)
    floor = selector.best_surviving_scores_top_pairs(boxes, scores, selector.min_boxes)
    top = torch.argsort(loop, descending=True, stable=True)[: selector.min_boxes]
    same = bool(torch.allclose(floor[top], loop[top]))
    rows = []
    for name, fn in (("selection, rank loop (before)", lambda: selector.best_surviving_scores_all_pairs(boxes, scores)),
                     ("selection, widening floor (now)",
                      lambda: selector.best_surviving_scores_top_pairs(boxes, scores, selector.min_boxes))):
        rate = per_second(fn, repeats)
        rows.append({"part": name, "per_second": round(rate, 1), "ms": round(1000 / rate, 2), "same_result": same})
    return rows


class DecodedJpegs(torch.utils.data.Dataset):
    def __init__(self, data: bytes, count: int, as_tensor: bool):
        self.data, self.count, self.as_tensor = data, count, as_tensor

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        pixels = decode_image(self.data).pixels
        return {"index": index, "pixels": pixel_tensor(pixels) if self.as_tensor else pixels}


def handoff_rows(count: int) -> list[dict]:
    data, rows = jpeg(1000, 750), []
    for name, as_tensor in (("hand-off 1000x750, numpy pickled (before)", False),
                            ("hand-off 1000x750, tensor in shared memory (now)", True)):
        loader = torch.utils.data.DataLoader(DecodedJpegs(data, count + 8, as_tensor), batch_size=8, num_workers=1,
                                             collate_fn=list, prefetch_factor=4)
        batches = iter(loader)
        next(batches)  # the worker has started
        cpu, wall, seen = time.process_time(), time.perf_counter(), 0
        for batch in batches:
            seen += sum(item["pixels"].shape[0] > 0 for item in batch)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        rows.append({"part": name, "per_second": round(seen / wall, 1), "ms": round(1000 * cpu / seen, 3),
                     "same_result": None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "extract_parts_benchmark.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = decode_rows(a.repeats) + selection_rows(a.repeats) + handoff_rows(8 * a.repeats)
    print_table(rows, ["part", "per_second", "ms", "same_result"])
    write_json(a.out, "extract_parts_benchmark.py", argv, "cpu", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
