"""Masking statistics, locations, the [IMG] token and the negative-pair rule (pipelines/data/masking.py,
pipelines/data/batching.py), on batches built in memory."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.batching import BatchBuilder, region_locations
from pipelines.data.masking import IGNORE_INDEX, box_iou, image_token_weights, mask_regions, mask_text
from pipelines.data.samples import RegionSample
from pipelines.data.tokenization import CaptionTokenizer, load_tokenizer

from shards import WORDS, random_boxes, write_vocab

CLS, SEP, MASK, VOCAB = 1, 2, 3, 1000


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CaptionTokenizer(load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")))


def test_text_masking_rates_split_and_never_specials():
    rng = np.random.default_rng(0)
    B, T = 4000, 36
    lengths = rng.integers(3, T + 1, size=B)
    ids = rng.integers(10, VOCAB, size=(B, T))
    ids[:, 0] = CLS
    ids[np.arange(B), lengths - 1] = SEP
    ids[np.arange(T)[None] >= lengths[:, None]] = 0
    masked, labels = mask_text(ids, lengths, rng, MASK, VOCAB)

    picked = labels != IGNORE_INDEX
    candidates = lengths.sum() - 2 * B
    assert abs(picked.sum() / candidates - 0.15) < 0.006
    assert not picked[:, 0].any() and not picked[np.arange(B), lengths - 1].any()
    assert not picked[np.arange(T)[None] >= lengths[:, None]].any()
    assert (labels[picked] == ids[picked]).all()
    assert (masked[~picked] == ids[~picked]).all()  # nothing else changes
    to_mask = (masked[picked] == MASK).mean()
    kept = (masked[picked] == ids[picked]).mean()
    random_other = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.012 and abs(random_other - 0.1) < 0.012


def test_region_masking_rates_and_zeroing_share():
    rng = np.random.default_rng(1)
    counts = rng.integers(10, 37, size=5000)
    masked, zeroed = mask_regions(counts, 36, rng)
    real = np.arange(36)[None] < counts[:, None]
    assert not masked[~real].any() and not (zeroed & ~masked).any()
    assert abs(masked.sum() / real.sum() - 0.15) < 0.005
    assert abs(zeroed.sum() / masked.sum() - 0.9) < 0.01


def test_locations_hand_computed():
    boxes = np.array([[[10, 5, 60, 25], [0, 0, 100, 50]]], np.float32)  # (1, 2, 4) in a 100x50 image
    loc = region_locations(boxes, np.array([[100.0, 50.0]]))
    expected = [[0.1, 0.1, 0.6, 0.5, 0.5 * 0.4], [0, 0, 1, 1, 1]]
    np.testing.assert_allclose(loc[0], expected, rtol=1e-6)


def test_iou_and_image_token_excludes_masked_and_overlapping_regions():
    boxes = np.array([[[0, 0, 50, 25],  # 0: masked
                       [0, 0, 50, 20],  # 1: IoU 0.8 with 0 -> excluded
                       [25, 0, 75, 25],  # 2: IoU 1/3 with 0 -> kept
                       [60, 30, 100, 50],  # 3: disjoint -> kept
                       [0, 0, 0, 0]]], np.float32)  # 4: padding
    iou = box_iou(boxes)[0]
    assert iou[0, 1] == pytest.approx(0.8) and iou[0, 2] == pytest.approx(1 / 3) and iou[0, 3] == 0
    masked = np.array([[True, False, False, False, False]])
    real = np.array([[True, True, True, True, False]])
    weights = image_token_weights(masked, real, boxes)
    np.testing.assert_allclose(weights, [[0, 0, 0.5, 0.5, 0]])
    nothing_left = image_token_weights(np.array([[True, True, False, False, False]]),
                                       np.array([[True, True, False, False, False]]), boxes)
    assert not nothing_left.any()


def make_samples(rng, n, feature_dim=8, num_classes=5, width=200, height=100):
    """Distinct captions (a unique word pair per sample), 10-36 regions each."""
    out = []
    for i in range(n):
        k = int(rng.integers(10, 37))
        caption = f"{WORDS[i % len(WORDS)]} {WORDS[(i // len(WORDS)) % len(WORDS)]} dog on the street"
        out.append(RegionSample(f"k{i}", "mem", caption, rng.random((k, feature_dim)).astype(np.float16),
                                random_boxes(rng, k, width, height),
                                rng.random((k, num_classes)).astype(np.float16), (width, height)))
    return out


def test_batch_image_token_and_zeroing_match_a_per_sample_reference(tokenizer):
    rng = np.random.default_rng(2)
    samples = make_samples(rng, 32)
    batch = BatchBuilder(tokenizer, objective=2, seed=0)(samples)
    feat, labels = batch["image_feat"].numpy(), batch["region_labels"].numpy()
    targets, row = batch["region_targets"].numpy(), 0
    for b, s in enumerate(samples):
        n = len(s.features)
        masked = labels[b, 1:n + 1].astype(bool)
        original = s.features.astype(np.float32)
        zeroed = (feat[b, 1:n + 1] == 0).all(axis=1)
        assert (zeroed <= masked).all()  # only masked regions are zeroed
        np.testing.assert_array_equal(feat[b, 1:n + 1][~zeroed], original[~zeroed])
        keep = []
        for i in range(n):  # the rule, written naively
            overlaps = [j for j in range(n) if masked[j] and iou_xyxy(s.boxes[i], s.boxes[j]) > 0.4]
            keep.append(not masked[i] and not overlaps)
        expected = original[keep].mean(0) if any(keep) else np.zeros(original.shape[1])
        np.testing.assert_allclose(feat[b, 0], expected, rtol=1e-5, atol=1e-6)
        # the compact targets: the stored distributions of this sample's masked regions, in order
        np.testing.assert_array_equal(targets[row: row + masked.sum()], s.cls_prob[masked].astype(np.float32))
        row += masked.sum()
    assert labels[:, 1:].sum() > 0 and row == len(targets)


def iou_xyxy(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union


def own_caption_rows(batch, tokenizer, samples) -> np.ndarray:
    """(B,) True where the unmasked tokens of input_ids agree with the sample's own caption."""
    own, _ = tokenizer([s.caption for s in samples])
    ids, labels = batch["input_ids"].numpy(), batch["lm_labels"].numpy()
    original = np.where(labels != IGNORE_INDEX, labels, ids)  # undo the masking
    return (original == own).all(axis=1)


