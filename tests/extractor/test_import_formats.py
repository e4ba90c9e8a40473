"""vilbert-import on a small source of each format, written as its producer writes it: every value
comes back in the shards (features within float16's precision, boxes exactly, hard labels as
one-hot distributions at column id + 1), in vilbert-extract's layout, and the format is detected."""
from __future__ import annotations

import base64
import json
import pickle

import numpy as np
import pytest

from common.names import safe_name
from extractor.import_cli import main

from import_helpers import (
    BUTD_FIELDS,
    butd_row,
    make_images,
    read_shards,
    vilbert_item,
    write_butd_tsv,
    write_lmdb,
    write_lxmert_tsv,
    write_npz,
    write_tsv,
    write_vilbert_lmdb,
    write_volta_h5,
)

# name: (writer, format, numeric ids, what cls_prob / attr_prob hold)
SOURCES = {
    "butd": (lambda p, i: write_butd_tsv(p / "trainval_36.tsv", i), "butd-tsv", True, "missing", "missing"),
    "lxmert": (lambda p, i: write_lxmert_tsv(p / "val2014_obj36.tsv", i), "lxmert-tsv", False, "one-hot", "one-hot"),
    "vilbert-lmdb": (lambda p, i: write_vilbert_lmdb(p / "coco.lmdb", i), "vilbert-lmdb", False, "missing", "missing"),
    "vilbert-lmdb-base64": (lambda p, i: write_vilbert_lmdb(p / "coco.lmdb", i, "base64"), "vilbert-lmdb", False,
                            "missing", "missing"),
    "volta-lmdb": (lambda p, i: write_vilbert_lmdb(p / "coco.lmdb", i, "volta"), "vilbert-lmdb", False,
                   "one-hot", "one-hot"),
    "npz-caffe": (lambda p, i: write_npz(p / "features", i, "caffe"), "npz", False, "one-hot", "one-hot"),
    "npz-d2": (lambda p, i: write_npz(p / "features", i, "d2"), "npz", False, "source", "missing"),
    "h5": (lambda p, i: write_volta_h5(p / "val2014_boxes36.h5", i), "h5", False, "one-hot", "one-hot"),
}


def run(src, out, *extra):
    return main([str(src), str(out), "--quiet", *extra])


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_value_round_trips(tmp_path, name):
    write, fmt, numeric, cls_mode, attr_mode = SOURCES[name]
    images = make_images(5, dim=24, seed=3, numeric_ids=numeric)
    src = write(tmp_path, images)
    summary = run(src, tmp_path / "out")  # the format is detected
    assert (summary["format"], summary["done"], summary["failed"]) == (fmt, 5, 0)
    assert (summary["cls_prob"], summary["attr_prob"], summary["feature_dim"]) == (cls_mode, attr_mode, 24)

    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == sorted(safe_name(i["image_id"]) for i in images)
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"shard-000000.tar": 5}
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe == {"detector": f"imported-{fmt}", "weights_hash": "unknown", "mode": "imported",
                      "source_format": fmt, "source_path": str(src.resolve()), "feature_dim": 24,
                      "cls_prob": cls_mode, "attr_prob": attr_mode}
    for image in images:
        sample = samples[safe_name(image["image_id"])]
        n = image["num_boxes"]
        meta = sample["json"]
        assert {k: meta[k] for k in ("image_id", "width", "height", "num_boxes")} == \
            {"image_id": image["image_id"], "width": image["width"], "height": image["height"], "num_boxes": n}
        assert meta["source"].startswith(str(src)) and meta["detector"] == f"imported-{fmt}"
        assert meta["mode"] == "imported" and meta["cls_prob"] == cls_mode
        assert sample["features.npy"].dtype == np.float16 and sample["features.npy"].shape == (n, 24)
        np.testing.assert_allclose(sample["features.npy"].astype(np.float32), image["features"], rtol=1e-3, atol=1e-4)
        assert sample["boxes.npy"].dtype == np.float32
        np.testing.assert_array_equal(sample["boxes.npy"], image["boxes"])  # exact: float32 kept
        if cls_mode == "missing":
            assert "cls_prob.npy" not in sample
        else:
            cls = sample["cls_prob.npy"]
            assert cls.dtype == np.float16 and cls.shape == (n, 1601)
            if cls_mode == "one-hot":  # objects_id indexes the 1600 classes 0-based: column id + 1
                expected = np.zeros((n, 1601), np.float16)
                expected[np.arange(n), image["objects_id"] + 1] = 1
                np.testing.assert_array_equal(cls, expected)
                assert (cls.argmax(1) - 1 == image["objects_id"]).all()
            else:  # d2's softmax without its background column: background is what the rest leaves
                np.testing.assert_allclose(cls.astype(np.float32), image["cls_prob"], atol=2e-3)
        if attr_mode == "missing":
            assert "attr_prob.npy" not in sample
        else:
            attr = sample["attr_prob.npy"]
            assert attr.dtype == np.float16 and attr.shape == (n, 401)
            np.testing.assert_array_equal(attr.argmax(1) - 1, image["attrs_id"])
            assert (attr.sum(1) == 1).all()


