"""The synthetic scenes as region-feature shards in the extractor's layout (docs/shard-format.md),
with a BERT-style vocabulary of their words: what `vilbert-train` tests read."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.shard_format import npy_bytes
from common.shard_writer import ShardWriter

from .scenes import COLOURS, SHAPES, SyntheticTask


def write_vocab(path) -> Path:
    """A BERT-style vocab.txt holding the synthetic task's words."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "and"] + COLOURS + SHAPES
    Path(path).write_text("\n".join(words) + "\n")
    return Path(path)


def write_shards(task: SyntheticTask, out_dir, n: int, seed: int = 0, shard_size: int = 250,
                 num_classes: int = 1601, prefix: str = "synthetic", size=(640, 480)) -> list[str]:
    """Write `n` synthetic scenes as region-feature shards, captions naming one object each
    ("a red circle"). Class distributions are padded to `num_classes` columns (column 0 background).
    Returns the keys written."""
    rng = np.random.default_rng(seed)
    W, H = size
    keys = []
    with ShardWriter(str(out_dir), prefix=prefix, shard_size=shard_size) as writer:
        for i in range(n):
            objects = task.scene(rng)
            feats, boxes, probs = task.regions(objects, rng)
            colour, shape = objects[rng.integers(len(objects))]
            cls_prob = np.zeros((len(objects), num_classes), np.float32)
            cls_prob[:, : probs.shape[1]] = probs
            key = f"{prefix}{seed:03d}{i:07d}"
            meta = {"image_id": key, "width": W, "height": H, "num_boxes": len(objects), "source": "synthetic",
                    "detector": "synthetic-scenes", "weights_hash": f"task-seed-{task.seed}"}
            writer.write(key, {
                "json": json.dumps(meta).encode(),
                "txt": f"a {COLOURS[colour]} {SHAPES[shape]}".encode(),
                "features.npy": npy_bytes(feats.astype(np.float16)),
                "boxes.npy": npy_bytes((boxes * np.array([W, H, W, H], np.float32)).astype(np.float32)),
                "cls_prob.npy": npy_bytes(cls_prob.astype(np.float16)),
            })
            keys.append(key)
    return keys
