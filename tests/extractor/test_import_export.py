"""vilbert-export writes volta's HDF5 and BUTD's TSV as their producers do, and what it writes imports
back to the same shards (features, boxes and distributions bit for bit)."""
from __future__ import annotations

import csv

import click
import numpy as np
import pytest

from extractor.import_cli import export_main, main

from import_helpers import BUTD_FIELDS, make_images, read_shards, write_butd_tsv, write_npz
from shards import write_shards


def imported(tmp_path, images, name="first"):
    write_npz(tmp_path / "npz", images, "d2")  # full class distributions (no attributes)
    main([str(tmp_path / "npz"), str(tmp_path / name), "--quiet"])
    return read_shards(tmp_path / name)


def assert_same(first: dict, second: dict, members=("features.npy", "boxes.npy", "cls_prob.npy")):
    assert sorted(first) == sorted(second)
    for key in first:
        for member in members:
            assert second[key][member].dtype == first[key][member].dtype
            np.testing.assert_array_equal(second[key][member], first[key][member])
        for field in ("width", "height", "num_boxes", "image_id"):
            assert second[key]["json"][field] == first[key]["json"][field]


def test_h5_round_trip_keeps_every_value(tmp_path):
    first = imported(tmp_path, make_images(4, dim=16, seed=5))
    summary = export_main([str(tmp_path / "first"), str(tmp_path / "feats.h5"), "--format", "h5",
                           "--distributions", "--quiet"])
    assert (summary["exported"], summary["skipped"]) == (4, 0)
    assert main([str(tmp_path / "feats.h5"), str(tmp_path / "second"), "--quiet"])["cls_prob"] == "source"
    assert_same(first, read_shards(tmp_path / "second"))


def test_h5_export_is_volta_layout_and_its_hard_labels_import_as_one_hot(tmp_path):
    import h5py

    first = imported(tmp_path, make_images(3, dim=16, seed=6))
    export_main([str(tmp_path / "first"), str(tmp_path / "feats.h5"), "--format", "h5", "--quiet"])
    with h5py.File(tmp_path / "feats.h5") as handle:
        assert sorted(handle) == sorted(first)
        for key, sample in first.items():
            group = handle[key]
            assert sorted(group) == ["boxes", "features", "img_h", "img_w", "obj_conf", "obj_id"]
            assert group["features"].dtype == np.float32 and group["obj_id"].dtype == np.int64
            np.testing.assert_array_equal(group["features"][()], sample["features.npy"].astype(np.float32))
            np.testing.assert_array_equal(group["boxes"][()], sample["boxes.npy"])
            cls = sample["cls_prob.npy"].astype(np.float32)
            np.testing.assert_array_equal(group["obj_id"][()], cls[:, 1:].argmax(1))  # 0-based, as LXMERT's
            np.testing.assert_array_equal(group["obj_conf"][()], cls[:, 1:].max(1))
            assert (group["img_w"][()], group["img_h"][()]) == (sample["json"]["width"], sample["json"]["height"])
    main([str(tmp_path / "feats.h5"), str(tmp_path / "second"), "--quiet"])
    for key, sample in read_shards(tmp_path / "second").items():
        hard = sample["cls_prob.npy"]
        assert (hard.sum(1) == 1).all()
        np.testing.assert_array_equal(hard.argmax(1), first[key]["cls_prob.npy"][:, 1:].argmax(1) + 1)


def test_butd_tsv_round_trip_and_extracted_shards_export(tmp_path):
    images = make_images(4, dim=16, seed=7, numeric_ids=True)
    write_butd_tsv(tmp_path / "feats.tsv", images)
    main([str(tmp_path / "feats.tsv"), str(tmp_path / "first"), "--quiet"])
    export_main([str(tmp_path / "first"), str(tmp_path / "again.tsv"), "--format", "butd-tsv", "--quiet"])
    with open(tmp_path / "again.tsv", newline="") as handle:  # generate_tsv.py's lines: no header
        rows = list(csv.DictReader(handle, delimiter="\t", fieldnames=BUTD_FIELDS))
    assert [r["image_id"] for r in rows] == [i["image_id"] for i in images]
    assert [int(r["image_w"]) for r in rows] == [i["width"] for i in images]
    main([str(tmp_path / "again.tsv"), str(tmp_path / "second"), "--quiet"])
    assert_same(read_shards(tmp_path / "first"), read_shards(tmp_path / "second"), ("features.npy", "boxes.npy"))

    write_shards(tmp_path / "extracted", num_shards=2, per_shard=3, num_boxes=5, feature_dim=16)  # vilbert-extract's
    summary = export_main([str(tmp_path / "extracted"), str(tmp_path / "extracted.h5"), "--format", "h5", "--quiet"])
    assert summary["exported"] == 6
    with pytest.raises(click.ClickException, match="exists; remove it"):
        export_main([str(tmp_path / "extracted"), str(tmp_path / "extracted.h5"), "--format", "h5", "--quiet"])