def test_a_folder_of_tsvs_is_one_source_and_formats_are_told_apart(tmp_path):
    images = make_images(6, dim=8, numeric_ids=True)
    folder = tmp_path / "tsv"
    folder.mkdir()
    write_butd_tsv(folder / "feats.tsv.0", images[:3])  # generate_tsv.py's file per GPU
    write_butd_tsv(folder / "feats.tsv.1", images[3:])
    assert run(folder, tmp_path / "out")["done"] == 6
    mixed = tmp_path / "mixed"
    write_npz(mixed, images[:1])
    write_butd_tsv(mixed / "more.tsv", images[1:2])
    with pytest.raises(Exception, match=r"several formats \(butd-tsv, npz\); pass --format"):
        run(mixed, tmp_path / "out2")
    assert run(mixed, tmp_path / "out2", "--format", "npz")["done"] == 1
    with pytest.raises(Exception, match="not in the lxmert-tsv format"):
        run(folder, tmp_path / "out3", "--format", "lxmert-tsv")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(Exception, match="not a format vilbert-import recognises"):
        run(tmp_path / "notes.txt", tmp_path / "out4")
    assert not (tmp_path / "out4").exists()  # a refused run leaves nothing behind


def test_a_tsv_written_by_python3_through_str_of_bytes_reads_the_same(tmp_path):
    images = make_images(2, dim=8, numeric_ids=True)
    rows = [butd_row(i) for i in images]
    for row, image in zip(rows, images):  # csv.DictWriter given base64.b64encode(...) bytes under Python 3
        row["boxes"], row["features"] = (str(base64.b64encode(image[k].tobytes())) for k in ("boxes", "features"))
    assert rows[0]["boxes"].startswith("b'")
    write_tsv(tmp_path / "py3.tsv", rows, BUTD_FIELDS)
    assert run(tmp_path / "py3.tsv", tmp_path / "out")["done"] == 2
    for image in images:
        np.testing.assert_array_equal(read_shards(tmp_path / "out")[image["image_id"]]["boxes.npy"], image["boxes"])


def test_vilbert_lmdb_rows_count_as_its_reader_counts_them(tmp_path):
    images = make_images(2, dim=8, min_boxes=6, max_boxes=6)
    fewer = vilbert_item(images[0])
    fewer["num_boxes"] = 4  # extract_features.py: boxes of nonzero confidence; reshape(-1, 2048) keeps all rows
    more = vilbert_item(images[1])
    more["num_boxes"] = 9
    write_lmdb(tmp_path / "coco.lmdb", {images[0]["image_id"]: pickle.dumps(fewer),
                                        images[1]["image_id"]: pickle.dumps(more)})
    summary = run(tmp_path / "coco.lmdb", tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (1, 1)
    assert read_shards(tmp_path / "out")[images[0]["image_id"]]["features.npy"].shape == (6, 8)
    assert "num_boxes 9 but only 6 feature rows" in (tmp_path / "out" / "errors.jsonl").read_text()
