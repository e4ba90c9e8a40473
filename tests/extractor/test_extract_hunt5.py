"""`vilbert-extract`, `vilbert-import` and `vilbert-export` on the inputs of the fifth hunt: FIFOs given
as input files, an img2dataset tar with a key twice or with dots in its names, COCO ids given twice or
of another type, malformed `--gt-boxes`, links to folders and to nothing, an export into a missing
folder, the count of images that failed before, a byte-order mark and captions that match nothing."""
from __future__ import annotations

import io
import json
import os
import tarfile

import click
import pytest
from fifo_watch import returns_without_blocking

from extractor.cli import main
from extractor.gt_boxes import GroundTruthBoxes
from extractor.import_cli import export_main
from extractor.import_cli import main as import_main
from extractor.sources import read_caption_tsv

from extract_helpers import make_image, read_shards, write_images
from import_helpers import make_images, write_butd_tsv

TINY = ["--config", "tiny", "--workers", "0", "--quiet", "--device", "cpu"]


def _fifo(path):
    os.mkfifo(path)
    return path


def _errors(out) -> list[dict]:
    path = out / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _jpeg(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    make_image(width, height, seed=seed).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


# ----- 1. FIFOs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, what", [("--captions", "a captions TSV"),
                                          ("--gt-boxes", "a ground-truth boxes JSON"),
                                          ("--class-names", "a text file of class names"),
                                          ("--weights", "detector weights (.pkl, .bin, .pth or .pt)")])
def test_a_fifo_given_as_an_input_file_is_one_line_never_a_hang(tmp_path, option, what):
    images = write_images(tmp_path / "images", 1)
    fifo = _fifo(tmp_path / ("input.pth" if option == "--weights" else "input"))
    out = tmp_path / "out"
    error = returns_without_blocking(lambda: main([str(images), str(out), *TINY, option, str(fifo)]), [fifo])
    assert isinstance(error, click.ClickException), error
    assert error.message == f"{fifo}: not a regular file (a FIFO): expected {what}"
    assert not out.exists()


def test_a_fifo_given_as_import_captions_is_one_line_never_a_hang(tmp_path):
    src = write_butd_tsv(tmp_path / "feats.tsv", make_images(2, dim=8, numeric_ids=True))
    fifo = _fifo(tmp_path / "captions.tsv")
    out = tmp_path / "out"
    error = returns_without_blocking(lambda: import_main([str(src), str(out), "--quiet", "--captions", str(fifo)]),
                                     [fifo])
    assert isinstance(error, click.ClickException), error
    assert error.message == f"{fifo}: not a regular file (a FIFO): expected a captions TSV"
    assert not out.exists()


