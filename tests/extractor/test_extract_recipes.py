"""The two feature recipes (extractor/recipes.py), rule by rule on hand-built cases where they
differ, with the Caffe answer worked out by hand; and regions that do not depend on the batch."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from extractor.boxes import apply_deltas, caffe_cell_anchors, cell_anchors, clip_boxes
from extractor.config import r101_config, tiny_config
from extractor.detector import BottomUpDetector, build_detector, resize_like_caffe
from extractor.pipeline import select_regions
from extractor.rpn import top_proposals
from extractor.select import RegionSelector


def test_caffe_anchors_are_generate_anchors_rounded_and_offset():
    """generate_anchors: the 16x16 cell [0, 0, 15, 15] (centre 7.5); ratio 0.5: w = round(sqrt(256 / 0.5))
    = round(22.63) = 23, h = round(23 * 0.5) = round(11.5) = 12; ratio 2: w = round(11.31) = 11, h = 22.
    Size 128 = scale 8: ratio 0.5 -> 184 x 96 -> [7.5 - 91.5, 7.5 - 47.5, 7.5 + 91.5, 7.5 + 47.5]
    = [-84, -40, 99, 55], py-faster-rcnn's well-known first anchor."""
    anchors = caffe_cell_anchors((64.0, 128.0), (0.5, 1.0, 2.0))
    expected = torch.tensor([[-38.0, -16, 53, 31], [-24, -24, 39, 39], [-14, -36, 29, 51],  # size 64 = 92x48, ...
                             [-84, -40, 99, 55], [-56, -56, 71, 71], [-36, -80, 51, 95]])
    assert torch.equal(anchors, expected)
    # detectron2's: exact sides sqrt(64^2 / 0.5) = 90.51 x 45.25, centred on 0
    assert torch.allclose(cell_anchors((64.0,), (0.5,)), torch.tensor([[-45.2548, -22.6274, 45.2548, 22.6274]]))


def test_caffe_decoding_counts_the_extra_pixel_and_does_not_clamp():
    """bbox_transform_inv: w = x2 - x1 + 1 = 16, centre = x1 + w / 2 = 8; zero deltas give
    [8 - 8, 8 - 8, 8 + 8, 8 + 8] = [0, 0, 16, 16] (no - 1 on x2). dw = 5: w = 16 e^5 = 2374.5, unclamped;
    detectron2 caps dw at log(1000 / 16) = 4.135: w = 15 * 62.5 = 937.5."""
    anchor = torch.tensor([[0.0, 0, 15, 15]])
    assert apply_deltas(torch.zeros(1, 4), anchor, (1, 1, 1, 1), offset=1.0, clamp=False).tolist() == \
        [[0.0, 0.0, 16.0, 16.0]]
    assert apply_deltas(torch.zeros(1, 4), anchor, (1, 1, 1, 1)).tolist() == [[0.0, 0.0, 15.0, 15.0]]
    wide = torch.tensor([[0.0, 0.0, 5.0, 0.0]])
    caffe = apply_deltas(wide, anchor, (1, 1, 1, 1), offset=1.0, clamp=False)[0]
    assert (caffe[2] - caffe[0]).item() == pytest.approx(16 * np.exp(5.0), rel=1e-5)
    ports = apply_deltas(wide, anchor, (1, 1, 1, 1))[0]
    assert (ports[2] - ports[0]).item() == pytest.approx(937.5, rel=1e-4)
    # clip_boxes: Caffe to [0, W - 1] x [0, H - 1], detectron2 to [0, W] x [0, H]
    box = torch.tensor([[-5.0, -5, 120, 50]])
    assert clip_boxes(box, 100, 100, offset=1.0).tolist() == [[0.0, 0.0, 99.0, 50.0]]
    assert clip_boxes(box, 100, 100).tolist() == [[0.0, 0.0, 100.0, 50.0]]


def _proposal_case():
    """A: 10 px wide in Caffe's count (x2 - x1 + 1 = 10 < 16), the best score; B and C overlap:
    Caffe IoU = 20 * 14.2 / (400 + 20 * 14.2 - 284) = 284 / 400 = 0.71 > 0.7 (C suppressed);
    detectron2 IoU = 19 * 13.2 / 361 = 250.8 / 361 = 0.695 (C kept). D lies far away."""
    boxes = torch.tensor([[0.0, 0, 9, 9], [40, 40, 59, 59], [40, 45.8, 59, 59], [0, 70, 29, 99]])
    return boxes, torch.tensor([4.0, 3.0, 2.0, 1.0])


@pytest.mark.parametrize("recipe,pre_nms,expected", [
    ("caffe", 6000, [1, 3]),  # A dropped (< 16 px), C suppressed at 0.71
    ("detectron2", 6000, [0, 1, 2, 3]),  # A kept (min size 0), C kept at 0.695
    ("caffe", 1, [1]),  # the filter runs before the top-k: the best VALID box survives
    ("detectron2", 1, [0]),  # the top-k first: the tiny box
])
def test_proposal_layer_rules(recipe, pre_nms, expected):
    boxes, scores = _proposal_case()
    config = r101_config().replace(recipe_name=recipe, rpn_pre_nms_topk=pre_nms)
    kept = top_proposals(boxes, scores, (100, 100), 1.0, config)
    assert kept.tolist() == boxes[expected].tolist()
    # the minimum side scales with the image: at scale 0.5 Caffe's limit is 8 pixels, and A stays
    assert len(top_proposals(boxes, scores, (100, 100), 0.5, r101_config())) == 3


