"""Sample keys and the names that find them: captions and --gt-boxes matched by path, non-ASCII
names, names that differ only in replaced characters (`a b.jpg`, `a_b.jpg`), and the feature store
finding each of them again for `vilbert-eval`."""
from __future__ import annotations

import json

import pytest

from extractor.cli import main

from extract_helpers import make_image, read_shards

TINY = ["--config", "tiny", "--workers", "0", "--quiet", "--device", "cpu"]


def test_names_match_by_path_and_a_shared_file_name_is_an_error_not_a_guess(tmp_path):
    import click

    images = tmp_path / "images"
    for sub in ("sub1", "sub2"):
        (images / sub).mkdir(parents=True)
        make_image(64, 48).save(images / sub / "dup.jpg")
    (tmp_path / "by_path.tsv").write_text("a dog\tsub1/dup.jpg\na cat\tsub2/dup.jpg\n")
    summary = main([str(images), str(tmp_path / "out"), *TINY, "--captions", str(tmp_path / "by_path.tsv")])
    shards = read_shards(tmp_path / "out")
    assert summary["done"] == 2 and shards["sub1_dup"]["txt"] == "a dog" and shards["sub2_dup"]["txt"] == "a cat"
    (tmp_path / "by_name.tsv").write_text("a dog\thttp://x.org/dup.jpg\n")
    with pytest.raises(click.ClickException, match="'dup.jpg' names 2 images under IMAGES"):
        main([str(images), str(tmp_path / "o2"), *TINY, "--captions", str(tmp_path / "by_name.tsv")])
    coco = {"images": [{"id": 1, "file_name": "dup.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 30, 20]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    with pytest.raises(click.ClickException, match=r"'dup.jpg' matches 2 images \(.*sub1/dup.jpg, .*sub2/dup.jpg\)"):
        main([str(images), str(tmp_path / "o3"), *TINY, "--gt-boxes", str(tmp_path / "coco.json")])
    coco["images"][0]["file_name"] = "sub2/dup.jpg"  # by its path: only that image gets the box
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    summary = main([str(images), str(tmp_path / "o4"), *TINY, "--gt-boxes", str(tmp_path / "coco.json")])
    assert (summary["done"], summary["failed"]) == (1, 1) and list(read_shards(tmp_path / "o4")) == ["sub2_dup"]
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_non_ascii_names_of_the_same_length_get_distinct_stable_keys(tmp_path):
    from extractor.sources import safe_key

    images = tmp_path / "images"
    images.mkdir()
    make_image(64, 48).save(images / "猫.jpg")
    make_image(48, 64).save(images / "犬.jpg")
    summary = main([str(images), str(tmp_path / "out"), *TINY])
    keys = sorted(read_shards(tmp_path / "out"))
    assert summary["done"] == 2 and len(keys) == 2 and keys == sorted([safe_key("猫"), safe_key("犬")])
    assert safe_key("photos/a b.v2") == "photos_a_b_v2"  # ASCII names keep the keys of earlier runs


def test_a_local_file_name_with_a_question_mark_keeps_its_caption(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    make_image(64, 48).save(images / "what?.jpg")
    make_image(64, 48, seed=1).save(images / "photo.jpg")
    (tmp_path / "captions.tsv").write_text("what is it\twhat?.jpg\na photo\thttp://x.org/photo.jpg?size=large\n")
    main([str(images), str(tmp_path / "out"), *TINY, "--captions", str(tmp_path / "captions.tsv")])
    samples = read_shards(tmp_path / "out")
    assert samples["what_"]["txt"] == "what is it" and samples["photo"]["txt"] == "a photo"


def test_names_that_differ_in_replaced_characters_get_distinct_keys_and_keep_their_boxes(tmp_path):
    from common.names import hashed_key
    from pipelines.tasks.features import FeatureStore

    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate(("a b.jpg", "a_b.jpg", "a.b.jpg", "solo x.jpg")):
        make_image(64, 48, seed=seed).save(images / name)
    coco = {"images": [{"id": 1, "file_name": "a b.jpg", "width": 64, "height": 48},
                       {"id": 2, "file_name": "a_b.jpg", "width": 64, "height": 48},
                       {"id": 3, "file_name": "a.b.jpg", "width": 64, "height": 48},
                       {"id": 4, "file_name": "solo x.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": k, "image_id": k, "bbox": [0, 0, 10 * k, 10]} for k in (1, 2, 3, 4)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    summary = main([str(images), str(tmp_path / "out"), *TINY, "--gt-boxes", str(tmp_path / "coco.json")])
    samples = read_shards(tmp_path / "out")
    expected = {"a_b": 20, hashed_key("a_b", "a b"): 10, hashed_key("a_b", "a.b"): 30, "solo_x": 40}
    assert summary["done"] == 4 and summary["failed"] == 0 and sorted(samples) == sorted(expected)
    for key, width in expected.items():  # each image kept its own box: none was taken for another
        assert samples[key]["boxes.npy"].tolist() == [[0, 0, width, 10]]
    store = FeatureStore(tmp_path / "out")  # vilbert-eval finds each by the name it was given
    for name, key in (("a b.jpg", hashed_key("a_b", "a b")), ("a_b", "a_b"), ("a.b.jpg", hashed_key("a_b", "a.b")),
                      ("solo x.jpg", "solo_x")):
        assert store.key_for(name) == key
    again = main([str(images), str(tmp_path / "out"), *TINY, "--gt-boxes", str(tmp_path / "coco.json")])
    assert (again["done"], again["skipped"]) == (0, 4)  # stable: a re-run finds every key done


def test_numbers_match_only_coco_file_names_never_another_datasets_digits(tmp_path):
    import numpy as np

    from common.shard_writer import ShardWriter
    from pipelines.tasks.features import FeatureStore

    from tasks_data import npy

    members = {"json": json.dumps({"width": 10, "height": 10}).encode(),
               "features.npy": npy(np.ones((1, 4), np.float16)), "boxes.npy": npy(np.zeros((1, 4), np.float32))}
    with ShardWriter(str(tmp_path), "feat", 100) as writer:
        for key in ("val2014_COCO_val2014_000000000042", "flickr_7", "img_000123", "000000000009"):
            writer.write(key, members)
    store = FeatureStore(tmp_path)
    assert store.key_for(42) == store.key_for("COCO_val2014_000000000042.jpg") == "val2014_COCO_val2014_000000000042"
    assert store.key_for(9) == "000000000009" and store.key_for("flickr_7") == "flickr_7"
    for other in (7, 123, "img_123", "x_42"):  # digits of another dataset's names are not COCO ids
        assert store.key_for(other) is None


def test_a_name_added_later_that_takes_a_key_out_holds_for_another_image_is_refused(tmp_path):
    from common.names import hashed_key

    images = tmp_path / "images"
    images.mkdir()
    make_image(64, 48, seed=0).save(images / "a b.jpg")
    main([str(images), str(tmp_path / "out"), *TINY])  # alone, 'a b.jpg' has the plain key a_b
    make_image(64, 48, seed=1).save(images / "a_b.jpg")  # now a_b.jpg keeps a_b, and 'a b.jpg' is hashed
    again = main([str(images), str(tmp_path / "out"), *TINY])
    assert (again["done"], again["failed"]) == (1, 1)  # a_b.jpg is not taken for done with the other's features
    reasons = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [r["key"] for r in reasons] == ["a_b"] and "with the features of" in reasons[0]["reason"] \
        and "a b.jpg" in reasons[0]["reason"]
    assert hashed_key("a_b", "a b") in read_shards(tmp_path / "out")
