"""vilbert-import / vilbert-export on broken files among good ones: each bad file or record is one line
naming it and the reason, nothing else is lost, a re-run logs nothing twice, and a run that read
nothing fails leaving OUT as it was."""
from __future__ import annotations

import io
import json

import click
import numpy as np
import pytest

from extractor.import_cli import export_main, main
from extractor.importers import h5 as h5_reader
from extractor.importers import tsv as tsv_reader

from import_helpers import (
    BUTD_FIELDS,
    RunsCode,
    b64,
    butd_row,
    deny_reading,
    make_images,
    read_shards,
    rewrite_sample,
    write_butd_tsv,
    write_lxmert_tsv,
    write_npz,
    write_tsv,
    write_vilbert_lmdb,
    write_volta_h5,
)


def run(src, out, *extra):
    return main([str(src), str(out), "--quiet", *extra])


def errors(out) -> list[dict]:
    path = out / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def ids(images) -> list[str]:
    return sorted(i["image_id"] for i in images)


# ----- vilbert-import: files that do not read ------------------------------------------------------
def test_a_truncated_h5_is_one_line_and_the_good_h5_beside_it_is_imported(tmp_path):
    images = make_images(4, dim=8)
    src = tmp_path / "h5"
    src.mkdir()
    write_volta_h5(src / "good.h5", images[:2])
    whole = write_volta_h5(tmp_path / "whole.h5", images[2:]).read_bytes()
    (src / "cut.h5").write_bytes(whole[: len(whole) // 2])  # a download cut short
    summary = run(src, tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (2, 0)
    assert sorted(read_shards(tmp_path / "out")) == ids(images[:2])
    [line] = summary["unreadable_files"]
    assert line.startswith(str(src / "cut.h5")) and "not a readable HDF5 file" in line and "\n" not in line
    [logged] = errors(tmp_path / "out")
    assert logged["path"] == str(src / "cut.h5") and "truncated" in logged["reason"]
    again = run(src, tmp_path / "out")  # tried again (it may have been mended), logged once
    assert (again["done"], again["skipped"], len(again["unreadable_files"])) == (0, 2, 1)
    assert len(errors(tmp_path / "out")) == 1


def test_an_empty_short_or_unreadable_h5_is_one_line_each(tmp_path, monkeypatch):
    images = make_images(2, dim=8)
    src = tmp_path / "h5"
    src.mkdir()
    write_volta_h5(src / "good.h5", images[:1])
    (src / "empty.h5").write_bytes(b"")
    (src / "short.h5").write_bytes((src / "good.h5").read_bytes()[:4])
    write_volta_h5(src / "locked.h5", images[1:])
    deny_reading(monkeypatch, h5_reader, src / "locked.h5")
    summary = run(src, tmp_path / "out")
    assert (summary["done"], len(summary["unreadable_files"])) == (1, 3)
    reasons = {e["path"].rsplit("/", 1)[1]: e["reason"] for e in errors(tmp_path / "out")}
    assert reasons == {"empty.h5": "empty (0 bytes)", "short.h5": "not an HDF5 file (no HDF5 "
                       "signature at its start nor after a user block)",
                       "locked.h5": "cannot be read (Permission denied)"}


@pytest.mark.parametrize("userblock", [512, 2048])
def test_an_h5_with_a_user_block_imports_as_without_one(tmp_path, userblock):
    images = make_images(3, dim=8)
    write_volta_h5(tmp_path / "plain.h5", images)
    write_volta_h5(tmp_path / "blocked.h5", images, userblock=userblock)
    assert (tmp_path / "blocked.h5").read_bytes()[:4] == b"made"  # the signature is not at byte 0
    plain, blocked = run(tmp_path / "plain.h5", tmp_path / "a"), run(tmp_path / "blocked.h5", tmp_path / "b")
    assert plain["done"] == blocked["done"] == 3 and blocked["failed"] == 0
    a, b = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k]["features.npy"], b[k]["features.npy"]) for k in a)


