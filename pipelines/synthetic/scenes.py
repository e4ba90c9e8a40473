"""A synthetic cross-modal task whose answers need both streams.

Each scene holds `num_objects` objects, each a (colour, shape) pair. A region's feature is the sum
of a fixed random colour vector and a fixed random shape vector, plus noise; its detector class
distribution peaks on its shape. The caption names `num_named` of the objects ("a red circle").
A mismatched caption gives one named object a wrong colour, so the words alone never tell a match
from a mismatch (colours are uniform),
and a masked colour word can only be recovered by finding its shape among the regions.

Batches follow the trainer's batch contract (see `pipelines/data/loader.py`); the vocabulary is tiny and
self-contained, so no tokenizer is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vilbert import IGNORE_INDEX

from ..data.masking import vlbert_image_weights

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
              mask_regions: float = 0.15, vlbert: bool = False, one_region: bool = False,
              no_image: bool = False) -> dict[str, torch.Tensor]:
        """A batch in the trainer's contract. Half the captions are mismatched (align label 1): one
        named object gets a wrong colour. Independently of that, with probability `mask_prob` one
        colour word is replaced by [MASK] and becomes the MLM label (a masked caption may hide the
        evidence of a mismatch, as in real pretraining; evaluate alignment with mask_prob=0).

        vlbert: VL-BERT's objective as pipelines/data/batching.py builds it: no mismatched captions;
        a region is masked with `mask_regions`, 90 % of those replaced by the model's mask vector
        (`masked_regions`, the feature left in place), and the whole-image element is the mean
        without the replaced ones. one_region: exactly one region per scene masked and replaced
        (evaluation). no_image: every region feature zero (the image removed; boxes kept)."""
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
            mismatch = not vlbert and rng.random() < 0.5
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
            if no_image:
                feats = np.zeros_like(feats)
            draw = rng.random(self.num_objects)
            if one_region:
                draw = np.where(np.arange(self.num_objects) == rng.integers(self.num_objects), 0.0, 1.0)
            masked = draw < mask_regions
            out["region_labels"][b, 1:] = masked
            out["region_targets"][b, 1:] = probs
            if vlbert:
                replaced = masked & (draw < 0.9 * mask_regions)  # draw / p < 0.9, as mask_regions()
                out.setdefault("masked_regions", np.zeros((batch_size, R), bool))[b, 1:] = replaced
                out["image_feat"][b, 1:] = feats
                weights = vlbert_image_weights(replaced[None], np.ones((1, len(feats)), bool))[0]  # (n,)
                out["image_feat"][b, 0] = weights @ feats
            else:
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
