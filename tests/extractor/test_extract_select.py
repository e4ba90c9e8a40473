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


def _caffe_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list:
    """Greedy NMS with areas (x2 - x1 + 1)(y2 - y1 + 1), suppressing overlaps > iou (Caffe's rule)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        first, order = order[0], order[1:]
        keep.append(first)
        rest = np.array(order, dtype=int)
        w = np.maximum(0.0, np.minimum(x2[first], x2[rest]) - np.maximum(x1[first], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[first], y2[rest]) - np.maximum(y1[first], y1[rest]) + 1)
        overlap = w * h / (areas[first] + areas[rest] - w * h)
        order = [i for i, o in zip(order, overlap) if o <= iou]
    return keep


def _reference(boxes, scores, min_boxes, max_boxes, threshold, iou=0.3, recipe="caffe"):
    """bottom-up-attention's generate_tsv rule, written out: per-class NMS loop, best surviving score.
    caffe: +1 areas, the threshold branch in proposal order (np.where), otherwise argsort()[::-1];
    detectron2: torchvision's IoU, best score first."""
    boxes_np, scores_np = boxes.double().numpy(), scores.double().numpy()
    best = np.zeros(len(boxes))
    for cls in range(scores.shape[1]):
        keep = _caffe_nms(boxes_np, scores_np[:, cls], iou) if recipe == "caffe" \
            else nms(boxes, scores[:, cls], iou).numpy()
        best[keep] = np.maximum(best[keep], scores_np[keep, cls])
    confident = np.where(best >= threshold)[0]
    if recipe == "detectron2":
        order = np.argsort(-best, kind="stable")
        count = max(min(len(confident), max_boxes), min(min_boxes, len(boxes)))
        return order[:count], best[order[:count]]
    if len(confident) < min_boxes:
        chosen = np.argsort(best, kind="stable")[::-1][:min_boxes]
    elif len(confident) > max_boxes:
        chosen = np.argsort(best, kind="stable")[::-1][:max_boxes]
    else:
        chosen = confident
    return chosen, best[chosen]


@pytest.mark.parametrize("recipe", ["caffe", "detectron2"])
@pytest.mark.parametrize("seed,temperature", [(0, 1.0), (1, 0.1), (2, 5.0), (8, 0.5)])
def test_matches_brute_force_reference(seed, temperature, recipe):
    from extractor.recipes import RECIPES

    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(80, 2, generator=generator) * 100
    wh = torch.rand(80, 2, generator=generator) * 40 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = (torch.randn(80, 31, generator=generator) / temperature).softmax(dim=1)[:, 1:]
    selector = RegionSelector.for_recipe(RECIPES[recipe], min_boxes=10, max_boxes=36, conf_threshold=0.2)
    selection = selector(boxes, scores)
    indices, best = _reference(boxes, scores, 10, 36, 0.2, recipe=recipe)
    assert selection.indices.tolist() == indices.tolist()  # the same regions in the same order
    assert selection.scores.numpy() == pytest.approx(best, abs=1e-6)


def test_caffe_nms_counts_the_extra_pixel():
    """Two 10x10-pixel boxes (x2 - x1 = 9) offset by 3: Caffe IoU = 7*10 / (100 + 100 - 70) = 0.538;
    without the +1 the same corners give 6*9 / (81 + 81 - 54) = 0.5. At IoU 0.52 only Caffe suppresses."""
    boxes = torch.tensor([[0.0, 0, 9, 9], [3, 0, 12, 9]])
    scores = torch.tensor([[0.9], [0.8]])
    assert RegionSelector(1, 36, 0.2, nms_iou=0.52, box_offset=1.0).best_surviving_scores(
        boxes, scores, 0.0).tolist() == pytest.approx([0.9, 0.0])
    assert RegionSelector(1, 36, 0.2, nms_iou=0.52, box_offset=0.0).best_surviving_scores(
        boxes, scores, 0.0).tolist() == pytest.approx([0.9, 0.8])
    from extractor.boxes import iou_offset

    assert iou_offset(boxes, 1.0)[0, 1].item() == pytest.approx(70 / 130)
    assert iou_offset(boxes, 0.0)[0, 1].item() == pytest.approx(0.5)


def test_caffe_keeps_the_threshold_branch_in_proposal_order():
    """Three far-apart proposals, best scores 0.3, 0.9, 0.5 (in proposal order), all above 0.2,
    between min and max: Caffe keeps np.where's order [0, 1, 2]; the detectron2 ports sort [1, 2, 0].
    Below min_boxes both sort by score; Caffe breaks the tie between the 0.5s later-first."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110], [150, 0, 160, 10]])
    scores = torch.tensor([[0.3], [0.9], [0.5], [0.5]])
    caffe = RegionSelector(min_boxes=1, max_boxes=4, conf_threshold=0.2, threshold_order="proposal")
    ports = RegionSelector(min_boxes=1, max_boxes=4, conf_threshold=0.2, threshold_order="score")
    assert caffe(boxes, scores).indices.tolist() == [0, 1, 2, 3]
    assert ports(boxes, scores).indices.tolist() == [1, 2, 3, 0]
    assert RegionSelector(1, 2, 0.2, threshold_order="proposal")(boxes, scores).indices.tolist() == [1, 3]
    assert RegionSelector(1, 2, 0.2, threshold_order="score")(boxes, scores).indices.tolist() == [1, 2]


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
