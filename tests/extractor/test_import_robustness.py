"""vilbert-import on damaged and hostile sources: every bad record is logged with its reason while the
others are imported, a pickle that would run code is refused before it runs, and re-running the
same command resumes without duplicates."""
from __future__ import annotations

import json
import pickle
import sys

import click
import numpy as np
import pytest

from extractor.import_cli import main

from import_helpers import (
    BUTD_FIELDS,
    RunsCode,
    b64,
    butd_row,
    make_images,
    npz_info,
    read_shards,
    vilbert_item,
    write_butd_tsv,
    write_lmdb,
    write_npz,
    write_tsv,
)


def run(src, out, *extra):
    return main([str(src), str(out), "--quiet", *extra])


def errors(out) -> list[dict]:
    path = out / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_corrupt_records_are_logged_and_the_others_kept(tmp_path):
    images = make_images(9, dim=8, numeric_ids=True, min_boxes=4, max_boxes=4)
    rows = [butd_row(i) for i in images[:8]]
    rows[1]["features"] = "!!" + rows[1]["features"][2:]  # not base64
    rows[2]["num_boxes"] = 5  # the arrays hold 4 boxes
    nan = images[3]["features"].copy()
    nan[0, 0] = np.nan
    rows[3]["features"] = b64(nan)
    rows[4]["image_w"], rows[4]["image_h"] = rows[4]["image_h"], rows[4]["image_w"]  # swapped
    rows[4]["boxes"] = b64(np.array([[0, 0, 630, 10]] * 4, np.float32))
    rows[5]["image_id"] = rows[0]["image_id"]  # the same image twice
    path = write_tsv(tmp_path / "feats.tsv", rows, BUTD_FIELDS)
    cut = write_tsv(tmp_path / "last.tsv", [butd_row(images[8])], BUTD_FIELDS).read_bytes()[:-60]
    with open(path, "ab") as handle:  # a last line cut by a kill
        handle.write(cut)
    summary = run(path, tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (3, 6)
    assert sorted(read_shards(tmp_path / "out")) == sorted(images[i]["image_id"] for i in (0, 6, 7))
    logged = {e["path"].rsplit(":", 1)[1]: e for e in errors(tmp_path / "out")}
    assert sorted(logged) == ["2", "3", "4", "5", "6", "9"]  # line numbers (the cut line is the 9th)
    assert "not valid base64" in logged["2"]["reason"]
    assert "do not make shape (5, 4)" in logged["3"]["reason"] and "num_boxes" in logged["3"]["reason"]
    assert logged["4"]["reason"] == "NaN or infinite features"
    assert "lies outside the" in logged["5"]["reason"] and "swapped" in logged["5"]["reason"]
    assert logged["6"]["reason"].startswith("duplicate image id") and logged["6"]["key"] == images[0]["image_id"]
    assert "base64" in logged["9"]["reason"] or "cut" in logged["9"]["reason"]
    again = run(path, tmp_path / "out")  # resumed: nothing redone, nothing logged twice
    assert (again["done"], again["failed"], again["skipped"]) == (0, 0, 9)
    assert len(errors(tmp_path / "out")) == 6


def test_resume_imports_only_what_is_new_or_lost(tmp_path):
    images = make_images(7, dim=8, numeric_ids=True)
    path = write_butd_tsv(tmp_path / "feats.tsv", images[:3])
    assert run(path, tmp_path / "out", "--shard-size", "2")["done"] == 3
    write_butd_tsv(path, images[3:], mode="a")  # generate_tsv.py appends to its file
    second = run(path, tmp_path / "out", "--shard-size", "2")
    assert (second["done"], second["skipped"]) == (4, 3)
    samples = read_shards(tmp_path / "out")  # asserts that no member is there twice
    assert sorted(samples) == sorted(i["image_id"] for i in images)
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == 7 and len(sizes) == 4
    lost = tmp_path / "out" / "shard-000003.tar"  # a shard lost: its samples come back
    assert sizes[lost.name] == 2
    lost.unlink()
    assert len(read_shards(tmp_path / "out")) == 5
    third = run(path, tmp_path / "out", "--shard-size", "2")
    assert (third["done"], third["skipped"]) == (2, 5)
    assert sorted(read_shards(tmp_path / "out")) == sorted(samples)
    with pytest.raises(click.ClickException, match="different feature recipe"):
        other = write_butd_tsv(tmp_path / "other.tsv", images[:1])
        run(other, tmp_path / "out")  # another source into the same OUT: refused, not mixed


def test_a_hostile_pickle_is_refused_before_it_runs_and_nothing_else_is_lost(tmp_path):
    images = make_images(3, dim=8)
    marker = tmp_path / "pwned"
    evil = vilbert_item(images[1])
    evil["features"] = RunsCode(f"touch {marker}")
    values = {images[0]["image_id"]: pickle.dumps(vilbert_item(images[0])),
              images[1]["image_id"]: pickle.dumps(evil),
              images[2]["image_id"]: pickle.dumps(vilbert_item(images[2]))}
    write_lmdb(tmp_path / "coco.lmdb", values)
    summary = run(tmp_path / "coco.lmdb", tmp_path / "out")
    assert not marker.exists()
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert sorted(read_shards(tmp_path / "out")) == sorted([images[0]["image_id"], images[2]["image_id"]])
    [logged] = errors(tmp_path / "out")
    assert logged["key"] == images[1]["image_id"] and logged["path"].endswith(f"coco.lmdb:{images[1]['image_id']}")
    assert "refusing to unpickle global" in logged["reason"] and "system" in logged["reason"]


def test_npz_info_that_names_code_is_not_run_and_the_features_are_kept(tmp_path):
    images = make_images(3, dim=8)
    marker = tmp_path / "pwned"
    folder = tmp_path / "features"
    folder.mkdir()
    for image in images:
        info = {**npz_info(image, "caffe"), "hook": RunsCode(f"touch {marker}")}
        np.savez_compressed(folder / image["image_id"], x=image["features"], bbox=image["boxes"],
                            num_bbox=image["num_boxes"], image_h=image["height"], image_w=image["width"], info=info)
    summary = run(folder, tmp_path / "out")
    assert not marker.exists()
    assert (summary["done"], summary["cls_prob"]) == (3, "missing")
    assert list(summary["notes"].values()) == [3] and "info not read" in next(iter(summary["notes"]))
    for image in images:
        np.testing.assert_array_equal(read_shards(tmp_path / "out")[image["image_id"]]["boxes.npy"], image["boxes"])


def test_npz_ids_outside_the_1600_classes_name_the_old_convention(tmp_path):
    images = make_images(2, dim=8)
    images[1]["objects_id"] = images[1]["objects_id"].copy()
    images[1]["objects_id"][0] = 1600  # background counted as class 0: the last class becomes 1600
    write_npz(tmp_path / "features", images)
    assert run(tmp_path / "features", tmp_path / "out")["failed"] == 1
    assert "objects_id 1600 is outside 0..1599" in errors(tmp_path / "out")[0]["reason"]
    assert "before 2020-09-19" in errors(tmp_path / "out")[0]["reason"]


def test_missing_optional_packages_are_one_line_errors(tmp_path, monkeypatch):
    write_lmdb(tmp_path / "coco.lmdb", {"1": pickle.dumps(vilbert_item(make_images(1, dim=8)[0]))})
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(click.ClickException, match=r"needs the lmdb package: pip install lmdb"):
        run(tmp_path / "coco.lmdb", tmp_path / "out", "--format", "vilbert-lmdb")
    write_npz(tmp_path / "npz", make_images(1, dim=8))  # formats that need neither still run
    assert run(tmp_path / "npz", tmp_path / "out2")["done"] == 1


def test_sources_refused_whole_leave_out_as_it_was(tmp_path):
    import h5py

    write_lmdb(tmp_path / "td.lmdb", {"00000000": b"\x93\x01", "__keys__": pickle.dumps([b"00000000"])})
    with pytest.raises(click.ClickException, match="tensorpack LMDBSerializer file"):
        run(tmp_path / "td.lmdb", tmp_path / "out")
    with h5py.File(tmp_path / "flat.h5", "w") as handle:  # bottom-up-attention-vqa's one array for all images
        handle["features"] = np.zeros((2, 36, 8), np.float32)
        handle["image_id"] = np.arange(2)
    with pytest.raises(click.ClickException, match="not volta's group per image"):
        run(tmp_path / "flat.h5", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no lock, no recipe.json, no folder


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_lmdb_pickles_of_every_protocol_read(tmp_path, protocol):
    images = make_images(2, dim=8)
    write_lmdb(tmp_path / "coco.lmdb", {i["image_id"]: pickle.dumps(vilbert_item(i, "volta"), protocol=protocol)
                                        for i in images})  # numpy arrays and numpy integer scalars
    summary = run(tmp_path / "coco.lmdb", tmp_path / "out")
    assert (summary["done"], summary["cls_prob"]) == (2, "one-hot")
    for image in images:
        np.testing.assert_array_equal(read_shards(tmp_path / "out")[image["image_id"]]["boxes.npy"], image["boxes"])