def test_an_h5_that_nests_its_image_groups_says_so(tmp_path):
    import h5py

    images = make_images(2, dim=8)
    write_volta_h5(tmp_path / "flat.h5", images)
    with h5py.File(tmp_path / "flat.h5", "r") as flat, h5py.File(tmp_path / "nested.h5", "w") as nested:
        for image in images:  # /train/ID/... instead of /ID/...
            flat.copy(image["image_id"], nested.require_group("train"), name=image["image_id"])
    with pytest.raises(click.ClickException, match="no record was imported: all 1 records"):
        run(tmp_path / "nested.h5", tmp_path / "out")
    [logged] = errors(tmp_path / "out")
    assert logged["key"] == "train" and "a group of 2 groups, not an image's datasets" in logged["reason"]


def test_float64_features_in_a_butd_tsv_are_said_to_be_float64(tmp_path):
    images = make_images(2, dim=8, numeric_ids=True)
    rows = [dict(butd_row(image), features=b64(image["features"].astype(np.float64) * 3.7)) for image in images]
    write_tsv(tmp_path / "f64.tsv", rows, BUTD_FIELDS)
    with pytest.raises(click.ClickException, match="no record was imported"):
        run(tmp_path / "f64.tsv", tmp_path / "out")
    reasons = {e["reason"] for e in errors(tmp_path / "out")}
    assert reasons and all("read as float64 its bytes are sound values: float64 data in a format of float32" in r
                           for r in reasons), reasons