# ----- 2, 5. img2dataset tars ----------------------------------------------------------------------
def test_a_tar_with_a_key_twice_keeps_each_caption_with_its_picture_and_logs_the_duplicate(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        _add(archive, "000000003.jpg", _jpeg(64, 48, seed=1))
        _add(archive, "000000003.txt", b"the first picture")
    with tarfile.open(shard, "a") as archive:  # as `tar -rf` appends
        _add(archive, "000000003.jpg", _jpeg(40, 30, seed=2))
        _add(archive, "000000003.txt", b"the second picture")
    out = tmp_path / "out"
    summary = main([str(shard), str(out), *TINY])
    assert (summary["done"], summary["failed"]) == (1, 1)
    sample = read_shards(out)["000000003"]
    assert sample["txt"] == "the first picture" and (sample["json"]["width"], sample["json"]["height"]) == (64, 48)
    [error] = _errors(out)
    assert error["reason"] == "duplicate image key '000000003'" and error["path"] == f"{shard}:000000003.jpg#2"
    again = main([str(shard), str(out), *TINY])  # the first is done, the duplicate is not logged twice
    assert (again["done"], again["skipped"], again["failed"]) == (0, 2, 0) and len(_errors(out)) == 1


def test_tar_members_with_dots_in_their_names_are_extracted_as_from_a_folder(tmp_path):
    names = ["IMG_2020.01.00", "IMG_2020.01.01"]
    shard = tmp_path / "only-dotted.tar"
    folder = tmp_path / "folder"
    folder.mkdir()
    with tarfile.open(shard, "w") as archive:
        for seed, name in enumerate(names):
            _add(archive, f"{name}.jpg", _jpeg(64, 48, seed))
            _add(archive, f"{name}.txt", f"caption of {name}".encode())
            (folder / f"{name}.jpg").write_bytes(_jpeg(64, 48, seed))
            (folder / f"{name}.txt").write_text(f"caption of {name}")
    from_tar = main([str(shard), str(tmp_path / "out-tar"), *TINY])
    from_folder = main([str(folder), str(tmp_path / "out-folder"), *TINY])
    assert from_tar["done"] == from_folder["done"] == 2 and from_tar["failed"] == 0
    tar_samples, folder_samples = read_shards(tmp_path / "out-tar"), read_shards(tmp_path / "out-folder")
    assert sorted(tar_samples) == sorted(folder_samples) == ["IMG_2020_01_00", "IMG_2020_01_01"]
    assert tar_samples["IMG_2020_01_01"]["txt"] == "caption of IMG_2020.01.01"


def test_a_tar_made_from_inside_its_folder_keeps_the_keys_of_its_names(tmp_path):
    shard = tmp_path / "dot.tar"  # tar cf dot.tar -C dir .  -> members './000000042.jpg', ...
    with tarfile.open(shard, "w") as archive:
        _add(archive, "./000000042.jpg", _jpeg(64, 48, 0))
        _add(archive, "./000000042.txt", b"a caption")
    assert main([str(shard), str(tmp_path / "out"), *TINY])["done"] == 1
    assert list(read_shards(tmp_path / "out")) == ["000000042"]  # not '__000000042': COCO id 42 still finds it


# ----- 3, 4. --gt-boxes ----------------------------------------------------------------------------
def test_a_coco_image_id_given_twice_is_refused_naming_both_records(tmp_path):
    images = write_images(tmp_path / "images", 2)
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": 0, "file_name": "img000.jpg"}, {"id": 0, "file_name": "img001.jpg"}],
        "annotations": [{"id": 1, "image_id": 0, "bbox": [1, 1, 10, 10]}]}))
    out = tmp_path / "out"
    with pytest.raises(click.ClickException) as refused:
        main([str(images), str(out), *TINY, "--gt-boxes", str(coco)])
    assert refused.value.message == f"{coco}: images[1]: duplicate id 0 (also images[0])"
    assert not out.exists()


