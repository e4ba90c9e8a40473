"""Weight files in both real formats round-trip strictly; unsafe pickles are refused unexecuted."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from extractor.cli import main
from extractor.config import tiny_config
from extractor.detector import BottomUpDetector, build_detector
from extractor.weights import WeightsError, file_sha256_prefix, load_detector_weights

from extract_helpers import read_shards, write_images


def _random_state(seed: int = 3):
    model = BottomUpDetector(tiny_config(use_attributes=True))
    model.random_init(seed)
    return model, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_loaded(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_pickle_round_trip(tmp_path, protocol):
    _, state = _random_state()
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    payload = {"model": {n: t.numpy() for n, t in state.items()}, "__author__": "test",
               "matching_heuristics": True}
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    model = BottomUpDetector(tiny_config(use_attributes=True))
    model.random_init(seed=99)
    load_detector_weights(model, str(path))
    _assert_loaded(model, state)
    assert model.weights_hash == file_sha256_prefix(str(path)) and len(model.weights_hash) == 16


def test_hf_frcnn_bin_round_trip_with_hf_extras(tmp_path):
    source, state = _random_state()
    hf_state = dict(state)
    for name in list(state):
        if name.endswith("norm.running_var"):  # HF uses BatchNorm2d: it stores a counter
            hf_state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    hf_state["proposal_generator.anchor_generator.cell_anchors.0"] = source.proposal_generator.base_anchors
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf_state, path)
    model = build_detector(tiny_config(use_attributes=True), weights=str(path))
    _assert_loaded(model, state)

    hf_state["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(12, 4)
    torch.save(hf_state, path)
    with pytest.raises(WeightsError, match="differs from the configured anchors"):
        build_detector(tiny_config(use_attributes=True), weights=str(path))


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    _, state = _random_state()
    state.pop("roi_heads.box_predictor.attr_score.weight")
    state["roi_heads.box_predictor.surprise"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load_detector_weights(BottomUpDetector(tiny_config(use_attributes=True)), str(path))
    message = str(error.value)
    assert "broken.pth" in message and "attr_score.weight" in message and "surprise" in message
    # the attribute weights in a detector built without the attribute head: unexpected names
    _, state = _random_state()
    torch.save(state, path)
    with pytest.raises(WeightsError, match="unexpected: .*cls_embedding.*pass --attributes"):
        load_detector_weights(BottomUpDetector(tiny_config(use_attributes=False)), str(path))


def test_shape_mismatch_is_reported(tmp_path):
    _, state = _random_state()
    state["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(81)
    path = tmp_path / "coco.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"cls_score.bias: file \(81,\) vs model \(1601,\)"):
        load_detector_weights(BottomUpDetector(tiny_config(use_attributes=True)), str(path))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": _Exploit(marker)}}))
    with pytest.raises(WeightsError, match=r"evil.pkl: refusing to unpickle global (posix|os)\.system"):
        load_detector_weights(BottomUpDetector(tiny_config()), str(path))
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": np.array([{"a": 1}], dtype=object)}}))
    with pytest.raises(WeightsError, match="objects.pkl: x has non-numeric dtype object"):
        load_detector_weights(BottomUpDetector(tiny_config()), str(path))


def test_malicious_torch_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"x": _Exploit(marker)}, path)
    with pytest.raises(WeightsError, match="evil.bin: refused: the file holds pickled data") as raised:
        load_detector_weights(BottomUpDetector(tiny_config()), str(path))
    assert not marker.exists() and "weights_only=False" not in str(raised.value)


def test_bad_files_fail_clearly(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(WeightsError, match="junk.pkl: not a readable detectron2 pickle"):
        load_detector_weights(BottomUpDetector(tiny_config()), str(tmp_path / "junk.pkl"))
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(WeightsError, match="unknown weight format"):
        load_detector_weights(BottomUpDetector(tiny_config()), str(tmp_path / "w.h5"))
    with pytest.raises(WeightsError, match="not found"):
        load_detector_weights(BottomUpDetector(tiny_config()), str(tmp_path / "absent.pkl"))


def test_caffe2_blob_names_are_explained(tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"res2_0_branch2a_w": np.zeros((1, 1), np.float32)}}))
    with pytest.raises(WeightsError, match="model_final.pkl: uses Caffe2/Detectron1 blob names"):
        load_detector_weights(BottomUpDetector(tiny_config()), str(path))


def test_cli_records_the_weights_hash(tmp_path):
    _, state = _random_state()
    weights = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    weights.write_bytes(pickle.dumps({"model": {n: t.numpy() for n, t in state.items()}, "__author__": "t"}))
    images = write_images(tmp_path / "images", 1)
    main([str(images), str(tmp_path / "out"), "--config", "tiny", "--attributes", "--workers", "0",
          "--quiet", "--weights", str(weights)])
    (sample,) = read_shards(tmp_path / "out").values()
    assert sample["json"]["weights_hash"] == file_sha256_prefix(str(weights))
    assert sample["attr_prob.npy"].shape[1] == 401
