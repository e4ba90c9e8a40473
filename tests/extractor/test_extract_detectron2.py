"""--backend detectron2 gives the torch backend's regions, features and distributions on the same
weights file (tiny and r101, detected and given boxes, with and without attributes, both recipes).
Skipped without detectron2 (not on PyPI): .ci/run installs the CPU wheel from ../shared/wheels/."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from extractor.backend_detectron2 import Detectron2BottomUpDetector, build_detectron2_detector
from extractor.cli import main
from extractor.config import r101_config, tiny_config
from extractor.detector import BottomUpDetector, build_detector
from extractor.pipeline import select_regions
from extractor.select import RegionSelector

from extract_helpers import read_shards, write_images


def _images():
    rng = np.random.default_rng(0)
    images = []
    for height, width in ((48, 64), (70, 50)):
        image = np.full((height, width, 3), 120, np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, height - 10), rng.integers(0, width - 10)
            image[y: y + 20, x: x + 16] = rng.integers(0, 255, 3)
        images.append(image)
    return images


def _weights_file(tmp_path, config, seed=5):
    """Random weights in the real detectron2 pickle layout ({"model": {name: ndarray}})."""
    source = BottomUpDetector(config)
    source.random_init(seed)
    path = tmp_path / "faster_rcnn_from_caffe.pkl"
    path.write_bytes(pickle.dumps({"model": {n: t.numpy() for n, t in source.state_dict().items()}}))
    return str(path)


def _assert_same(ours, theirs, selector=None, images=None, scales=None):
    for index, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(b.features, a.features, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.cls_probs, a.cls_probs, rtol=1e-4, atol=1e-6)
        if a.attr_probs is not None:
            torch.testing.assert_close(b.attr_probs, a.attr_probs, rtol=1e-4, atol=1e-6)
        if selector is not None:  # and so the same selected regions
            image, scale = images[index], scales[index]
            chosen_a = select_regions(a, scale, image.shape[1], image.shape[0], selector)[0]
            chosen_b = select_regions(b, scale, image.shape[1], image.shape[0], selector)[0]
            np.testing.assert_allclose(chosen_b, chosen_a, atol=1e-3)


@pytest.mark.parametrize("recipe", ["caffe", "detectron2"])
@pytest.mark.parametrize("attributes", [True, False])
@pytest.mark.parametrize("network", ["tiny", "r101"])
def test_backends_agree_on_one_weights_file(tmp_path, network, attributes, recipe):
    config = tiny_config(use_attributes=attributes) if network == "tiny" else \
        r101_config(use_attributes=attributes).replace(test_min_size=64, test_max_size=96)  # small inputs: CPU time
    config = config.replace(recipe_name=recipe)
    weights = _weights_file(tmp_path, config)
    ours = build_detector(config, weights)
    theirs = build_detectron2_detector(config, weights)
    assert isinstance(theirs, Detectron2BottomUpDetector)
    images = _images()
    detected_a, scales = ours(images)
    detected_b, scales_b = theirs(images)
    assert scales == scales_b
    _assert_same(detected_a, detected_b, RegionSelector.for_recipe(config.recipe), images, scales)
    given = [np.array([[2, 3, 30, 40], [10, 5, 45, 20]], np.float32), np.array([[0, 0, 49, 69]], np.float32)]
    _assert_same(ours(images, given)[0], theirs(images, given)[0])


def test_the_same_seed_gives_the_same_random_weights():
    config = tiny_config(use_attributes=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = build_detector(config, seed=11), build_detectron2_detector(config, None, seed=11)
    mine, other = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(other)
    assert all(torch.equal(mine[name], other[name]) for name in mine)


@pytest.mark.parametrize("gt_boxes", [False, True])
def test_cli_backend_detectron2_writes_the_torch_backends_shards(tmp_path, gt_boxes):
    images = write_images(tmp_path / "images", 3)
    extra = []
    if gt_boxes:
        boxes = tmp_path / "boxes.json"
        boxes.write_text('{"img000": [[1, 1, 20, 20]], "img001": [[0, 0, 30, 25], [5, 5, 15, 15]], '
                         '"img002": [[2, 2, 9, 9]]}')
        extra = ["--gt-boxes", str(boxes)]
    common = [str(images), "--config", "tiny", "--quiet", "--workers", "0", "--attributes", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_run = main([common[0], str(tmp_path / "torch"), *common[1:]])
        d2_run = main([common[0], str(tmp_path / "d2"), *common[1:], "--backend", "detectron2"])
    assert torch_run["done"] == d2_run["done"] == 3
    ours, theirs = read_shards(tmp_path / "torch"), read_shards(tmp_path / "d2")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert (ours[key]["json"].pop("backend"), theirs[key]["json"].pop("backend")) == ("torch", "detectron2")
        assert theirs[key]["json"] == ours[key]["json"]
        np.testing.assert_allclose(theirs[key]["boxes.npy"], ours[key]["boxes.npy"], atol=1e-3)
        for member in ("features.npy", "cls_prob.npy", "attr_prob.npy"):  # float16
            np.testing.assert_allclose(theirs[key][member].astype(np.float32),
                                       ours[key][member].astype(np.float32), rtol=2e-3, atol=2e-3)
