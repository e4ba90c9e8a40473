"""Imported shards are read by what reads vilbert-extract's: vilbert-eval's feature store and the
pretraining loader (masked-region targets from the hard labels); pretraining refuses, in one line,
shards whose source had no class distributions."""
from __future__ import annotations

import click
import numpy as np
import pytest
import torch

from extractor.import_cli import main
from pipelines.data.loader import DataConfig, PretrainingData, make_loader
from pipelines.tasks.features import FeatureStore, image_batch

from import_helpers import make_images, write_butd_tsv, write_lxmert_tsv
from shards import WORDS, write_shards, write_vocab


def captions_tsv(path, images, name) -> str:
    rng = np.random.default_rng(0)
    lines = [f"{' '.join(rng.choice(WORDS, 6))}\t{name(image)}" for image in images]
    path.write_text("caption\tfilename\n" + "\n".join(lines) + "\n")
    return str(path)


def test_the_feature_store_reads_imported_butd_features(tmp_path):
    images = make_images(4, dim=16, numeric_ids=True)
    write_butd_tsv(tmp_path / "feats.tsv", images)
    main([str(tmp_path / "feats.tsv"), str(tmp_path / "out"), "--quiet"])
    store = FeatureStore(tmp_path / "out")
    assert len(store) == 4
    for image in images:
        regions = store.get(int(image["image_id"]))  # COCO's integer ids, as the tasks look them up
        np.testing.assert_array_equal(regions.features, image["features"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(regions.boxes, image["boxes"])
        assert (regions.width, regions.height, regions.mode) == (image["width"], image["height"], "imported")
    assert f"COCO_val2014_{int(images[0]['image_id']):012d}" in store  # a file-name id finds it too
    batch = image_batch(store, [int(i["image_id"]) for i in images], max_regions=8)
    assert batch["image_feat"].shape == (4, 8, 16) and batch["image_loc"].shape == (4, 8, 5)
    first = images[0]
    n = first["num_boxes"]
    expected_loc = first["boxes"] / np.array([first["width"], first["height"]] * 2, np.float32)
    torch.testing.assert_close(batch["image_loc"][0, 1:n + 1, :4], torch.from_numpy(expected_loc))


def test_pretraining_reads_lxmert_imports_with_one_hot_targets(tmp_path):
    images = make_images(6, dim=16, min_boxes=4, max_boxes=6)
    write_lxmert_tsv(tmp_path / "obj36.tsv", images)
    captions = captions_tsv(tmp_path / "captions.tsv", images, lambda i: i["image_id"] + ".jpg")
    summary = main([str(tmp_path / "obj36.tsv"), str(tmp_path / "out"), "--quiet", "--captions", captions])
    assert summary["captioned"] == 6
    vocab = str(write_vocab(tmp_path / "vocab.txt"))
    cfg = DataConfig(shards=str(tmp_path / "out"), tokenizer=vocab, batch_size=6, num_workers=0, max_regions=8)
    loader = make_loader(cfg, train=False)
    assert loader.recipe == {"detector": "imported-lxmert-tsv", "weights_hash": "unknown", "mode": "imported"}
    batch = next(iter(loader))
    by_key = {i["image_id"]: i for i in images}
    assert sorted(batch["keys"]) == sorted(by_key)
    assert batch["image_feat"].shape == (6, 9, 16)
    targets, row = batch["region_targets"], 0
    assert targets.shape[1] == 1601 and len(targets) == int(batch["region_labels"].sum()) > 0
    for b, key in enumerate(batch["keys"]):  # each masked region's target: one-hot at its objects_id + 1
        n, stored = by_key[key]["num_boxes"], by_key[key]["features"].astype(np.float16).astype(np.float32)
        fed = batch["image_feat"][b, 1:n + 1].numpy()
        kept = fed.any(1)  # masked regions' features are zeroed (also in the alignment negatives)
        assert kept.sum() >= n // 2
        np.testing.assert_array_equal(fed[kept], stored[kept])
        for region in np.flatnonzero(batch["region_labels"][b].numpy()):
            assert targets[row].sum() == 1 and int(targets[row].argmax()) == by_key[key]["objects_id"][region - 1] + 1
            row += 1
    assert row == len(targets)


def test_pretraining_refuses_shards_without_class_distributions(tmp_path):
    images = make_images(3, dim=16, numeric_ids=True)
    write_butd_tsv(tmp_path / "feats.tsv", images)
    captions = captions_tsv(tmp_path / "captions.tsv", images, lambda i: f"COCO_val2014_{int(i['image_id']):012d}.jpg")
    summary = main([str(tmp_path / "feats.tsv"), str(tmp_path / "out"), "--quiet", "--captions", captions])
    assert summary["captioned"] == 3  # BUTD's integer ids matched to COCO file names by their number
    vocab = str(write_vocab(tmp_path / "vocab.txt"))
    with pytest.raises(ValueError, match=r"out: imported from butd-tsv without class distributions "
                                         r"\(recipe.json: cls_prob missing\).*vilbert-eval"):
        PretrainingData(DataConfig(shards=str(tmp_path / "out"), tokenizer=vocab, num_workers=0))
    from pipelines.train_cli import main as train

    with pytest.raises(click.ClickException, match="cls_prob missing") as refused:
        train([str(tmp_path / "out"), "--out", str(tmp_path / "run"), "--tokenizer", vocab, "--preset", "vilbert-tiny"])
    assert "\n" not in refused.value.message
    write_shards(tmp_path / "extracted", num_shards=1, per_shard=4)
    with pytest.raises(click.ClickException, match="--eval-shards: .*cls_prob missing"):  # before any training
        train([str(tmp_path / "extracted"), "--eval-shards", str(tmp_path / "out"), "--out", str(tmp_path / "run"),
               "--tokenizer", vocab, "--preset", "vilbert-tiny"])
