"""Region selection: hand-computed cases and a brute-force reference of the bottom-up rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import nms

from extractor.select import RegionSelector, background_first

# A and B overlap (IoU 81/119 = 0.68); C is far away; D overlaps A (0.95) and B (0.72)
BOXES = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]])
SCORES = torch.tensor([[0.9, 0.1], [0.5, 0.6], [0.25, 0.05], [0.8, 0.55]])
# class 0: A keeps 0.9, B and D are suppressed by A, C keeps 0.25
# class 1: B keeps 0.6, A and D suppressed by B, C keeps 0.05  -> best: A .9, B .6, C .25, D 0


def test_hand_computed_selection():
    selection = RegionSelector(min_boxes=1, max_boxes=36, conf_threshold=0.2)(BOXES, SCORES)
    assert selection.indices.tolist() == [0, 1, 2]
    assert selection.scores.tolist() == pytest.approx([0.9, 0.6, 0.25])


def test_threshold_min_and_max():
    assert RegionSelector(1, 36, 0.3)(BOXES, SCORES).indices.tolist() == [0, 1]
    assert RegionSelector(1, 1, 0.2)(BOXES, SCORES).indices.tolist() == [0]
    # fewer than min_boxes confident -> the top min_boxes by best surviving score, D last at 0
    low = RegionSelector(4, 36, 0.95)(BOXES, SCORES)
    assert low.indices.tolist() == [0, 1, 2, 3] and low.scores.tolist() == pytest.approx([0.9, 0.6, 0.25, 0])
    # min_boxes larger than the number of proposals: all of them
    assert len(RegionSelector(10, 36, 0.2)(BOXES, SCORES).indices) == 4


def test_background_column_moves_to_front():
    probs = torch.tensor([[0.1, 0.2, 0.7]])  # detectron2: background last
    assert background_first(probs).tolist() == [[pytest.approx(0.7), pytest.approx(0.1), pytest.approx(0.2)]]
    assert background_first(probs, background_last=False) is probs


def _reference(boxes, scores, min_boxes, max_boxes, threshold, iou=0.3):
    """bottom-up-attention generate_tsv: per-class NMS loop in numpy order."""
    best = np.zeros(len(boxes))
    for cls in range(scores.shape[1]):
        keep = nms(boxes, scores[:, cls], iou).numpy()
        best[keep] = np.maximum(best[keep], scores[keep, cls].numpy())
    order = np.argsort(-best, kind="stable")
    count = max(min(int((best >= threshold).sum()), max_boxes), min(min_boxes, len(boxes)))
    return order[:count], best[order[:count]]


@pytest.mark.parametrize("seed,temperature", [(0, 1.0), (1, 0.1), (2, 5.0)])
def test_matches_brute_force_reference(seed, temperature):
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(80, 2, generator=generator) * 100
    wh = torch.rand(80, 2, generator=generator) * 40 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = (torch.randn(80, 31, generator=generator) / temperature).softmax(dim=1)[:, 1:]
    selector = RegionSelector(min_boxes=10, max_boxes=36, conf_threshold=0.2)
    selection = selector(boxes, scores)
    indices, best = _reference(boxes, scores, 10, 36, 0.2)
    assert selection.scores.numpy() == pytest.approx(best, abs=1e-6)
    assert set(selection.indices.tolist()) == set(indices.tolist()) or \
        np.allclose(np.sort(selection.scores.numpy()), np.sort(best))  # ties may swap


def test_invalid_limits():
    with pytest.raises(ValueError, match="min_boxes <= max_boxes"):
        RegionSelector(min_boxes=40, max_boxes=36)


@pytest.mark.parametrize("seed", [3, 4])
def test_all_pairs_path_equals_batched_nms(seed):
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(50, 2, generator=generator) * 60
    boxes = torch.cat([xy, xy + torch.rand(50, 2, generator=generator) * 30 + 1], dim=1)
    scores = torch.rand(50, 12, generator=generator)
    selector = RegionSelector()
    assert torch.allclose(selector.best_surviving_scores_all_pairs(boxes, scores),
                          selector.best_surviving_scores(boxes, scores, floor=0.0))


@pytest.mark.parametrize("seed,pairs", [(5, 40), (6, 200), (7, 10_000)])
def test_top_pairs_path_equals_the_all_pairs_rule_on_the_chosen_boxes(seed, pairs):
    """Few confident proposals (flat scores): the widening floor gives the exact best scores of
    the selected proposals, whatever the first floor (40 pairs: several widenings; 10,000: all)."""
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(60, 2, generator=generator) * 80
    boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=generator) * 30 + 1], dim=1)
    scores = (torch.randn(60, 41, generator=generator) * 0.3).softmax(dim=1)[:, 1:]  # all far below 0.2
    selector = RegionSelector(min_boxes=10, max_boxes=36, conf_threshold=0.2)
    exact = selector.best_surviving_scores_all_pairs(boxes, scores)
    fast = selector.best_surviving_scores_top_pairs(boxes, scores, wanted=10, pairs=pairs)
    top = torch.argsort(exact, descending=True, stable=True)[:10]
    torch.testing.assert_close(fast[top], exact[top])
    assert (fast <= exact + 1e-7).all()  # below the floor a score may be missing, never too high
    indices, best = _reference(boxes, scores, 10, 36, 0.2)
    assert selector(boxes, scores).scores.numpy() == pytest.approx(best, abs=1e-6)