def _gt_error(tmp_path, data) -> str:
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        GroundTruthBoxes.from_file(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message[len(f"{path}: "):]


@pytest.mark.parametrize("data, expected", [
    ({"images": [{"id": 0, "file_name": "x.jpg"}], "annotations": [{"id": 5, "image_id": "0", "bbox": [1, 1, 2, 2]}]},
     "annotations[0] (id 5): image_id '0' (a str; the images' ids are int)"),
    ({"images": [{"id": [1], "file_name": "x.jpg"}], "annotations": []},
     "images[0]: 'id' is [1] (a list), expected an int or a string"),
    ({"annotations": [{"id": 1, "image_id": 0, "bbox": [1, 1, 2, 2]}]},
     "has 'annotations' but no 'images': COCO annotations need both"),
    ({"images": {"id": 0}, "annotations": []}, "'images' is a dict, expected a list (COCO annotations)"),
    ({"img000.jpg": [[1, 2, {"a": 1}, 4]]},
     "boxes for 'img000.jpg': [0] is [1, 2, {'a': 1}, 4], expected [x1, y1, x2, y2] (4 numbers)"),
    ({"img000.jpg": [[1, 2, "a", 4]]},
     "boxes for 'img000.jpg': [0] is [1, 2, 'a', 4], expected [x1, y1, x2, y2] (4 numbers)"),
    ({"img000.jpg": [[1, 2, "3", 4]]},
     "boxes for 'img000.jpg': [0] is [1, 2, '3', 4], expected [x1, y1, x2, y2] (4 numbers)"),
    ({"img000.jpg": [[1, 2, 3, 4], [1, 2]]},
     "boxes for 'img000.jpg': [1] is [1, 2], expected [x1, y1, x2, y2] (4 numbers)"),
    ({"img000.jpg": "1 2 3 4"}, "boxes for 'img000.jpg' must be a list of [x1, y1, x2, y2], got a str"),
    ({"img000.jpg": [[1, 2, 10 ** 400, 4]]}, "boxes for 'img000.jpg': a coordinate is too large"),
], ids=["image-id-of-another-type", "unhashable-id", "coco-without-images", "images-not-a-list",
        "plain-dict-coordinate", "plain-letter", "plain-digit-string", "plain-ragged", "plain-string",
        "plain-huge-int"])
def test_malformed_gt_boxes_are_one_line_naming_the_file_the_entry_and_what_was_expected(tmp_path, data, expected):
    assert _gt_error(tmp_path, data) == expected


def test_an_image_named_images_in_the_plain_format_is_still_plain_boxes(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": [[1, 2, 10, 20]]}))
    assert GroundTruthBoxes.from_file(str(path)).boxes_by_name["images"].tolist() == [[1, 2, 10, 20]]


# ----- 6. links under IMAGES -----------------------------------------------------------------------
def test_a_linked_folder_is_followed_once_and_a_dangling_link_is_a_logged_failure(tmp_path):
    images = write_images(tmp_path / "images", 1)
    write_images(tmp_path / "data" / "coco", 2)
    (images / "coco").symlink_to(tmp_path / "data" / "coco", target_is_directory=True)
    (images / "coco-again").symlink_to(tmp_path / "data" / "coco", target_is_directory=True)  # the same folder
    (images / "loop").symlink_to(images, target_is_directory=True)  # a loop: never entered
    (images / "x.jpg").symlink_to(tmp_path / "nonexistent.jpg")
    (images / "self.jpg").symlink_to(images / "self.jpg")  # a link loop
    out = images / "features"  # OUT inside IMAGES: still never read
    args = [str(images), str(out), *TINY]
    summary = main(args)
    assert (summary["done"], summary["failed"]) == (3, 2)
    assert sorted(read_shards(out)) == ["coco_img000", "coco_img001", "img000"]
    reasons = {error["path"]: error["reason"] for error in _errors(out)}
    assert reasons == {
        str(images / "x.jpg"): f"a dangling symbolic link (to {tmp_path / 'nonexistent.jpg'}, which does not exist)",
        str(images / "self.jpg"): f"a symbolic link loop (to {images / 'self.jpg'})"}
    again = main(args)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 5, 0)


# ----- 7. vilbert-export ---------------------------------------------------------------------------
def test_an_export_into_a_missing_folder_or_as_a_tar_among_the_shards_is_one_line(tmp_path):
    shards = tmp_path / "shards"
    import_main([str(write_butd_tsv(tmp_path / "feats.tsv", make_images(2, dim=8, numeric_ids=True))),
                 str(shards), "--quiet"])
    before = sorted(p.name for p in shards.iterdir())
    for fmt, name in (("butd-tsv", "x.tsv"), ("h5", "x.h5")):
        missing = tmp_path / "nodir" / name
        with pytest.raises(click.ClickException) as refused:
            export_main([str(shards), str(missing), "--format", fmt, "--quiet"])
        assert refused.value.message == f"{missing}: OUT's folder {missing.parent} does not exist"
    with pytest.raises(click.ClickException, match=r"x\.tar: an export named \*\.tar inside SHARDS .* would be read"):
        export_main([str(shards), str(shards / "x.tar"), "--format", "butd-tsv", "--quiet"])
    assert sorted(p.name for p in shards.iterdir()) == before
    assert export_main([str(shards), str(shards / "x.tsv"), "--format", "butd-tsv", "--quiet"])["exported"] == 2


# ----- 8. re-runs ----------------------------------------------------------------------------------
def test_a_re_run_counts_the_images_that_failed_before_on_their_own(tmp_path, capsys):
    images = write_images(tmp_path / "images", 2)
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    first = main([str(images), str(out), *TINY])
    assert (first["done"], first["failed"], first["previously_failed"]) == (2, 1, 0)
    capsys.readouterr()
    again = main([str(images), str(out), *TINY])
    assert (again["done"], again["skipped"], again["failed"], again["previously_failed"]) == (0, 3, 0, 1)
    line = capsys.readouterr().out
    assert (f"skipped 3 (of which previously failed 1, not retried: see {out / 'errors.jsonl'}; "
            "delete their lines to retry)") in line


def test_a_re_run_with_other_ground_truth_boxes_is_refused_not_half_applied(tmp_path):
    images = write_images(tmp_path / "images", 2)
    first, second = tmp_path / "g1.json", tmp_path / "g2.json"
    first.write_text(json.dumps({"img000.jpg": [[1, 1, 10, 10]]}))
    second.write_text(json.dumps({"img000.jpg": [[5, 5, 30, 30], [0, 0, 60, 40]], "img001.jpg": [[1, 1, 10, 10]]}))
    out = tmp_path / "out"
    main([str(images), str(out), *TINY, "--gt-boxes", str(first)])
    with pytest.raises(click.ClickException, match=r"different feature recipe \(gt_boxes_sha256: '[0-9a-f]{64}' -> "):
        main([str(images), str(out), *TINY, "--gt-boxes", str(second)])  # img000 would keep its old box
    first.write_text(json.dumps({"img000.jpg": [[1.0, 1.0, 10.0, 10.0]]}, indent=2))  # the same boxes, rewritten
    assert main([str(images), str(out), *TINY, "--gt-boxes", str(first)])["skipped"] == 2
    recipe = json.loads((out / "recipe.json").read_text())
    del recipe["gt_boxes_sha256"]  # an OUT of an earlier version, which did not record the boxes
    (out / "recipe.json").write_text(json.dumps(recipe))
    assert main([str(images), str(out), *TINY, "--gt-boxes", str(second)])["skipped"] == 2  # as before: resumed


# ----- 9. captions ---------------------------------------------------------------------------------
def test_a_byte_order_mark_is_not_part_of_the_first_caption(tmp_path):
    tsv = tmp_path / "captions.tsv"
    tsv.write_bytes("a red square\timg000.jpg\na blue one\timg001.jpg\n".encode("utf-8-sig"))
    assert read_caption_tsv(str(tsv)) == {"img000.jpg": "a red square", "img001.jpg": "a blue one"}
    tsv.write_bytes("caption\turl\na red square\timg000.jpg\n".encode("utf-8-sig"))  # the header is still seen
    assert read_caption_tsv(str(tsv)) == {"img000.jpg": "a red square"}


def test_import_captions_that_match_no_record_are_a_warning(tmp_path, capsys):
    src = write_butd_tsv(tmp_path / "feats.tsv", make_images(2, dim=8, numeric_ids=True))
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("a cat\tsomething_else.jpg\n")
    summary = import_main([str(src), str(tmp_path / "out"), "--quiet", "--captions", str(tsv)])
    assert (summary["done"], summary["captioned"]) == (2, 0)
    err = capsys.readouterr().err
    assert f"warning: none of the 2 records imported matched a caption in {tsv}" in err


def test_a_captions_tsv_that_is_not_utf8_is_one_line_naming_the_line(tmp_path):
    images = write_images(tmp_path / "images", 1, captions=False)
    tsv = tmp_path / "captions.tsv"
    tsv.write_bytes("a caf\u00e9 au lait\timg000.jpg\n".encode("latin-1"))  # was 'caf\ufffd au lait'
    with pytest.raises(click.ClickException, match=r"captions.tsv: line 1 is not UTF-8 .*iconv -f latin1"):
        main([str(images), str(tmp_path / "out"), *TINY, "--captions", str(tsv)])
    assert not (tmp_path / "out").exists()


def test_repeated_and_absolute_caption_names_and_json_captions(tmp_path, capsys):
    images = write_images(tmp_path / "images", 3, captions=False)
    tsv = tmp_path / "captions.tsv"
    tsv.write_text(f"first\timg000.jpg\nsecond\timg000.jpg\nby its path\t{images / 'img001.jpg'}\n")
    main([str(images), str(tmp_path / "out"), *TINY, "--captions", str(tsv)])
    err = capsys.readouterr().err
    assert "captions.tsv: 1 image(s) are given more than one caption, e.g. 'img000.jpg' again at line 2" in err
    samples = read_shards(tmp_path / "out")
    assert samples["img000"]["txt"] == "second" and samples["img001"]["txt"] == "by its path"  # absolute: matched
    shard = tmp_path / "i2d.tar"  # img2dataset with the caption in KEY.json only
    with tarfile.open(shard, "w") as archive:
        _add(archive, "000000000.jpg", _jpeg(64, 48, 0))
        _add(archive, "000000000.json", json.dumps({"key": "000000000", "caption": "from the json"}).encode())
    main([str(shard), str(tmp_path / "o2"), *TINY])
    assert read_shards(tmp_path / "o2")["000000000"]["txt"] == "from the json"
