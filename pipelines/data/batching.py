"""Collate decoded samples into the pretraining batch contract, with alignment negatives and the
text / region masks drawn for the whole batch at once.

Batch contract (a dict; B = batch, T = max_seq_len, R = max_regions, F = feature width, C = classes):
  input_ids (B, T) long        [CLS] caption [SEP], 0-padded; masked tokens replaced
  token_type_ids (B, T) long   zeros
  attention_mask (B, T) long   1 = real token
  lm_labels (B, T) long        original id at masked tokens, -100 elsewhere
  image_feat (B, R+1, F) f32   position 0 = [IMG] (mean of unmasked, non-overlapping regions)
  image_loc (B, R+1, 5) f32    x1/W, y1/H, x2/W, y2/H, area fraction; position 0 = [0, 0, 1, 1, 1]
  image_mask (B, R+1) long     1 = real (position 0 always)
  region_labels (B, R+1) long  1 = masked region (MRM target)
  region_targets (M, C) f32    detector class distribution (column 0 background) of each masked
                               region (region_labels == 1), in row-major order: only what the
                               loss reads, an eighth of the bytes of all (B, R+1, C)
  align_labels (B,) long       0 = the image's own caption, 1 = another sample's caption
  keys list[str]
Objective "vlbert" (VL-BERT's pretraining) differs: no negatives (align_labels all 0), region
features are not zeroed but
  masked_regions (B, R+1) bool  masked regions whose feature the model replaces by its mask vector
                               (90 % of region_labels == 1), and the [IMG] element is the mean of
                               the real regions less these (masking.vlbert_image_weights)
plus, with a text-only corpus mixed in (pipelines/data/text_corpus.py), text_only (B,) bool.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .masking import (
    IGNORE_INDEX,
    image_token_weights,
    mask_corpus_text,
    mask_regions,
    mask_text,
    vlbert_image_weights,
)
from .samples import RegionSample
from .tokenization import CaptionTokenizer

OBJECTIVES = {
    0: "negatives keep their masked-token and masked-region labels",
    1: "negatives are masked alike but carry no MLM/MRM labels (official pretraining setting)",
    2: "no negatives (every caption is the image's own)",
    "vlbert": "VL-BERT's: no negatives, masked regions replaced in the model, [IMG] without the replaced ones",
}
NEGATIVE_PROB = 0.5


@dataclass
class CaptionPool:
    """The most recent (key, caption) pairs seen by this process: the source of negatives."""

    capacity: int = 1024
    keys: list = field(default_factory=list)
    captions: list = field(default_factory=list)
    _next: int = 0

    def add(self, key: str, caption: str) -> None:
        if len(self.keys) < self.capacity:
            self.keys.append(key)
            self.captions.append(caption)
        else:
            self.keys[self._next], self.captions[self._next] = key, caption
        self._next = (self._next + 1) % self.capacity

    def draw(self, rng: np.random.Generator, key: str, caption: str, tries: int = 4) -> str | None:
        """A caption of another sample (different key and text), or None if none was found."""
        for _ in range(tries):
            i = int(rng.integers(len(self.keys)))
            if self.keys[i] != key and self.captions[i] != caption:
                return self.captions[i]
        return None


def new_output(shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it is allocated in shared memory, so
    sending the batch to the main process moves no bytes (as torch's default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    base = torch.empty(0, dtype=dtype)
    storage = base._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return base.new(storage).view(shape)


def region_locations(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """boxes (B, R, 4) in pixels, sizes (B, 2) = (W, H) -> (B, R, 5) normalised box + area fraction."""
    scale = np.concatenate([sizes, sizes], axis=1)[:, None, :]  # (B, 1, 4) W, H, W, H
    norm = boxes / scale  # (B, R, 4)
    area = (norm[..., 2] - norm[..., 0]) * (norm[..., 3] - norm[..., 1])  # (B, R)
    return np.concatenate([norm, area[..., None]], axis=2).astype(np.float32)


class BatchBuilder:
    """samples -> batch dict (see the module doc). `deterministic` seeds the masks and negatives of
    each batch from its keys (evaluation); otherwise one generator per process, from `seed`.

    image_feat and region_targets are float16 (as stored) when `half_output` or inside a DataLoader
    worker: half the bytes to move between processes; PretrainingLoader casts them to float32
    in the main process unless DataConfig.half_features asks to keep them (cast on the GPU)."""

    def __init__(self, tokenizer: CaptionTokenizer, max_regions: int = 36, objective: int | str = 1,
                 seed: int | None = None, deterministic: bool = False, pool_size: int = 1024,
                 half_output: bool = False):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        self.tokenizer, self.max_regions, self.objective = tokenizer, max_regions, objective
        self.seed, self.deterministic, self.half_output = seed, deterministic, half_output
        self.pool = CaptionPool(pool_size)
        self._rng = None
        self._staging = self._regions32 = None

    def rng(self, keys: list[str]) -> np.random.Generator:
        if self.deterministic:
            return np.random.default_rng([self.seed or 0, zlib.crc32("\n".join(keys).encode())])
        if self._rng is None:  # first use inside the worker process
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            self._rng = np.random.default_rng(None if self.seed is None else [self.seed, rank, worker])
        return self._rng

    def negatives(self, samples: list[RegionSample], rng: np.random.Generator):
        """-> (captions, align_labels (B,)): with probability 0.5 a caption of another sample."""
        for s in samples:
            self.pool.add(s.key, s.caption)
        captions = [s.caption for s in samples]
        align = np.zeros(len(samples), dtype=np.int64)
        if self.objective in (2, "vlbert"):
            return captions, align
        for b in np.flatnonzero(rng.random(len(samples)) < NEGATIVE_PROB):
            other = self.pool.draw(rng, samples[b].key, samples[b].caption)
            if other is not None:
                captions[b], align[b] = other, 1
        return captions, align

    def __call__(self, samples: list[RegionSample]) -> dict:
        keys = [s.key for s in samples]
        rng = self.rng(keys)
        captions, align = self.negatives(samples, rng)
        text = self.text_arrays(captions, rng)
        visual = self.visual_arrays(samples, rng)
        if self.objective == 1:  # negatives: inputs masked alike, but no MLM/MRM targets
            text["lm_labels"][align == 1] = IGNORE_INDEX
            visual["region_labels"][align == 1] = 0
        visual["region_targets"] = self.masked_targets(samples, visual["region_labels"])
        batch = {name: torch.as_tensor(array) for name, array in {**text, **visual}.items()}
        batch["align_labels"] = torch.from_numpy(align)
        batch["keys"] = keys
        return batch

    def text_arrays(self, captions: list[str], rng: np.random.Generator) -> dict:
        if self.objective == "vlbert":  # whole words, as conceptual_captions.py's random_word_wwm
            ids, lengths, words = self.tokenizer(captions, words=True)  # (B, T), (B,), (B, T)
            masked, lm_labels = mask_corpus_text(ids, words, rng, self.tokenizer.mask_id, self.tokenizer.vocab_size)
        else:
            ids, lengths = self.tokenizer(captions)  # (B, T), (B,)
            masked, lm_labels = mask_text(ids, lengths, rng, self.tokenizer.mask_id, self.tokenizer.vocab_size)
        return {"input_ids": masked, "token_type_ids": np.zeros_like(ids),
                "attention_mask": (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int64),
                "lm_labels": lm_labels}

    def _half(self) -> bool:
        """float16 outputs: asked for, or inside a DataLoader worker (half the bytes to move)."""
        return self.half_output or torch.utils.data.get_worker_info() is not None

    def _staging_array(self, B: int, F: int) -> np.ndarray:
        """A reused float16 (B, R+1, F) array to gather the stored rows in: casting a whole batch
        once is much cheaper than casting per sample."""
        shape = (B, self.max_regions + 1, F)
        if self._staging is None or self._staging.shape != shape:
            self._staging = np.zeros(shape, np.float16)
        return self._staging

    def masked_targets(self, samples: list[RegionSample], region_labels: np.ndarray) -> torch.Tensor:
        """The class distributions of the masked regions, (M, C) in row-major order of region_labels."""
        C = samples[0].cls_prob.shape[1]
        rows = [np.flatnonzero(labels[1:]) for labels in region_labels]  # region r is stored row r - 1
        out = new_output((sum(len(r) for r in rows), C), torch.float16 if self._half() else torch.float32)
        targets, start = out.numpy(), 0
        for s, r in zip(samples, rows):
            targets[start: start + len(r)] = s.cls_prob[r]
            start += len(r)
        return out

    def _float_regions(self, B: int, F: int) -> torch.Tensor:
        """A reused float32 (B, R, F) buffer for the [IMG] mean of float16 outputs."""
        if self._regions32 is None or self._regions32.shape != (B, self.max_regions, F):
            self._regions32 = torch.empty((B, self.max_regions, F))
        return self._regions32

    def _gather(self, samples: list[RegionSample], feat: np.ndarray):
        """Copy each sample's feature rows to positions 1..n, zero position 0 and the padding.
        -> boxes (B, R, 4) in pixels, counts (B,)."""
        F, C = feat.shape[2], samples[0].cls_prob.shape[1]
        boxes = np.zeros((len(samples), self.max_regions, 4), dtype=np.float32)
        counts = np.array([len(s.features) for s in samples])  # (B,)
        for b, s in enumerate(samples):
            if s.features.shape[1] != F or s.cls_prob.shape[1] != C:
                raise ValueError(f"{s.url}: sample {s.key!r} has feature/class widths {s.features.shape[1]}/"
                                 f"{s.cls_prob.shape[1]}, but {samples[0].key!r} has {F}/{C}")
            n = counts[b]
            feat[b, 1:n + 1], feat[b, n + 1:] = s.features, 0
            boxes[b, :n] = s.boxes
        feat[:, 0] = 0
        return boxes, counts

    def visual_arrays(self, samples: list[RegionSample], rng: np.random.Generator) -> dict:
        B, R = len(samples), self.max_regions
        F = samples[0].features.shape[1]
        half = self._half()
        if half:  # gather straight into the float16 output (shared memory inside a worker)
            feat_out = new_output((B, R + 1, F), torch.float16)
            feat = feat_out.numpy()
        else:
            feat = self._staging_array(B, F)  # float16 (B, R+1, F)
        boxes, counts = self._gather(samples, feat)
        real = np.arange(R)[None, :] < counts[:, None]  # (B, R)
        loc = np.zeros((B, R + 1, 5), dtype=np.float32)
        loc[:, 0] = (0, 0, 1, 1, 1)
        loc[:, 1:] = region_locations(boxes, np.array([s.size for s in samples])) * real[..., None]
        masked, zeroed = mask_regions(counts, R, rng)  # (B, R) each
        vlbert = self.objective == "vlbert"  # the model replaces the features; the mean leaves them out
        weights = vlbert_image_weights(zeroed, real) if vlbert else image_token_weights(masked, real, boxes)
        weights = torch.from_numpy(weights.astype(np.float32))[:, None]  # (B, 1, R)
        if not vlbert:
            feat[:, 1:][zeroed] = 0
        if half:
            regions = self._float_regions(B, F).copy_(feat_out[:, 1:])
        else:
            feat_out = new_output(feat.shape).copy_(torch.from_numpy(feat))  # (B, R+1, F) float32
            regions = feat_out[:, 1:]
        feat_out[:, 0] = torch.bmm(weights, regions)[:, 0]  # [IMG] (B, F), the mean in float32
        image_mask = np.concatenate([np.ones((B, 1), bool), real], axis=1)
        region_labels = np.concatenate([np.zeros((B, 1), bool), masked], axis=1)
        out = {"image_feat": feat_out, "image_loc": loc, "image_mask": image_mask.astype(np.int64),
               "region_labels": region_labels.astype(np.int64)}
        if vlbert:
            out["masked_regions"] = np.concatenate([np.zeros((B, 1), bool), zeroed], axis=1)
        return out
