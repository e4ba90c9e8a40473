"""A synthetic cross-modal task whose answers need both streams.

Each scene holds `num_objects` objects, each a (colour, shape) pair. A region's feature is the sum
of a fixed random colour vector and a fixed random shape vector, plus noise; its detector class
distribution peaks on its shape. The caption names `num_named` of the objects ("a red circle"). A mismatched caption gives one named
object a wrong colour, so the words alone never tell a match from a mismatch (colours are uniform),
and a masked colour word can only be recovered by finding its shape among the regions.

Batches follow the trainer's batch contract (see `pipelines/data.py`); the vocabulary is tiny and
self-contained, so no tokenizer is needed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vilbert import IGNORE_INDEX

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "and"]
VOCAB = SPECIALS + COLOURS + SHAPES
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
COLOUR_IDS = [TOKEN_ID[c] for c in COLOURS]
PAD, CLS, SEP, MASK = 0, 1, 2, 3


@dataclass
class SyntheticTask:
    feature_size: int = 64
    num_classes: int = 1 + len(SHAPES)  # background + shapes
    num_objects: int = 3
    noise: float = 0.3
    num_named: int = 1  # objects named by each caption
    seed: int = 0

    def __post_init__(self):
        g = np.random.default_rng(self.seed)
        self.colour_vecs = g.normal(size=(len(COLOURS), self.feature_size)).astype(np.float32)
        self.shape_vecs = g.normal(size=(len(SHAPES), self.feature_size)).astype(np.float32)

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    # ---- one scene ---------------------------------------------------------------------
    def scene(self, rng: np.random.Generator) -> np.ndarray:
        """(num_objects, 2) distinct shapes, random colours (distinct shapes keep captions unambiguous)."""
        shapes = rng.permutation(len(SHAPES))[: self.num_objects]
        colours = rng.integers(0, len(COLOURS), size=self.num_objects)
        return np.stack([colours, shapes], axis=1)

    def regions(self, objects: np.ndarray, rng: np.random.Generator):
        n = len(objects)
        feats = self.colour_vecs[objects[:, 0]] + self.shape_vecs[objects[:, 1]]
        feats = feats + self.noise * rng.normal(size=feats.shape).astype(np.float32)  # (n, F)
        xy = rng.uniform(0, 0.6, size=(n, 2))
        wh = rng.uniform(0.15, 0.4, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)  # normalised x1,y1,x2,y2
        probs = np.full((n, self.num_classes), 0.05 / (self.num_classes - 1), dtype=np.float32)
        probs[np.arange(n), 1 + objects[:, 1]] = 0.95
        return feats.astype(np.float32), boxes, probs

    @staticmethod
    def caption(named: np.ndarray) -> list[int]:
        """(K, 2) (colour, shape) rows -> [CLS] colour shape and colour shape ... [SEP]"""
        words = []
        for k, (c, s) in enumerate(named):
            words += (["and"] if k else ["a"]) + [COLOURS[c], SHAPES[s]]
        return [CLS] + [TOKEN_ID[w] for w in words] + [SEP]

    # ---- batches -------------------------------------------------------------------------
    def batch(self, batch_size: int, rng: np.random.Generator, mask_prob: float = 0.3,
              mask_regions: float = 0.15) -> dict[str, torch.Tensor]:
        """A batch in the trainer's contract. Half the captions are mismatched (align label 1): one
        named object gets a wrong colour. Independently of that, with probability `mask_prob` one
        colour word is replaced by [MASK] and becomes the MLM label (a masked caption may hide the
        evidence of a mismatch, as in real pretraining; evaluate alignment with mask_prob=0)."""
        T, R = 1 + 3 * self.num_named + 1, self.num_objects + 1
        out = {
            "input_ids": np.zeros((batch_size, T), np.int64),
            "lm_labels": np.full((batch_size, T), IGNORE_INDEX, np.int64),
            "image_feat": np.zeros((batch_size, R, self.feature_size), np.float32),
            "image_loc": np.zeros((batch_size, R, 5), np.float32),
            "region_labels": np.zeros((batch_size, R), np.int64),
            "region_targets": np.zeros((batch_size, R, self.num_classes), np.float32),
            "align_labels": np.zeros(batch_size, np.int64),
        }
        for b in range(batch_size):
            objects = self.scene(rng)
            named = objects[rng.permutation(self.num_objects)[: self.num_named]].copy()  # (K, 2)
            mismatch = rng.random() < 0.5
            if mismatch:
                k = rng.integers(0, self.num_named)
                named[k, 0] = (named[k, 0] + rng.integers(1, len(COLOURS))) % len(COLOURS)
            ids = self.caption(named)
            if rng.random() < mask_prob:
                pos = 2 + 3 * rng.integers(0, self.num_named)  # a colour word
                out["lm_labels"][b, pos] = ids[pos]
                ids[pos] = MASK
            out["input_ids"][b] = ids
            out["align_labels"][b] = int(mismatch)

            feats, boxes, probs = self.regions(objects, rng)
            masked = rng.random(self.num_objects) < mask_regions
            out["region_labels"][b, 1:] = masked
            out["region_targets"][b, 1:] = probs
            feats = np.where(masked[:, None], 0.0, feats)
            out["image_feat"][b, 1:] = feats
            out["image_feat"][b, 0] = feats[~masked].mean(0) if (~masked).any() else 0.0
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            out["image_loc"][b, 1:] = np.concatenate([boxes, area[:, None]], axis=1)
            out["image_loc"][b, 0] = [0, 0, 1, 1, 1]
        tensors = {k: torch.from_numpy(v) for k, v in out.items()}
        tensors["attention_mask"] = torch.ones(batch_size, T, dtype=torch.long)
        tensors["token_type_ids"] = torch.zeros(batch_size, T, dtype=torch.long)
        tensors["image_mask"] = torch.ones(batch_size, R, dtype=torch.long)
        return tensors


def fit(model: torch.nn.Module, task: SyntheticTask, steps: int, lr: float = 2e-3, batch_size: int = 64,
        seed: int = 1) -> list[float]:
    """A minimal loop with the pretraining optimizer and schedule on fresh synthetic batches; returns losses."""
    from .optim import build_optimizer, build_scheduler

    rng = np.random.default_rng(seed)
    opt = build_optimizer(model, lr, weight_decay=0.01)
    sched = build_scheduler(opt, steps, warmup=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(**task.batch(batch_size, rng))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
    return losses


def tiny_model(task: SyntheticTask, coattention: bool = True, seed: int = 0, arch: str = "vilbert"):
    """The tiny preset sized for the synthetic task, without dropout."""
    from vilbert import ViLBert, load_preset

    torch.manual_seed(seed)
    cfg = load_preset(
        f"{arch}-tiny", vocab_size=task.vocab_size, v_feature_size=task.feature_size,
        v_target_size=task.num_classes, max_position_embeddings=16, with_coattention=coattention,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0,
    )
    return ViLBert(cfg)


def train_and_evaluate(coattention: bool = True, steps: int = 2000, seed: int = 0, lr: float = 2e-3,
                       save_to: str | None = None, arch: str = "vilbert") -> dict:
    """Train a tiny model on the synthetic task (one thread) and evaluate it on held-out scenes.
    A plain function of plain arguments, so that two runs can go to two processes."""
    torch.set_num_threads(1)
    task = SyntheticTask(seed=seed)
    model = tiny_model(task, coattention, seed, arch)
    t0 = time.perf_counter()
    losses = fit(model, task, steps, lr=lr, seed=seed + 1)
    result = evaluate(model, task)
    result.update(first_loss=sum(losses[:50]) / 50, last_loss=sum(losses[-50:]) / 50,
                  seconds=time.perf_counter() - t0)
    if save_to:
        from vilbert import save_pretrained

        save_pretrained(model, save_to, metadata={"demo": "synthetic", "steps": steps, **result})
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: SyntheticTask, n: int = 2000, seed: int = 123) -> dict[str, float]:
    """Held-out alignment accuracy (no masking) and colour-word MLM accuracy (every caption masked)."""
    model.eval()
    rng = np.random.default_rng(seed)
    b = task.batch(n, rng, mask_prob=0.0, mask_regions=0.0)
    align = (model(**b).align_logits.argmax(-1) == b["align_labels"]).float().mean().item()
    b = task.batch(n, rng, mask_prob=1.0, mask_regions=0.0)
    out = model(**b)
    mlm = (out.mlm_logits.argmax(-1) == out.mlm_labels).float().mean().item()
    return {"align_accuracy": align, "mlm_accuracy": mlm}


# ---- the same scenes as region-feature shards (docs/shard-format.md) --------------------------

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
    import io
    import json

    from extractor.writer import ShardWriter

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

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
                "features.npy": npy(feats.astype(np.float16)),
                "boxes.npy": npy((boxes * np.array([W, H, W, H], np.float32)).astype(np.float32)),
                "cls_prob.npy": npy(cls_prob.astype(np.float16)),
            })
            keys.append(key)
    return keys
