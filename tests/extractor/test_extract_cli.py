"""`vilbert-extract` end to end with the tiny config on generated images."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from extractor.cli import main

from extract_helpers import make_image, read_shards, write_images

TINY = ["--config", "tiny", "--workers", "0", "--quiet", "--device", "cpu"]


def test_folder_with_captions_errors_preview_and_resume(tmp_path):
    images = write_images(tmp_path / "images", 5, captions=False)
    (images / "img000.txt").write_text("sidecar caption")
    (images / "captions.tsv").write_text("caption\turl\na cat on a mat\thttp://x.org/img001.jpg?w=1\n")
    (images / "empty.jpg").write_bytes(b"")
    (images / "page.png").write_text("<html>")
    out = tmp_path / "out"
    make_image(300, 200).save(images / "huge.png")  # "huge" under --max-pixels 50000
    args = [str(images), str(out), *TINY, "--shard-size", "2", "--captions", str(images / "captions.tsv"),
            "--max-pixels", "50000",
            "--preview", "2", "--batch-size", "3"]
    summary = main(args)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (5, 0, 3)
    samples = read_shards(out)
    assert sorted(samples) == [f"img{i:03d}" for i in range(5)]
    assert samples["img000"]["txt"] == "sidecar caption" and samples["img001"]["txt"] == "a cat on a mat"
    assert "txt" not in samples["img002"]
    for key, sample in samples.items():
        info, count = sample["json"], sample["json"]["num_boxes"]
        assert info["image_id"] == key and (info["width"], info["height"]) == (64, 48)
        assert info["detector"] == "bottom-up-attention-tiny" and info["weights_hash"] == "random-init"
        assert 10 <= count <= 36
        assert sample["features.npy"].dtype == np.float16 and sample["features.npy"].shape == (count, 256)
        boxes = sample["boxes.npy"]
        assert boxes.dtype == np.float32 and boxes.shape == (count, 4)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 48).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        probs = sample["cls_prob.npy"]
        assert probs.dtype == np.float16 and probs.shape == (count, 1601)
        assert np.allclose(probs.astype(np.float32).sum(1), 1.0, atol=2e-2)
        assert "attr_prob.npy" not in sample
    assert json.loads((out / "sizes.json").read_text()) == {
        "shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["path"].rsplit("/", 1)[1]: e["reason"] for e in errors} == {
        "empty.jpg": "empty file (0 bytes)", "page.png": "not an image (unrecognised format)",
        "huge.png": "image too large: 300x200 = 60000 pixels exceeds the limit of 50000 (decompression bomb?)"}
    assert len(list((out / "preview").glob("*.png"))) == 2
    # the shards are plain WebDataset
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)]
    assert sorted(keys) == sorted(samples)
    # re-run: nothing redone, nothing logged twice
    again = main(args)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 8, 0)
    assert len((out / "errors.jsonl").read_text().splitlines()) == 3


def _img2dataset_tar(path, count, first=0):
    with tarfile.open(path, "w") as archive:
        for index in range(first, first + count):
            key = f"0000{index:05d}"
            buffer = io.BytesIO()
            make_image(50, 40, seed=index).save(buffer, format="JPEG")
            members = {"jpg": buffer.getvalue(), "txt": f"caption {index}".encode(),
                       "json": json.dumps({"url": f"http://example.org/{index}.jpg", "key": key}).encode()}
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


def test_img2dataset_tar_attributes_and_bf16(tmp_path):
    _img2dataset_tar(tmp_path / "00000.tar", 3)
    out = tmp_path / "out"
    summary = main([str(tmp_path / "00000.tar"), str(out), *TINY, "--attributes", "--precision", "bf16",
                    "--min-boxes", "5", "--max-boxes", "7", "--conf-threshold", "0.9"])
    assert summary["done"] == 3
    samples = read_shards(out)
    assert sorted(samples) == ["000000000", "000000001", "000000002"]
    sample = samples["000000001"]
    assert sample["txt"] == "caption 1" and sample["json"]["url"] == "http://example.org/1.jpg"
    assert sample["json"]["source"].endswith("00000.tar:000000001.jpg")
    assert sample["json"]["num_boxes"] == 5  # nothing reaches 0.9 with random weights: min_boxes
    assert sample["attr_prob.npy"].shape == (5, 401) and sample["attr_prob.npy"].dtype == np.float16


def test_gt_boxes_from_coco(tmp_path):
    images = write_images(tmp_path / "images", 2)
    coco = {"images": [{"id": 7, "file_name": "train/img000.jpg"}],
            "annotations": [{"id": 1, "image_id": 7, "bbox": [0, 0, 30, 20]},
                            {"id": 2, "image_id": 7, "bbox": [10, 5, 60, 50]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    summary = main([str(images), str(out), *TINY, "--gt-boxes", str(tmp_path / "coco.json")])
    assert (summary["done"], summary["failed"]) == (1, 1)
    sample = read_shards(out)["img000"]
    assert sample["json"]["mode"] == "gt-boxes" and sample["json"]["num_boxes"] == 2
    assert np.allclose(sample["boxes.npy"], [[0, 0, 30, 20], [10, 5, 64, 48]])  # clipped to 64x48
    assert sample["features.npy"].shape == (2, 256) and sample["cls_prob.npy"].shape == (2, 1601)
    reasons = [json.loads(l)["reason"] for l in (out / "errors.jsonl").read_text().splitlines()]
    assert reasons == ["no ground-truth boxes for this image"]


def test_ranks_split_inputs_into_disjoint_shards(tmp_path, monkeypatch):
    images = write_images(tmp_path / "images", 5)
    out = tmp_path / "out"
    first = main([str(images), str(out), *TINY, "--num-workers", "2", "--rank", "0", "--shard-size", "2"])
    monkeypatch.setenv("RANK", "1")  # torchrun style
    monkeypatch.setenv("WORLD_SIZE", "2")
    second = main([str(images), str(out), *TINY, "--shard-size", "2"])
    assert (first["done"], second["done"]) == (3, 2) and second["rank"] == 1
    shards = {p.name: set(read_shards_one(p)) for p in out.glob("*.tar")}
    assert sorted(shards) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert shards["shard-000001.tar"] == {"img001", "img003"}  # rank 1 took inputs 1 and 3
    assert set().union(*shards.values()) == {f"img{i:03d}" for i in range(5)}


def read_shards_one(path):
    with tarfile.open(path) as archive:
        return {name.split(".", 1)[0] for name in archive.getnames()}


def test_parallel_decoding_workers_keep_results_identical(tmp_path):
    images = write_images(tmp_path / "images", 4)
    serial = main([str(images), str(tmp_path / "a"), *TINY])
    parallel = main([str(images), str(tmp_path / "b"), *TINY[:2], "--workers", "2", "--quiet", "--batch-size", "2"])
    assert serial["done"] == parallel["done"] == 4
    a, b = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    for key in a:
        assert np.array_equal(a[key]["boxes.npy"], b[key]["boxes.npy"])


def test_help_lists_defaults():
    from click.testing import CliRunner

    from extractor.cli import extract

    result = CliRunner().invoke(extract, ["--help"], terminal_width=100)
    assert result.exit_code == 0
    for text in ("IMAGES OUT", "--batch-size", "[default: 4;", "--min-boxes", "[default: 10;",
                 "--max-boxes", "[default: 36;", "--conf-threshold", "[default: 0.2]", "--gt-boxes",
                 "--precision", "--preview", "--shard-size", "[default: 1000;", "--rank"):
        assert text in result.output, text


def test_bad_weights_file_is_a_clear_error(tmp_path):
    images = write_images(tmp_path / "images", 1)
    (tmp_path / "w.pkl").write_bytes(b"garbage")
    from click import ClickException

    with pytest.raises(ClickException, match="w.pkl: not a readable detectron2 pickle"):
        main([str(images), str(tmp_path / "out"), *TINY, "--weights", str(tmp_path / "w.pkl")])


def test_detectron2_backend_without_detectron2_is_a_clear_error(tmp_path):
    try:
        import detectron2  # noqa: F401
        pytest.skip("detectron2 is installed")
    except ImportError:
        pass
    from click import ClickException

    images = write_images(tmp_path / "images", 1)
    with pytest.raises(ClickException, match="--backend detectron2 needs detectron2"):
        main([str(images), str(tmp_path / "out"), *TINY, "--backend", "detectron2"])


def test_a_detector_failure_on_one_image_does_not_stop_the_run(tmp_path, tiny_detector):
    from common.shard_writer import ShardWriter
    from extractor.pipeline import ExtractionSettings, run_extraction
    from extractor.select import RegionSelector
    from extractor.sources import discover_inputs

    images = write_images(tmp_path / "images", 3)
    failing = {"calls": 0}
    original = type(tiny_detector).forward

    def flaky_forward(self, pixels, given=None):
        failing["calls"] += 1
        if any(p.shape == (48, 64, 3) and p[0, 0, 0] == 7 for p in pixels):
            raise RuntimeError("CUDA out of memory (simulated)\nmore")
        return original(self, pixels, given)

    from PIL import Image
    Image.new("RGB", (64, 48), (7, 7, 7)).save(images / "img001.jpg", quality=100)
    type(tiny_detector).forward = flaky_forward
    try:
        summary = run_extraction(tiny_detector, discover_inputs(str(images)), ShardWriter(str(tmp_path / "out")),
                                 RegionSelector(), ExtractionSettings(batch_size=3, progress=False))
    finally:
        type(tiny_detector).forward = original
    assert (summary["done"], summary["failed"]) == (2, 1)
    (error,) = [json.loads(l) for l in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["path"].endswith("img001.jpg")
    assert error["reason"] == "detector failed: CUDA out of memory (simulated)"
    assert failing["calls"] == 4  # the batch, then each image alone


def test_resuming_with_another_recipe_is_refused(tmp_path):
    from click import ClickException

    images = write_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    main([str(images), str(out), *TINY, "--max-boxes", "20"])
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["max_boxes"] == 20 and recipe["weights_hash"] == "random-init"
    assert recipe["proposals"] == 60 and recipe["detector"] == "bottom-up-attention-tiny"
    with pytest.raises(ClickException, match="different feature recipe.*max_boxes: 20 -> 36"):
        main([str(images), str(out), *TINY])
    assert main([str(images), str(out), *TINY, "--max-boxes", "20"])["skipped"] == 2


def test_preview_draws_named_boxes_on_an_enlarged_small_image(tmp_path):
    from PIL import Image

    from extractor.preview import draw_preview, load_class_names

    names_file = tmp_path / "objects_vocab.txt"
    names_file.write_text("\n".join(["cat,kitty", "dog"]))
    names = load_class_names(str(names_file), 2)
    assert names == ["cat", "dog"]
    pixels = np.zeros((50, 100, 3), np.uint8)
    draw_preview(pixels, np.array([[10, 10, 40, 30]], np.float32), np.array([[0.1, 0.2, 0.7]]), names,
                 tmp_path / "p.png")
    image = np.asarray(Image.open(tmp_path / "p.png"))
    assert image.shape == (400, 800, 3)  # shortest side enlarged to 400
    assert tuple(image[200, 80]) == (255, 40, 40)  # the left edge of the box, x = 10 * 8
    with pytest.raises(ValueError, match="2 class names, the detector has 1600"):
        load_class_names(str(names_file), 1600)


def test_an_image_without_proposals_is_logged_not_written(tmp_path, tiny_detector, monkeypatch):
    from common.shard_writer import ShardWriter
    from extractor.pipeline import ExtractionSettings, run_extraction
    from extractor.select import RegionSelector
    from extractor.sources import discover_inputs

    images = write_images(tmp_path / "images", 1)
    monkeypatch.setattr(tiny_detector.proposal_generator, "forward",
                        lambda features, sizes, scales: [features.new_zeros((0, 4)) for _ in sizes])
    summary = run_extraction(tiny_detector, discover_inputs(str(images)), ShardWriter(str(tmp_path / "out")),
                             RegionSelector(), ExtractionSettings(progress=False))
    assert (summary["done"], summary["failed"]) == (0, 1)
    assert "no regions" in (tmp_path / "out" / "errors.jsonl").read_text()


def test_unreadable_input_shards_are_logged_once_and_the_rest_extracted(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _img2dataset_tar(inputs / "00000.tar", 3)
    _img2dataset_tar(inputs / "00001.tar", 3, first=3)
    whole = (inputs / "00001.tar").read_bytes()
    with tarfile.open(inputs / "00001.tar") as archive:
        second = archive.getmember("000000004.jpg")
    (inputs / "00001.tar").write_bytes(whole[:second.offset_data + 10])  # cut inside the second image
    (inputs / "00002.tar").write_bytes(b"\x00junk" * 1000)
    out = tmp_path / "out"
    summary = main([str(inputs), str(out), *TINY])
    # 3 + the image before the damage; the cut image is listed, read short and fails to decode
    assert (summary["done"], summary["failed"], summary["unreadable_shards"]) == (4, 1, 2)
    errors = {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line)["reason"]
              for line in (out / "errors.jsonl").read_text().splitlines()}
    assert set(errors) == {"00001.tar", "00002.tar", "00001.tar:000000004.jpg"}
    assert errors["00001.tar"].startswith("not a readable tar shard") and "2 image(s) listed before the damage" \
        in errors["00001.tar"]
    assert "0 image(s) listed before the damage" in errors["00002.tar"]
    text = capsys.readouterr()
    assert "00002.tar: not a readable tar shard" in text.err and "errors.jsonl" in text.out
    again = main([str(inputs), str(out), *TINY])  # resumed: nothing redone, nothing logged twice
    assert (again["done"], again["skipped"]) == (0, 5) and len((out / "errors.jsonl").read_text().splitlines()) == 3


def test_input_mistakes_are_one_line_errors_and_missing_captions_a_warning(tmp_path, capsys):
    import click

    (tmp_path / "empty").mkdir()
    images = write_images(tmp_path / "images", 2, captions=False)
    (tmp_path / "inverted.json").write_text(json.dumps({"img000": [[20, 20, 10, 10]]}))
    cases = [([str(tmp_path / "empty")], "no images found"),
             ([str(images / "img000.jpg")], "expected a folder of images or an img2dataset .tar"),
             ([str(images), "--gt-boxes", str(tmp_path / "inverted.json")],
              r"box \[20.0, 20.0, 10.0, 10.0\] of 'img000'"),
             ([str(images), "--device", "gpu"], "'gpu': not a torch device")]
    for given, message in cases:
        with pytest.raises(click.ClickException, match=message):
            main([*given[:1], str(tmp_path / "out"), *TINY, *given[1:]])
    assert not (tmp_path / "out").exists()  # refused before anything was written
    summary = main([str(images), str(tmp_path / "out"), *TINY])
    text = capsys.readouterr()
    assert summary["done"] == 2 and "2 of 2 images have no caption" in text.err
    assert "errors.jsonl" not in text.out  # nothing failed: no pointer to an absent file


def test_a_concurrent_run_is_refused_and_a_damaged_shard_redone(tmp_path, capsys):
    import click

    from common.shard_writer import ShardWriter

    images = write_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    holder = ShardWriter(str(out))  # another extraction, still running
    with pytest.raises(click.ClickException, match="is writing these shards"):
        main([str(images), str(out), *TINY])
    holder.close()
    assert main([str(images), str(out), *TINY, "--shard-size", "2"])["done"] == 3
    first = out / "shard-000000.tar"
    first.write_bytes(first.read_bytes()[:600])  # damaged on disk
    again = main([str(images), str(out), *TINY, "--shard-size", "2"])
    assert again["done"] == 2 and again["skipped"] == 1  # its two images extracted again
    assert "shard-000000.tar: ReadError" in capsys.readouterr().err and (out / "shard-000000.tar.damaged").exists()
    assert len(read_shards(out)) == 3


def test_gt_boxes_of_another_image_size_are_refused_per_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    make_image(64, 48).save(images / "wide.jpg")
    make_image(48, 64).save(images / "tall.jpg")  # e.g. a photo the annotator saw before EXIF rotation
    coco = {"images": [{"id": 1, "file_name": "wide.jpg", "width": 64, "height": 48},
                       {"id": 2, "file_name": "tall.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 30, 20]},
                            {"id": 2, "image_id": 2, "bbox": [0, 0, 30, 20]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    summary = main([str(images), str(out), *TINY, "--gt-boxes", str(tmp_path / "coco.json")])
    assert (summary["done"], summary["failed"]) == (1, 1) and list(read_shards(out)) == ["wide"]
    (reason,) = [json.loads(line)["reason"] for line in (out / "errors.jsonl").read_text().splitlines()]
    assert "'tall.jpg' as 64x48, the image decodes (EXIF rotation applied) to 48x64" in reason
    coco["annotations"][0]["bbox"] = "0 0 30 20"
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    import click

    with pytest.raises(click.ClickException, match=r"bad.json: annotations\[0\] \(id 1\): 'bbox' is '0 0 30 20'"):
        main([str(images), str(tmp_path / "o2"), *TINY, "--gt-boxes", str(tmp_path / "bad.json")])
    del coco["images"][0]["file_name"]
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    with pytest.raises(click.ClickException, match=r"bad.json: images\[0\] needs an 'id' and a 'file_name'"):
        main([str(images), str(tmp_path / "o2"), *TINY, "--gt-boxes", str(tmp_path / "bad.json")])


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    import errno

    import click

    from common.shard_writer import ShardWriter

    images = write_images(tmp_path / "images", 5)
    out = tmp_path / "out"
    real_write, written = ShardWriter.write, []

    def write_until_the_disk_fills(self, key, members):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(key)
        return real_write(self, key, members)

    monkeypatch.setattr(ShardWriter, "write", write_until_the_disk_fills)
    with pytest.raises(click.ClickException, match="the disk is full .No space left on device.; the complete "
                                                    "shards are intact"):
        main([str(images), str(out), *TINY, "--shard-size", "2"])
    monkeypatch.setattr(ShardWriter, "write", real_write)
    again = main([str(images), str(out), *TINY, "--shard-size", "2"])
    # the three written before the disk filled are kept (the last in a shard finished on the way out)
    assert (again["skipped"], again["done"]) == (3, 2) and set(written) <= set(read_shards(out))
    assert len(read_shards(out)) == 5  # every image once, none twice


def test_more_mistakes_are_one_line_and_odd_names_never_stop_a_run(tmp_path, monkeypatch):
    import os

    import click

    images = write_images(tmp_path / "images", 2)
    for prefix in ("/../escaped", "../x", ".hidden", "a/b"):
        with pytest.raises(click.BadParameter, match="letters, digits"):
            main([str(images), str(tmp_path / "o1"), *TINY, "--prefix", prefix])
    monkeypatch.setenv("RANK", "abc")
    with pytest.raises(click.BadParameter, match=r"\$RANK='abc'"):
        main([str(images), str(tmp_path / "o1"), *TINY])
    monkeypatch.delenv("RANK")
    (tmp_path / "cls.txt").write_text("cat\ndog\n")
    (tmp_path / "cls.bin").write_bytes(bytes(range(256)))
    for names, message in (("cls.txt", "2 class names, the detector has 1600"), ("cls.bin", "not a text file")):
        with pytest.raises(click.ClickException, match=message):
            main([str(images), str(tmp_path / "o1"), *TINY, "--preview", "1", "--class-names", str(tmp_path / names)])
    os.symlink(tmp_path / "nowhere" / "deeper", tmp_path / "dangling")
    with pytest.raises(click.ClickException, match="a symlink to .*nowhere/deeper, which does not exist"):
        main([str(images), str(tmp_path / "dangling"), *TINY])
    assert not (tmp_path / "o1").exists()  # every refusal came before OUT was touched
    # a file name that is not UTF-8 and a very deep path: logged or extracted, the run goes on
    deep = images / ("a" * 200) / ("b" * 200)
    deep.mkdir(parents=True)
    make_image(64, 48).save(deep / ("c" * 200 + ".jpg"))
    (images / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"not an image")
    out = tmp_path / "out"
    summary = main([str(images), str(out), *TINY, "--preview", "3"])
    assert (summary["done"], summary["failed"]) == (3, 1)
    (line,) = (out / "errors.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["path"].endswith(os.fsdecode(b"bad\xff.jpg"))
    assert len(list((out / "preview").glob("*.png"))) == 3 and all(
        len(p.name) < 160 for p in (out / "preview").iterdir())
    again = main([str(images), str(out), *TINY])  # the logged failure is not tried (or logged) twice
    assert (again["skipped"], again["failed"]) == (4, 0)


def test_a_ground_truth_box_outside_its_image_rejects_the_image_with_the_reason(tmp_path):
    images = write_images(tmp_path / "images", 2)  # 64 x 48
    (tmp_path / "boxes.json").write_text(json.dumps({"img000": [[0, 0, 30, 20]],
                                                     "img001": [[0, 0, 30, 20], [500, 500, 600, 600]]}))
    out = tmp_path / "out"
    summary = main([str(images), str(out), *TINY, "--gt-boxes", str(tmp_path / "boxes.json")])
    assert (summary["done"], summary["failed"]) == (1, 1) and list(read_shards(out)) == ["img000"]
    (reason,) = [json.loads(line)["reason"] for line in (out / "errors.jsonl").read_text().splitlines()]
    assert reason == "ground-truth box [500.0, 500.0, 600.0, 600.0] lies outside the 64x48 image (1 of 2 boxes)"


def test_a_run_that_fails_at_start_leaves_out_as_it_found_it(tmp_path, monkeypatch):
    """A backend that dies in its first forward pass (as --backend detectron2 once did) takes back the
    lock, sizes.json and recipe.json it made; the next run, with other settings, is not refused."""
    from extractor.detector import BottomUpDetector

    images = write_images(tmp_path / "images", 2)

    def broken(self, *args, **kwargs):
        raise AttributeError("'list' object has no attribute 'shape'")

    with monkeypatch.context() as patch:
        patch.setattr(BottomUpDetector, "forward", broken)
        for out in (tmp_path / "new", tmp_path / "empty"):
            if out.name == "empty":
                out.mkdir()
            with pytest.raises(AttributeError):
                main([str(images), str(out), *TINY])
        assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []
    assert main([str(images), str(tmp_path / "empty"), *TINY, "--max-boxes", "20"])["done"] == 2
    # a folder with shards keeps them and its recipe when a later run fails
    kept = sorted(p.name for p in (tmp_path / "empty").iterdir())
    more = write_images(tmp_path / "more", 3)
    with monkeypatch.context() as patch:
        patch.setattr(BottomUpDetector, "forward", broken)
        with pytest.raises(AttributeError):
            main([str(more), str(tmp_path / "empty"), *TINY, "--max-boxes", "20"])
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == kept


def test_recipe_is_recorded_and_another_recipe_is_refused(tmp_path):
    images = write_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    main([str(images), str(out), *TINY])
    assert json.loads((out / "recipe.json").read_text())["recipe"] == "caffe"
    assert all(sample["json"]["recipe"] == "caffe" for sample in read_shards(out).values())
    from click import ClickException

    with pytest.raises(ClickException, match="recipe: 'caffe' -> 'detectron2'"):
        main([str(images), str(out), *TINY, "--recipe", "detectron2"])
    other = main([str(images), str(tmp_path / "ports"), *TINY, "--recipe", "detectron2"])
    assert other["done"] == 2
    from pipelines.data.shards import RecipeMismatch, read_recipe

    with pytest.raises(RecipeMismatch, match="different feature recipes"):
        read_recipe([str(out / "shard-000000.tar"), str(tmp_path / "ports" / "shard-000000.tar")])


def _img2dataset_run(folder, count, size=(256, 256), original=(640, 480)):
    """One img2dataset output shard as img2dataset writes it with its defaults (resize_mode=border,
    image_size=256): KEY.jpg (the resized frame), KEY.txt and KEY.json with its fields."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "00000.tar", "w") as archive:
        for index in range(count):
            key = f"{index:09d}"
            buffer = io.BytesIO()
            make_image(*size, seed=index).save(buffer, format="JPEG")
            meta = {"url": f"http://example.org/{folder.name}/{index}.jpg", "key": key, "status": "success",
                    "error_message": None, "caption": f"{folder.name} caption {index}", "width": size[0],
                    "height": size[1], "original_width": original[0], "original_height": original[1],
                    "exif": "{}", "sha256": "0" * 64}
            for extension, payload in (("jpg", buffer.getvalue()), ("txt", meta["caption"].encode()),
                                       ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


def test_img2dataset_runs_in_subfolders_keep_apart_and_keep_their_fields(tmp_path, capsys):
    """Two img2dataset runs in one input folder both number from 000000000: their keys carry the
    subfolder, as image folders' keys do. Each sample keeps img2dataset's key, url, caption and original
    size; the padded 256x256 frames (from 640x480: 1 - 256*192 / 256^2 = 25 % padding) are warned about once."""
    inputs = tmp_path / "inputs"
    _img2dataset_run(inputs / "cc3m", 2)
    _img2dataset_run(inputs / "sbu", 2, size=(320, 240), original=(640, 480))  # keep_ratio: not reshaped
    summary = main([str(inputs), str(tmp_path / "out"), *TINY])
    assert (summary["done"], summary["failed"]) == (4, 0)
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == ["cc3m_000000000", "cc3m_000000001", "sbu_000000000", "sbu_000000001"]
    meta = samples["sbu_000000001"]["json"]
    assert (meta["img2dataset_key"], meta["url"], meta["caption"]) == \
        ("000000001", "http://example.org/sbu/1.jpg", "sbu caption 1")
    assert (meta["original_width"], meta["original_height"], meta["width"], meta["height"]) == (640, 480, 320, 240)
    warning = [line for line in capsys.readouterr().err.splitlines() if "img2dataset images" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: 2 of 4 img2dataset images")
    assert "256x256, originally 640x480" in warning[0] and "about 25 %" in warning[0]
    assert "--resize_mode no" in warning[0]


def test_recipe_records_attributes_precision_and_seed_and_another_prefix_adds_no_duplicates(tmp_path):
    images = write_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    main([str(images), str(out), *TINY, "--seed", "7"])
    recipe = json.loads((out / "recipe.json").read_text())
    assert (recipe["attributes"], recipe["precision"], recipe["seed"]) == (False, "fp32", 7)
    from click import ClickException

    for change, field in ((["--seed", "8"], "seed"), (["--precision", "bf16"], "precision"),
                          (["--attributes"], "attributes")):
        with pytest.raises(ClickException, match=f"{field}: "):
            main([str(images), str(out), *TINY, "--seed", "7", *change])
    again = main([str(images), str(out), *TINY, "--seed", "7", "--prefix", "more"])
    assert (again["done"], again["skipped"]) == (0, 3) and sorted(read_shards(out)) == ["img000", "img001", "img002"]


def test_non_finite_detector_outputs_are_logged_per_image_not_written(tmp_path, monkeypatch):
    """NaN weights (or an fp16 overflow on a GPU) gave all-NaN features with exit 0: now each such image
    is a line in errors.jsonl with the likely cause."""
    from extractor.roi_heads import Res5ROIHeads

    images = write_images(tmp_path / "images", 2)
    forward = Res5ROIHeads.forward

    def poisoned(self, features, boxes):
        outputs = forward(self, features, boxes)
        for output in outputs:
            output.features[:, 0] = float("nan")
        return outputs

    monkeypatch.setattr(Res5ROIHeads, "forward", poisoned)
    import click

    with pytest.raises(click.ClickException, match="no image was extracted: all 2 failed"):  # none extracted: exit 1
        main([str(images), str(tmp_path / "out"), *TINY])
    errors = (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    assert len(errors) == 2 and all("non-finite (NaN or inf) features" in line for line in errors)


def test_odd_img2dataset_json_and_long_prefixes(tmp_path):
    from click import BadParameter

    from extractor.importers.driver import BadRecord, as_int
    from extractor.sources import _tar_records, img2dataset_fields

    assert img2dataset_fields({"key": "007", "url": "u", "original_width": "640", "original_height": 10 ** 40}) == \
        {"img2dataset_key": "007", "url": "u"}
    assert img2dataset_fields({"original_width": 640, "original_height": True}) == {"original_width": 640}
    with tarfile.open(tmp_path / "00000.tar", "w") as archive:
        for name, payload in (("000000000.jpg", b"\xff\xd8"), ("000000000.json", b"[1, 2]")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    assert _tar_records(tmp_path / "00000.tar")[0].meta == {}  # valid JSON but not an object: as unreadable
    with pytest.raises(BadRecord, match="image_w inf is not an integer"):
        as_int(float("inf"), "image_w")
    with pytest.raises(BadParameter, match="at most 100"):
        main([str(write_images(tmp_path / "images", 1)), str(tmp_path / "out"), *TINY, "--prefix", "p" * 300])
    assert not (tmp_path / "out").exists()
