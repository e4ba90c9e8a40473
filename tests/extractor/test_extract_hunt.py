"""`vilbert-extract` on the inputs of the 2026-12-01 hunt: IMAGES inside OUT (and OUT inside IMAGES),
a COCO box of no area, a run where every image failed, a broken sizes.json in OUT."""
from __future__ import annotations

import json
import shutil

import click
import pytest

from extractor.cli import main

from extract_helpers import read_shards, write_images

TINY = ["--config", "tiny", "--workers", "0", "--quiet", "--device", "cpu"]


def test_images_that_are_out_or_inside_it_are_one_line_naming_the_mistake(tmp_path):
    images = write_images(tmp_path / "images", 2)
    with pytest.raises(click.ClickException, match="IMAGES .*images is the output folder OUT") as same:
        main([str(images), str(images), *TINY])
    assert "\n" not in same.value.message and "no images found" not in same.value.message
    out = tmp_path / "out"
    shutil.copytree(images, out / "photos")
    with pytest.raises(click.ClickException, match=r"IMAGES .*photos is inside the output folder OUT .*out\b"):
        main([str(out / "photos"), str(out), *TINY])
    with pytest.raises(click.ClickException, match="is inside the output folder OUT"):  # by another spelling
        main([str(out / ".." / "out" / "photos"), str(tmp_path / "." / "out"), *TINY])
    assert sorted(p.name for p in out.iterdir()) == ["photos"]  # refused before anything was written


def test_out_inside_images_never_reads_its_own_shards_or_previews_as_input(tmp_path):
    images = write_images(tmp_path / "images", 3)
    out = images / "features"
    args = [str(images), str(out), *TINY, "--shard-size", "2", "--preview", "2"]
    summary = main(args)
    assert (summary["done"], summary["failed"]) == (3, 0)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(list((out / "preview").glob("*.png"))) == 2  # pictures inside IMAGES, but in OUT
    again = main(args)  # the shards and previews in OUT are neither images nor img2dataset shards
    assert (again["done"], again["skipped"], again["failed"]) == (0, 3, 0)
    assert sorted(read_shards(out)) == ["img000", "img001", "img002"]
    assert not (out / "errors.jsonl").exists()


def test_a_coco_box_of_no_area_skips_its_image_with_the_box_as_given_and_the_rest_extracts(tmp_path, capsys):
    images = write_images(tmp_path / "images", 3)
    coco = {"images": [{"id": i, "file_name": f"img{i:03d}.jpg", "width": 64, "height": 48} for i in range(3)],
            "annotations": [{"id": 10, "image_id": 0, "bbox": [1, 1, 10, 10]},
                            {"id": 11, "image_id": 1, "bbox": [5, 5, 20, 20]},
                            {"id": 12, "image_id": 1, "bbox": [3, 3, 0, 5]},  # zero width (COCO has some)
                            {"id": 13, "image_id": 2, "bbox": [2, 2, 8, 8]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    summary = main([str(images), str(out), *TINY, "--gt-boxes", str(tmp_path / "coco.json")])
    assert (summary["done"], summary["failed"]) == (2, 1) and sorted(read_shards(out)) == ["img000", "img002"]
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert error["key"] == "img001" and error["path"].endswith("img001.jpg")
    assert "coco.json: annotations[2] (id 12) of 'img001.jpg' has 'bbox' [3, 3, 0, 5]" in error["reason"]
    assert "width or height is not > 0" in error["reason"] and "[3.0, 3.0, 3.0, 8.0]" not in error["reason"]
    assert "1 image(s) have a 'bbox' that is no box" in capsys.readouterr().err  # said before the run


def test_a_run_where_every_image_failed_exits_non_zero_after_its_summary(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "empty.jpg").write_bytes(b"")
    (images / "page.png").write_text("<html>")
    out = tmp_path / "out"
    with pytest.raises(click.ClickException, match=r"out: no image was extracted: all 2 failed \(see .*errors.jsonl\)"):
        main([str(images), str(out), *TINY])
    assert "done 0, skipped 0, failed 2" in capsys.readouterr().out  # the summary line comes first
    assert len((out / "errors.jsonl").read_text().splitlines()) == 2
    with pytest.raises(click.ClickException, match="all 2 failed"):  # re-run: still nothing extracted
        main([str(images), str(out), *TINY])
    write_images(images, 1)  # one good image: a run where some failed exits 0, as before
    summary = main([str(images), str(out), *TINY])
    assert (summary["done"], summary["skipped"], summary["failed"]) == (1, 2, 0)


def test_a_broken_sizes_json_in_out_is_named_and_rewritten_from_the_shards(tmp_path, capsys):
    images = write_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    args = [str(images), str(out), *TINY, "--shard-size", "2"]
    main(args)
    counts = json.loads((out / "sizes.json").read_text())
    assert counts == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    main([*args, "--prefix", "other"])  # a second prefix in the same OUT: nothing new, its count kept
    for broken in ({"shard-000000.tar": -2, "shard-000001.tar": 1}, {"shard-000000.tar": 2.5},
                   ["shard-000000.tar"], "not json"):
        (out / "sizes.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
        capsys.readouterr()
        again = main(args)
        assert (again["done"], again["skipped"]) == (0, 3)
        assert json.loads((out / "sizes.json").read_text()) == counts
        warning = [line for line in capsys.readouterr().err.splitlines() if "sizes.json" in line]
        assert len(warning) == 1 and str(out / "sizes.json") in warning[0] and "rewritten" in warning[0]


def test_captions_given_on_a_re_run_for_images_done_without_one_are_a_warning(tmp_path, capsys):
    images = write_images(tmp_path / "images", 3, captions=False)
    out = tmp_path / "out"
    assert main([str(images), str(out), *TINY])["done"] == 3  # no captions: warned, extracted
    capsys.readouterr()
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("a red square\timg000.jpg\na blue circle\timg001.jpg\n")
    again = main([str(images), str(out), *TINY, "--captions", str(tsv)])
    assert (again["done"], again["skipped"]) == (0, 3)
    err = capsys.readouterr().err
    assert "warning: 2 image(s) already in" in err and "extracted without a caption and keep none" in err
    assert "'img000'" in err and "into a new OUT" in err
    fresh = tmp_path / "fresh"  # the way out the warning gives: a new OUT holds the captions
    assert main([str(images), str(fresh), *TINY, "--captions", str(tsv)])["done"] == 3
    capsys.readouterr()
    assert main([str(images), str(fresh), *TINY, "--captions", str(tsv)])["skipped"] == 3
    assert "keep none" not in capsys.readouterr().err  # captioned already: nothing to warn about