@pytest.mark.parametrize("objective", [0, 1, 2])
def test_negative_pair_rule(tokenizer, objective):
    rng = np.random.default_rng(3)
    builder = BatchBuilder(tokenizer, objective=objective, seed=1)
    align, own, lm_on_neg, mrm_on_neg, masked_inputs_on_neg, zeroed_regions_on_neg = [], [], 0, 0, 0, 0
    for _ in range(40):
        samples = make_samples(rng, 32)
        batch = builder(samples)
        a = batch["align_labels"].numpy()
        align.append(a)
        own.append(own_caption_rows(batch, tokenizer, samples))
        neg = a == 1
        lm_on_neg += (batch["lm_labels"].numpy()[neg] != IGNORE_INDEX).sum()
        mrm_on_neg += batch["region_labels"].numpy()[neg].sum()
        masked_inputs_on_neg += (batch["input_ids"].numpy()[neg] == tokenizer.mask_id).sum()
        zero_rows = (batch["image_feat"].numpy()[:, 1:] == 0).all(-1) & (batch["image_mask"].numpy()[:, 1:] == 1)
        zeroed_regions_on_neg += zero_rows[neg].sum()
    align, own = np.concatenate(align), np.concatenate(own)
    assert ((align == 0) == own).all()  # label 0 <=> the image's own caption
    if objective == 2:
        assert not align.any()
        return
    assert abs(align.mean() - 0.5) < 0.04
    assert masked_inputs_on_neg > 0 and zeroed_regions_on_neg > 0  # negatives are masked like positives
    if objective == 1:
        assert lm_on_neg == 0 and mrm_on_neg == 0
    else:
        assert lm_on_neg > 0 and mrm_on_neg > 0


def test_deterministic_builder_repeats_masks_for_the_same_keys(tokenizer):
    samples = make_samples(np.random.default_rng(4), 16)
    first = BatchBuilder(tokenizer, seed=5, deterministic=True)(samples)
    second = BatchBuilder(tokenizer, seed=5, deterministic=True)(samples)
    for name in ("input_ids", "lm_labels", "region_labels", "align_labels", "image_feat"):
        assert (first[name] == second[name]).all(), name


def test_bad_objective_is_refused(tokenizer):
    with pytest.raises(ValueError, match="objective"):
        BatchBuilder(tokenizer, objective=3)


def test_batch_masking_rates_end_to_end(tokenizer):
    rng = np.random.default_rng(6)
    builder = BatchBuilder(tokenizer, objective=2, seed=2)
    picked = candidates = to_mask = masked_regions = real_regions = zeroed = 0
    for _ in range(40):
        batch = builder(make_samples(rng, 32))
        labels, ids = batch["lm_labels"].numpy(), batch["input_ids"].numpy()
        picked += (labels != IGNORE_INDEX).sum()
        candidates += (batch["attention_mask"].numpy().sum(1) - 2).sum()
        to_mask += (ids[labels != IGNORE_INDEX] == tokenizer.mask_id).sum()
        region = batch["region_labels"].numpy()[:, 1:] == 1
        masked_regions += region.sum()
        real_regions += batch["image_mask"].numpy()[:, 1:].sum()
        zeroed += (batch["image_feat"].numpy()[:, 1:][region] == 0).all(-1).sum()
    assert abs(picked / candidates - 0.15) < 0.015
    assert abs(to_mask / picked - 0.8) < 0.04
    assert abs(masked_regions / real_regions - 0.15) < 0.01
    assert abs(zeroed / masked_regions - 0.9) < 0.025
