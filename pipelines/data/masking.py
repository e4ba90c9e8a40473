"""Vectorised pretraining masks for a whole batch, as the official ViLBERT Conceptual Captions
loader draws them per sample: text 15% (80% [MASK], 10% random token, 10% kept), regions 15%
(90% zeroed, 10% kept), and the [IMG] token as the mean of the regions that are neither masked
nor overlapping a masked region (IoU > 0.4). VL-BERT's (`--objective vlbert`): the same draws, the
whole-image element averaged over the regions whose feature is kept (`vlbert_image_weights`), and
whole-word masking of captions and text-only corpus rows (`mask_corpus_text`)."""
from __future__ import annotations

import numpy as np

from vilbert import IGNORE_INDEX

TEXT_MASK_PROB = 0.15
REGION_MASK_PROB = 0.15
REGION_ZERO_PROB = 0.9  # of the masked regions, the share whose feature is zeroed
OVERLAP_IOU = 0.4


def mask_text(input_ids: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, mask_id: int,
              vocab_size: int, prob: float = TEXT_MASK_PROB) -> tuple[np.ndarray, np.ndarray]:
    """input_ids (B, T) = [CLS] tokens [SEP] pad..., lengths (B,) real tokens incl. [CLS]/[SEP].

    -> (masked input_ids (B, T), lm_labels (B, T): original id where masked, IGNORE_INDEX elsewhere).
    Each caption token is picked with `prob`; a picked token becomes [MASK] (80%), a uniformly
    random vocabulary id (10%) or stays (10%). [CLS], [SEP] and padding are never picked."""
    B, T = input_ids.shape
    position = np.arange(T)[None, :]  # (1, T)
    candidate = (position >= 1) & (position < lengths[:, None] - 1)  # (B, T) caption tokens only
    draw = rng.random((B, T))  # one uniform per token, split like the official loader
    picked = candidate & (draw < prob)
    return _replace_picked(input_ids, picked, draw / prob, mask_id, vocab_size, rng)


def mask_regions(num_boxes: np.ndarray, max_regions: int, rng: np.random.Generator,
                 prob: float = REGION_MASK_PROB, zero_prob: float = REGION_ZERO_PROB):
    """num_boxes (B,) -> (masked (B, R) bool: MRM targets, zeroed (B, R) bool: features set to 0)."""
    B, R = len(num_boxes), max_regions
    real = np.arange(R)[None, :] < num_boxes[:, None]  # (B, R)
    draw = rng.random((B, R))
    masked = real & (draw < prob)
    zeroed = masked & (draw / prob < zero_prob)
    return masked, zeroed


def box_iou(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU within each sample: boxes (B, R, 4) x1, y1, x2, y2 -> (B, R, R).

    Continuous areas (no '+1' pixel convention); boxes of zero area have IoU 0 with everything."""
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))  # each (B, R)
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)  # (B, R)
    iw = np.minimum(x2[:, :, None], x2[:, None, :]) - np.maximum(x1[:, :, None], x1[:, None, :])
    ih = np.minimum(y2[:, :, None], y2[:, None, :]) - np.maximum(y1[:, :, None], y1[:, None, :])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)  # (B, R, R)
    union = area[:, :, None] + area[:, None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def image_token_weights(masked: np.ndarray, real: np.ndarray, boxes: np.ndarray,
                        overlap_iou: float = OVERLAP_IOU) -> np.ndarray:
    """Weights (B, R) of each region in the [IMG] mean: 1/k over the k real regions that are not
    masked and do not overlap a masked region with IoU > overlap_iou; all 0 when none is left."""
    overlaps = box_iou(boxes) > overlap_iou  # (B, R, R)
    near_masked = (overlaps & masked[:, None, :]).any(axis=2)  # (B, R)
    kept = real & ~masked & ~near_masked
    count = kept.sum(axis=1, keepdims=True)  # (B, 1)
    return kept / np.maximum(count, 1)


def vlbert_image_weights(replaced: np.ndarray, real: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """VL-BERT's whole-image element (pretrain/data/datasets/conceptual_captions.py, precomputed
    features, ADD_IMAGE_AS_A_BOX): the sum of the real regions' features less the replaced ones
    (mvrc_ops == 1), divided by (real - replaced + 1e-5). Masked regions whose feature is kept (the
    10 %) stay in; no IoU rule. replaced, real (B, R) bool -> weights (B, R)."""
    kept = real & ~replaced
    return kept / (kept.sum(axis=1, keepdims=True) + eps)


def mask_corpus_text(input_ids: np.ndarray, words: np.ndarray, rng: np.random.Generator, mask_id: int,
                     vocab_size: int, prob: float = TEXT_MASK_PROB) -> tuple[np.ndarray, np.ndarray]:
    """Whole-word masking (objective vlbert), as VL-BERT's random_word_wwm of general_corpus.py and
    conceptual_captions.py (captions: [CLS], [SEP] have word -1, never picked): one draw per
    word; a picked word's WordPieces all become [MASK] (80 %), random ids (10 %) or stay (10 %),
    and all are predicted. input_ids (B, T) 0-padded without [CLS]/[SEP], words (B, T) the word
    index of each token (-1 at padding) -> (masked input_ids, lm_labels)."""
    B, T = input_ids.shape
    draw_word = rng.random((B, T))  # one uniform per word (word index < T)
    draw = np.take_along_axis(draw_word, np.clip(words, 0, None), axis=1)  # (B, T): the token's word's draw
    picked = (words >= 0) & (draw < prob)
    return _replace_picked(input_ids, picked, draw / prob, mask_id, vocab_size, rng)


def _replace_picked(input_ids: np.ndarray, picked: np.ndarray, scaled: np.ndarray, mask_id: int, vocab_size: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's replacement of the picked tokens, from their uniform draw scaled to [0, 1): [MASK] below
    0.8, a random vocabulary id below 0.9, unchanged above; all picked ones are predicted.
    -> (masked input_ids, lm_labels)  # (B, T), (B, T)"""
    lm_labels = np.where(picked, input_ids, IGNORE_INDEX)
    masked = input_ids.copy()
    masked[picked & (scaled < 0.8)] = mask_id
    to_random = picked & (scaled >= 0.8) & (scaled < 0.9)
    masked[to_random] = rng.integers(0, vocab_size, size=int(to_random.sum()))
    return masked, lm_labels