def test_a_data_mdb_that_is_not_an_lmdb_is_one_line(tmp_path):
    whole = write_vilbert_lmdb(tmp_path / "whole.lmdb", make_images(30, dim=8)) / "data.mdb"
    for name, content in (("random", np.random.default_rng(0).bytes(5000)), ("empty", b""),
                          ("cut", whole.read_bytes()[: whole.stat().st_size * 3 // 4])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.mdb").write_bytes(content)
    with pytest.raises(click.ClickException, match=r"random/data.mdb: not a readable LMDB \(MDB_INVALID"):
        run(tmp_path / "random", tmp_path / "out")
    with pytest.raises(click.ClickException, match=r"empty/data.mdb: empty \(0 bytes\), not an LMDB"):
        run(tmp_path / "empty", tmp_path / "out", "--format", "vilbert-lmdb")
    with pytest.raises(click.ClickException, match=r"cut/data.mdb: cut short \(\d+ bytes of the \d+ its LMDB"):
        run(tmp_path / "cut", tmp_path / "out")  # read through its memory map, it killed the process (SIGBUS)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_tsv_does_not_stop_the_others(tmp_path, monkeypatch):
    images = make_images(4, dim=8, numeric_ids=True)
    src = tmp_path / "tsv"
    src.mkdir()
    write_butd_tsv(src / "a.tsv", images[:2])
    write_butd_tsv(src / "b.tsv", images[2:])
    deny_reading(monkeypatch, tsv_reader, src / "a.tsv")
    summary = run(src, tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (2, 0)
    assert sorted(read_shards(tmp_path / "out")) == ids(images[2:])
    assert summary["unreadable_files"] == [f"{src / 'a.tsv'}: cannot be read (Permission denied)"]


# ----- vilbert-import: TSV lines -------------------------------------------------------------------
def test_a_folder_mixing_lxmert_and_butd_tsvs_is_told_per_file(tmp_path):
    butd, lxmert = make_images(3, dim=8, numeric_ids=True), make_images(2, dim=8, seed=1)
    src = tmp_path / "tsv"
    src.mkdir()
    write_lxmert_tsv(src / "a.tsv", lxmert)  # first in order: it decided the format of the whole folder
    write_butd_tsv(src / "b.tsv", butd)
    with pytest.raises(click.ClickException, match=r"several formats \(butd-tsv, lxmert-tsv\); pass --format"):
        run(src, tmp_path / "out")
    summary = run(src, tmp_path / "out", "--format", "butd-tsv")
    assert (summary["done"], summary["failed"]) == (3, 0)  # no line of a.tsv logged as a bad record
    [logged] = errors(tmp_path / "out")
    assert logged["path"] == str(src / "a.tsv") and "--format lxmert-tsv" in logged["reason"]
    other = run(src, tmp_path / "other", "--format", "lxmert-tsv")
    assert (other["done"], other["failed"], other["cls_prob"]) == (2, 0, "one-hot")


def test_blank_and_comment_lines_before_the_first_record_are_passed_by(tmp_path):
    images = make_images(3, dim=8, numeric_ids=True)
    rows = write_butd_tsv(tmp_path / "rows.tsv", images).read_text()
    path = tmp_path / "feats.tsv"
    path.write_text("\n# trainval_36, made 2019\n" + rows)
    for extra in ((), ("--format", "butd-tsv")):
        summary = run(path, tmp_path / f"out{len(extra)}", *extra)
        assert (summary["format"], summary["done"], summary["failed"]) == ("butd-tsv", 3, 0)


def test_an_empty_tsv_id_is_a_bad_record(tmp_path):
    images = make_images(3, dim=8, numeric_ids=True)
    rows = [butd_row(i) for i in images]
    rows[1]["image_id"] = ""
    summary = run(write_tsv(tmp_path / "feats.tsv", rows, BUTD_FIELDS), tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert sorted(read_shards(tmp_path / "out")) == ids([images[0], images[2]])  # no "line-2"
    [logged] = errors(tmp_path / "out")
    assert logged["path"].endswith("feats.tsv:2") and logged["reason"].startswith("no image id")


def test_a_line_starting_with_a_quote_swallows_no_other_line(tmp_path):
    images = make_images(4, dim=8, numeric_ids=True)
    path = write_butd_tsv(tmp_path / "feats.tsv", images[:1])
    with open(path, "a") as handle:
        handle.write('"12\t640\t480\t36\n')  # an odd line: csv quoting read on to the next quote
    write_butd_tsv(path, images[1:], mode="a")
    summary = run(path, tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (4, 1)
    [logged] = errors(tmp_path / "out")
    assert logged["path"].endswith("feats.tsv:2") and "4 tab-separated fields" in logged["reason"]


# ----- vilbert-import: values ----------------------------------------------------------------------
def test_an_npz_member_of_pickled_objects_is_refused_saying_so(tmp_path):
    images = make_images(2, dim=8)
    write_npz(tmp_path / "npz", images[:1])
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "npz" / "evil.npz", x=np.array([RunsCode(f"touch {marker}")], dtype=object),
             bbox=images[1]["boxes"], image_h=48, image_w=64)
    summary = run(tmp_path / "npz", tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (1, 1) and not marker.exists()
    [logged] = errors(tmp_path / "out")
    assert logged["reason"].startswith("x holds pickled Python objects") and "refused" in logged["reason"]


def test_a_fractional_image_size_is_a_bad_record_not_truncated(tmp_path):
    import h5py

    images = make_images(3, dim=8)
    path = write_volta_h5(tmp_path / "feats.h5", images)
    with h5py.File(path, "a") as handle:
        del handle[images[1]["image_id"]]["img_w"]
        handle[images[1]["image_id"]]["img_w"] = images[1]["width"] + 0.7
        del handle[images[2]["image_id"]]["img_w"]
        handle[images[2]["image_id"]]["img_w"] = float(images[2]["width"])  # a whole number as a float: fine
    summary = run(path, tmp_path / "out")
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert errors(tmp_path / "out")[0]["reason"] == f"image width {images[1]['width'] + 0.7!r} is not an integer"
    assert read_shards(tmp_path / "out")[images[2]["image_id"]]["json"]["width"] == images[2]["width"]


def test_a_relative_and_an_absolute_src_share_one_error_log(tmp_path, monkeypatch):
    rows = [butd_row(i) for i in make_images(3, dim=8, numeric_ids=True)]
    rows[1]["num_boxes"] = 99
    write_tsv(tmp_path / "feats.tsv", rows, BUTD_FIELDS)
    monkeypatch.chdir(tmp_path)
    assert run("feats.tsv", "out")["failed"] == 1
    again = run(tmp_path / "feats.tsv", tmp_path / "out")
    assert (again["done"], again["failed"], again["skipped"]) == (0, 0, 3)
    assert len(errors(tmp_path / "out")) == 1


def test_a_run_that_imports_nothing_fails_and_an_empty_one_leaves_no_trace(tmp_path):
    import h5py

    h5py.File(tmp_path / "empty.h5", "w").close()
    with pytest.raises(click.ClickException, match="holds no records to import"):
        run(tmp_path / "empty.h5", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no lock, no sizes.json, no folder
    rows = [butd_row(make_images(1, dim=8, numeric_ids=True)[0])]
    rows[0]["num_boxes"] = 99
    write_tsv(tmp_path / "bad.tsv", rows, BUTD_FIELDS)
    for _ in range(2):  # and so does its re-run, whose one record failed before
        with pytest.raises(click.ClickException, match="no record was imported: all 1 records"):
            run(tmp_path / "bad.tsv", tmp_path / "out")
    assert len(errors(tmp_path / "out")) == 1


# ----- vilbert-export ------------------------------------------------------------------------------
def imported(tmp_path, count=3):
    images = make_images(count, dim=8, numeric_ids=True)
    run(write_butd_tsv(tmp_path / "feats.tsv", images), tmp_path / "shards")
    return images, tmp_path / "shards"


def export(shards, out, *extra):
    return export_main([str(shards), str(out), "--quiet", *extra])


@pytest.mark.parametrize("sizes", ['["x"]', '{"shard-000000.tar": null}', '{"shard-000000.tar": "5 samples"}'])
def test_export_passes_a_broken_sizes_json_with_one_line(tmp_path, sizes):
    images, shards = imported(tmp_path)
    (shards / "sizes.json").write_text(sizes)
    summary = export(shards, tmp_path / "feats.h5", "--format", "h5")
    assert summary["exported"] == len(images)
    [warning] = summary["warnings"]
    assert warning.startswith(str(shards / "sizes.json")) and "\n" not in warning


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["butd-tsv", "h5"])
def test_export_skips_a_bad_sample_naming_it_and_exports_the_rest(tmp_path, fmt):
    images, shards = imported(tmp_path, 4)
    shard = shards / "shard-000000.tar"
    meta = dict(read_shards(shards)[images[1]["image_id"]]["json"], width="64px")
    rewrite_sample(shard, images[1]["image_id"], {"json": json.dumps(meta).encode()})
    rows = images[2]["num_boxes"] + 1  # boxes that disagree with the feature rows
    rewrite_sample(shard, images[2]["image_id"], {"boxes.npy": _npy(np.zeros((rows, 4), np.float32))})
    summary = export(shards, tmp_path / f"out.{fmt}", "--format", fmt)
    assert (summary["exported"], summary["skipped"]) == (2, 2)
    width, boxes = summary["skipped_samples"]
    assert width == f"{shard}: {images[1]['image_id']}: width '64px' is not an integer"
    assert boxes.startswith(f"{shard}: {images[2]['image_id']}: boxes of shape ({rows}, 4), expected")
    run(tmp_path / f"out.{fmt}", tmp_path / "back", "--format", fmt)
    assert sorted(read_shards(tmp_path / "back")) == ids([images[0], images[3]])


@pytest.mark.parametrize("fmt", ["butd-tsv", "h5"])
def test_an_export_that_skips_every_sample_fails_and_writes_no_file(tmp_path, fmt):
    images, shards = imported(tmp_path, 2)
    shard = shards / "shard-000000.tar"
    for image in images:
        meta = dict(read_shards(shards)[image["image_id"]]["json"], width="64px")
        rewrite_sample(shard, image["image_id"], {"json": json.dumps(meta).encode()})
    with pytest.raises(click.ClickException, match=rf"^{shards}: no sample could be exported \(all 2 skipped, the "
                                                   rf"first as {shard}: {images[0]['image_id']}: width '64px'") as e:
        export(shards, tmp_path / f"out.{fmt}", "--format", fmt)
    assert "\n" not in e.value.message and f"out.{fmt} was not written" in e.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.tsv", "shards"]  # no file, no .partial
