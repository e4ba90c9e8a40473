"""Write small region-feature shards in the format of docs/shard-format.md, independently of the
extractor (plain `tarfile`), plus a matching WordPiece vocabulary. Used by the data tests and by
benchmarks/loader_benchmark.py."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

WORDS = ["a", "the", "dog", "cat", "man", "woman", "red", "blue", "green", "car", "street", "tree",
         "on", "in", "with", "of", "sitting", "running", "big", "small", "house", "photo", "white",
         "black", "two", "people", "near", "water", "field", "playing"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
RECIPE = {"detector": "test-detector", "weights_hash": "0123456789ab", "mode": "detected",
          "min_boxes": 10, "max_boxes": 36, "conf_threshold": 0.2}


def write_vocab(path: Path) -> Path:
    """vocab.txt: the specials ([PAD] = 0), the test words and a few '##' pieces."""
    path = Path(path)
    path.write_text("\n".join(SPECIALS + WORDS + ["##s", "##ing"]) + "\n")
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """(n, 4) float32 x1, y1, x2, y2 inside the image, at least 4 px wide and high."""
    x1 = rng.uniform(0, width * 0.7, n)
    y1 = rng.uniform(0, height * 0.7, n)
    x2 = np.minimum(width, x1 + rng.uniform(4, width * 0.5, n))
    y2 = np.minimum(height, y1 + rng.uniform(4, height * 0.5, n))
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


def random_caption(rng: np.random.Generator, low: int = 5, high: int = 15) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high + 1))))


def make_sample(rng: np.random.Generator, key: str, num_boxes: int = 36, feature_dim: int = 2048,
                num_classes: int = 1601, width: int = 640, height: int = 480,
                caption: str | None = "", recipe: dict | None = None, boxes: np.ndarray | None = None,
                features: np.ndarray | None = None) -> dict[str, bytes]:
    """One sample: member extension -> bytes. `caption=""` draws a random caption, None omits .txt."""
    boxes = random_boxes(rng, num_boxes, width, height) if boxes is None else boxes
    if features is None:
        features = rng.random((num_boxes, feature_dim), dtype=np.float32)
    logits = rng.normal(size=(num_boxes, num_classes)).astype(np.float32)
    cls_prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    meta = {"image_id": key, "width": width, "height": height, "num_boxes": num_boxes,
            "source": f"{key}.jpg", **(RECIPE if recipe is None else recipe)}
    members = {
        "json": json.dumps(meta).encode(),
        "features.npy": npy_bytes(features.astype(np.float16)),
        "boxes.npy": npy_bytes(boxes.astype(np.float32)),
        "cls_prob.npy": npy_bytes(cls_prob.astype(np.float16)),
    }
    if caption is not None:
        members["txt"] = (caption or random_caption(rng)).encode()
    return members


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """samples: key -> {extension: bytes}, written in order as KEY.EXTENSION members."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(out_dir: Path, num_shards: int = 2, per_shard: int = 8, prefix: str = "shard",
                 seed: int = 0, recipe: dict | None = None, first_index: int = 0,
                 **sample_kwargs) -> list[Path]:
    """PREFIX-NNNNNN.tar shards plus sizes.json and recipe.json (merged with existing ones)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, sizes = [], {}
    for index in range(first_index, first_index + num_shards):
        samples = {f"{prefix}{index:03d}_{i:05d}": make_sample(rng, f"{prefix}{index:03d}_{i:05d}",
                                                                recipe=recipe, **sample_kwargs)
                   for i in range(per_shard)}
        path = write_tar(out_dir / f"{prefix}-{index:06d}.tar", samples)
        paths.append(path)
        sizes[path.name] = per_shard
    sizes_path = out_dir / "sizes.json"
    if sizes_path.is_file():
        sizes = {**json.loads(sizes_path.read_text()), **sizes}
    sizes_path.write_text(json.dumps(sizes, indent=1))
    (out_dir / "recipe.json").write_text(json.dumps(RECIPE if recipe is None else recipe))
    return paths
