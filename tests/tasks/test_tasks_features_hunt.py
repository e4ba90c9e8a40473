"""The feature store and the fine-tuning plan on the inputs of the 2026-12-01 hunt: NaN or infinite
features and boxes, zero or negative image sizes, a KEY.json that is not an object, and a
--batch-size smaller than one --micro-batch-size per process."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest

from common.shard_writer import ShardWriter
from pipelines.tasks.base import TaskOptions
from pipelines.tasks.features import FeatureStore, check_features
from pipelines.tasks.finetune import make_plan

from tasks_data import make_vqa, npy, run_cli, tiny_checkpoint, write_vocab

BOXES = np.array([[0, 0, 10, 10], [5, 5, 20, 30]], np.float32)


def _sample(info=None, features=None, boxes=None, raw_json: bytes | None = None) -> dict:
    info = {"image_id": "x", "width": 40, "height": 40, **(info or {})}
    with np.errstate(over="ignore"):  # 1e6 becomes inf in float16, as an overflowing extraction would store it
        features = (np.ones((2, 4), np.float32) if features is None else features).astype(np.float16)
    return {"json": raw_json if raw_json is not None else json.dumps(info).encode(),
            "features.npy": npy(features),
            "boxes.npy": npy(BOXES if boxes is None else boxes)}


def _store(folder, samples: dict) -> FeatureStore:
    with ShardWriter(str(folder), "feat", 100) as writer:
        for key, members in samples.items():
            writer.write(key, members)
    return FeatureStore(folder)


def test_non_finite_features_or_boxes_are_refused_naming_the_shard_and_key(tmp_path):
    nan = np.ones((2, 4), np.float32)
    nan[1, 2] = np.nan
    inf_box = BOXES.copy()
    inf_box[0, 3] = np.inf
    store = _store(tmp_path, {"0001": _sample(), "0002": _sample(features=nan), "0003": _sample(boxes=inf_box),
                              "0004": _sample(features=np.full((2, 4), 1e6))})  # 1e6: inf in float16
    assert np.allclose(store.get(1).features, 1)
    shard = str(tmp_path / "feat-000000.tar")
    for image_id, what in ((2, "1 of its 8 feature values"), (3, "1 of its 8 box coordinates"),
                           (4, "8 of its 8 feature values")):
        with pytest.raises(ValueError, match=rf"^{shard}: sample 000{image_id}: {what} are NaN or infinite"):
            store.get(image_id)


@pytest.mark.parametrize("info, said", [
    ({"width": 0}, "image width 0,"), ({"height": -5}, "image height -5,"), ({"width": 40.5}, "image width 40.5,"),
    ({"height": "40"}, "image height '40',"), ({"width": None}, "image width None,"),
    ({"width": True}, "image width True,")])
def test_zero_negative_or_non_integer_image_sizes_are_refused_before_any_work(tmp_path, info, said):
    store = _store(tmp_path, {"0001": _sample(), "0002": _sample(info)})
    shard = str(tmp_path / "feat-000000.tar")
    with pytest.raises(ValueError, match=rf"^{shard}: sample 0002: {said} expected a whole number > 0$"):
        check_features(store, [1, 2], "val")  # up front: the JSON is read, not the arrays
    with pytest.raises(ValueError, match=rf"{shard}: sample 0002: {said}"):
        store.get(2)
    assert store.get(1).width == 40 and _store(tmp_path / "w", {"0005": _sample({"width": 40.0})}).get(5).width == 40


@pytest.mark.parametrize("raw, said", [(b"[1, 2]", "is a JSON list, expected an object"),
                                       (b'"text"', "is a JSON str, expected an object"),
                                       (b"null", "is a JSON NoneType, expected an object"),
                                       (b"{cut", "is not valid JSON")])
def test_a_key_json_that_is_not_an_object_is_one_line_naming_shard_and_key(tmp_path, raw, said):
    store = _store(tmp_path, {"0007": _sample(raw_json=raw)})
    for call in (lambda: store.get(7), lambda: check_features(store, [7], "train")):
        with pytest.raises(ValueError, match=rf"^{tmp_path / 'feat-000000.tar'}: sample 0007: its json member {said}"):
            call()


def test_a_sample_is_checked_once_then_served_from_the_cache(tmp_path, monkeypatch):
    store = _store(tmp_path, {"0001": _sample()})
    reads = []
    original = store._checked_regions
    monkeypatch.setattr(store, "_checked_regions", lambda key: reads.append(key) or original(key))
    assert store.get(1) is store.get("0001") and reads == ["0001"]


def _plan(tmp_path, batch, micro, world):
    opts = TaskOptions(data=tmp_path, features=tmp_path, out=tmp_path, batch_size=batch, micro_batch_size=micro,
                       epochs=1.0)
    return make_plan(opts, 40, world)


def test_a_batch_smaller_than_one_micro_batch_per_process_is_refused(tmp_path):
    plan = partial(_plan, tmp_path)
    with pytest.raises(ValueError, match=r"^--batch-size 4 is smaller than --micro-batch-size 8 x 1 process\(es\) = 8 "
                                         "items a step: give a --batch-size of at least 8 or a smaller"):
        plan(4, 8, 1)
    with pytest.raises(ValueError, match="--batch-size 4 is smaller than --micro-batch-size 2 x 4 process"):
        plan(4, 2, 4)
    with pytest.raises(ValueError, match=r"^--batch-size 1 does not divide among 2 processes: give a multiple of 2 "
                                         r"\(2\), or a --micro-batch-size$"):
        plan(1, None, 2)
    assert (plan(8, 8, 1).batch, plan(8, 4, 1).accumulation, plan(8, None, 2).micro) == (8, 2, 4)
    assert (plan(24, 4, 3).micro, plan(24, 4, 3).accumulation, plan(24, 4, 3).batch) == (4, 2, 24)


def test_a_batch_that_micro_batches_and_processes_cannot_make_exactly_is_refused(tmp_path):
    """It was a warning, and each step trained on another number of items (10 asked, 8 taken)."""
    plan = partial(_plan, tmp_path)
    with pytest.raises(ValueError, match=r"^--batch-size 10 is not a multiple of --micro-batch-size 4 x 1 "
                                         r"process\(es\) = 4: give --batch-size 8 or 12, or a --micro-batch-size "
                                         "that divides it$"):
        plan(10, 4, 1)
    with pytest.raises(ValueError, match=r"^--batch-size 12 is not a multiple of --micro-batch-size 4 x 2 .* 8 or 16"):
        plan(12, 4, 2)
    with pytest.raises(ValueError, match=r"^--batch-size 10 does not divide among 4 processes: give a multiple of 4 "
                                         r"\(8 or 12\)"):
        plan(10, None, 4)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    return {"root": root, "data": make_vqa(root), "vocab": write_vocab(root),
            "ckpt": tiny_checkpoint(root / "ckpt")}


def test_eval_refuses_a_micro_batch_larger_than_the_batch_before_fine_tuning(vqa, tmp_path, capsys):
    status = run_cli("vqa", vqa, tmp_path / "out", "--checkpoint", str(vqa["ckpt"]), "--train-steps", "2",
                     "--batch-size", "4", "--micro-batch-size", "8")
    err = capsys.readouterr().err
    assert status == 1 and "--batch-size 4 is smaller than --micro-batch-size 8" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_eval_of_nan_features_is_one_line_not_an_accuracy(vqa, tmp_path, capsys):
    import io
    import shutil
    import tarfile

    root = tmp_path / "copy"
    shutil.copytree(vqa["root"] / "features", root / "features")
    shard = sorted((root / "features").glob("*.tar"))[-1]  # the val images are the last ones written
    with tarfile.open(shard) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    name = sorted(n for n in members if n.endswith(".features.npy"))[-1]
    features = np.load(io.BytesIO(members[name]))
    features[0, 0] = np.nan
    members[name] = npy(features)
    with tarfile.open(shard, "w") as archive:
        for member, payload in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    status = run_cli("vqa", {**vqa, "root": root}, tmp_path / "out", "--checkpoint", str(vqa["ckpt"]),
                     "--split", "val")
    err = capsys.readouterr().err
    key = name.split(".")[0]
    assert status == 1 and f"{shard}: sample {key}: 1 of its {features.size} feature values are NaN" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_cut_npy_header_is_one_line_naming_the_member_before_any_work(tmp_path):
    cut = _sample()
    cut["features.npy"] = cut["features.npy"][:30]  # inside the header's dict literal (tokenize.TokenError)
    store = _store(tmp_path, {"0001": _sample(), "0002": cut})
    with pytest.raises(ValueError, match=r"feat-000000.tar: member 0002.features.npy has no readable .npy header"):
        check_features(store, [1, 2], "val")