def test_caffe_resize_follows_the_scale_not_the_rounded_size():
    """A 1 x 4 row [0, 60, 120, 180] at scale 1.3 is 5 px wide (round(5.2)). cv2.resize(fx=1.3)
    samples x_src = (x + 0.5) / 1.3 - 0.5 = -0.115 (-> 0), 0.654, 1.423, 2.192, 2.962, i.e.
    0, 39.23, 85.38, 131.54, 177.69; a resize to 5 px samples (x + 0.5) * 0.8 - 0.5 = 0.7, 1.5, 2.3,
    3.1 (-> 3): 0, 42, 90, 138, 180. Rows: (y + 0.5) / 1.3 - 0.5 stays inside the single row."""
    row = np.array([[0, 60, 120, 180]], dtype=np.uint8)
    image = np.repeat(row[:, :, None], 3, axis=2)  # (1, 4, 3)
    caffe = resize_like_caffe(image, 1.3, (0.0, 0.0, 0.0))
    assert caffe.shape == (3, 1, 5)
    expected = [0.0, 60 * (1.5 / 1.3 - 0.5), 60 * (2.5 / 1.3 - 0.5), 60 * (3.5 / 1.3 - 0.5), 60 * (4.5 / 1.3 - 0.5)]
    assert caffe[0, 0].tolist() == pytest.approx(expected, abs=1e-3)
    assert caffe[0, 0, 1].item() == pytest.approx(39.2308, abs=1e-3)
    # the mean is subtracted per channel, BGR order: channel 0 is blue
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[..., 0], colour[..., 2] = 200, 50  # R, B
    shifted = resize_like_caffe(colour, 1.0, (102.9801, 115.9465, 122.7717))
    assert shifted[:, 0, 0].tolist() == pytest.approx([50 - 102.9801, 0 - 115.9465, 200 - 122.7717], abs=1e-4)


def _tiny(recipe: str) -> BottomUpDetector:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_detector(tiny_config(use_attributes=True).replace(recipe_name=recipe))


@pytest.mark.parametrize("recipe", ["caffe", "detectron2"])
def test_regions_do_not_depend_on_the_batch(recipe):
    """Eight images of five sizes (two pairs and a triple share one): at batch sizes 1, 3 and 8 each
    image gets the same regions, features and class distributions."""
    detector = _tiny(recipe)
    rng = np.random.default_rng(0)
    sizes = [(60, 80), (90, 70), (60, 80), (48, 64), (120, 90), (90, 70), (60, 80), (75, 100)]
    images = []
    for height, width in sizes:
        image = np.full((height, width, 3), 90, np.uint8)
        for _ in range(4):  # a few flat rectangles, as objects
            y, x = rng.integers(0, height - 10), rng.integers(0, width - 10)
            image[y: y + rng.integers(8, height // 2), x: x + rng.integers(8, width // 2)] = rng.integers(0, 255, 3)
        images.append(image)
    selector = RegionSelector.for_recipe(detector.config.recipe)

    def regions(batch_size):
        found = []
        for start in range(0, len(images), batch_size):
            batch = images[start: start + batch_size]
            outputs, scales = detector(batch)
            found += [select_regions(o, s, im.shape[1], im.shape[0], selector)
                      for o, s, im in zip(outputs, scales, batch)]
        return found

    alone = regions(1)
    for batch_size in (3, 8):
        for (boxes, features, probs, attrs), (boxes1, features1, probs1, attrs1) in zip(regions(batch_size), alone):
            np.testing.assert_allclose(boxes, boxes1, atol=1e-4)
            np.testing.assert_allclose(features, features1, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(probs, probs1, atol=1e-6)
            np.testing.assert_allclose(attrs, attrs1, atol=1e-6)


def test_caffe_recipe_selects_in_original_pixels():
    """The +1 rule is not scale-free: the selection runs on boxes divided by the scale, as
    generate_tsv.py's cls_boxes = rois / im_scale. Two boxes 10 px apart in a 4x-downscaled image:
    in original pixels [0, 0, 39, 39] and [10, 0, 49, 39]: IoU 30*40 / (1600 + 1600 - 1200) = 0.6."""
    from extractor.roi_heads import RegionOutputs

    resized = torch.tensor([[0.0, 0, 9.75, 9.75], [2.5, 0, 12.25, 9.75]])
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])  # one class, then background (last)
    output = RegionOutputs(boxes=resized, features=torch.zeros(2, 4), cls_probs=probs)
    for iou, kept in ((0.59, 1), (0.61, 2)):
        selector = RegionSelector(min_boxes=1, max_boxes=36, conf_threshold=0.5, nms_iou=iou)
        boxes, _, _, _ = select_regions(output, 0.25, 100, 100, selector)
        assert len(boxes) == kept


def test_a_pickle_without_norm_statistics_loads_as_detectron2_loads_it(tmp_path):
    """Norms stored as weight and bias only: running_mean 0, running_var 1 (detectron2's
    FrozenBatchNorm2d._load_from_state_dict for unversioned checkpoints), everything else exact."""
    from extractor.weights import load_detector_weights

    source = _tiny("caffe")
    state = {name: tensor.clone() for name, tensor in source.state_dict().items()}
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            tensor.uniform_(0.5, 1.5)
    stripped = {n: t.numpy() for n, t in state.items() if not n.endswith(("running_mean", "running_var"))}
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    path.write_bytes(pickle.dumps({"model": stripped}))
    model = BottomUpDetector(tiny_config(use_attributes=True))
    load_detector_weights(model, str(path))
    loaded = model.state_dict()
    norms = [n for n in loaded if n.endswith("running_var")]
    assert norms and all(torch.equal(loaded[n], torch.ones_like(loaded[n])) for n in norms)
    assert all(torch.equal(loaded[n.replace("var", "mean")], torch.zeros_like(loaded[n])) for n in norms)
    assert all(torch.equal(loaded[n], torch.from_numpy(stripped[n])) for n in stripped)
