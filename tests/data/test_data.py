"""The streaming pipeline (pipelines/data/loader.py) on shards written by tests/shards.py: the batch
contract, shard sources, virtual epochs, the evaluation split, corrupt shards, no pickle, recipes."""
from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from pipelines.data.loader import DataConfig, NoUsableSamples, make_loader
from pipelines.data.samples import decode_member
from pipelines.data.shards import DataWarning, RecipeMismatch, expand_shards

from shards import RECIPE, make_sample, write_shards, write_tar, write_vocab

SMALL = dict(feature_dim=16, num_classes=6)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return str(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def config(shards, vocab, **kw) -> DataConfig:
    return DataConfig(shards=shards, tokenizer=vocab, **{"num_workers": 0, "batch_size": 8, **kw})


def eval_keys(cfg, **kw) -> list[str]:
    return [k for batch in make_loader(cfg, train=False, **kw) for k in batch["keys"]]


def test_batch_matches_the_contract(tmp_path, vocab):
    write_shards(tmp_path, num_shards=1, per_shard=4, num_boxes=10, seed=1)
    write_shards(tmp_path, num_shards=1, per_shard=4, num_boxes=36, first_index=1, seed=2)
    batch = next(iter(make_loader(config(tmp_path, vocab), train=False)))
    B, T, R = 8, 36, 36
    shapes = {"input_ids": (B, T), "token_type_ids": (B, T), "attention_mask": (B, T), "lm_labels": (B, T),
              "image_feat": (B, R + 1, 2048), "image_loc": (B, R + 1, 5), "image_mask": (B, R + 1),
              "region_labels": (B, R + 1), "region_targets": (int(batch["region_labels"].sum()), 1601),
              "align_labels": (B,)}
    for name, shape in shapes.items():
        assert tuple(batch[name].shape) == shape, name
        want = torch.float32 if name in ("image_feat", "image_loc", "region_targets") else torch.long
        assert batch[name].dtype == want, name
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][:, 0] == 2).all()  # [CLS] (tests' vocab: [PAD] 0, [UNK] 1, [CLS] 2)
    assert (batch["lm_labels"][:, 0] == -100).all()
    for b, n in enumerate(lengths.tolist()):
        assert (batch["input_ids"][b, n:] == 0).all() and (batch["lm_labels"][b, n - 1:] == -100).all()
    counts = batch["image_mask"].sum(1) - 1
    assert sorted(counts.tolist()) == [10] * 4 + [36] * 4
    assert (batch["image_loc"][:, 0] == torch.tensor([0, 0, 1, 1, 1.0])).all()
    assert (batch["image_mask"][:, 0] == 1).all() and (batch["region_labels"][:, 0] == 0).all()
    padding = batch["image_mask"] == 0
    assert (batch["region_labels"][padding] == 0).all() and (batch["image_feat"][padding] == 0).all()
    # one class distribution per masked region (the synthetic shards' rows sum to 1 up to float16)
    torch.testing.assert_close(batch["region_targets"].sum(1), torch.ones(len(batch["region_targets"])),
                               atol=2e-2, rtol=0)
    assert (batch["token_type_ids"] == 0).all()
    assert len(batch["keys"]) == B and all(isinstance(k, str) for k in batch["keys"])


def test_locations_through_the_pipeline(tmp_path, vocab):
    boxes = np.array([[10, 5, 60, 25], [0, 0, 100, 50]], np.float32)
    rng = np.random.default_rng(0)
    write_tar(tmp_path / "one-000000.tar", {"img": make_sample(rng, "img", num_boxes=2, width=100, height=50,
                                                               boxes=boxes, **SMALL)})
    batch = next(iter(make_loader(config(tmp_path, vocab, samples_per_epoch=1), train=False)))
    np.testing.assert_allclose(batch["image_loc"][0, 1:3].numpy(), [[0.1, 0.1, 0.6, 0.5, 0.2], [0, 0, 1, 1, 1]],
                               rtol=1e-6)


def test_shard_sources_directory_brace_list_and_pipe(tmp_path, vocab):
    paths = write_shards(tmp_path, num_shards=3, per_shard=2, **SMALL)
    (tmp_path / ".shard-000009.tar.partial").write_bytes(b"in progress")
    assert expand_shards(tmp_path) == [str(p) for p in paths]
    assert expand_shards(f"{tmp_path}/shard-{{000000..000002}}.tar") == [str(p) for p in paths]
    assert expand_shards([str(paths[0]), str(paths[2])]) == [str(paths[0]), str(paths[2])]
    with pytest.raises(FileNotFoundError, match="2 shard.s. not found, e.g. .*shard-000006.tar"):
        expand_shards(f"{tmp_path}/shard-{{000006..000007}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: directory holds no .tar shards"):
        expand_shards(tmp_path / "empty")
    piped = eval_keys(config(f"pipe:cat {tmp_path}/shard-{{000000..000002}}.tar", vocab))
    assert sorted(piped) == sorted(eval_keys(config(tmp_path, vocab)))
    with pytest.raises(ValueError, match=r"remote shards have no sizes.json\); pass --samples-per-epoch"):
        make_loader(config(f"pipe:cat {paths[0]}", vocab), train=True)


def test_training_virtual_epochs_resample_shards(tmp_path, vocab):
    write_shards(tmp_path, num_shards=3, per_shard=8, **SMALL)
    loader = make_loader(config(tmp_path, vocab, shuffle_buffer=10, seed=0), train=True)
    assert loader.samples_per_epoch == 24  # from sizes.json
    epoch = list(loader)
    assert len(epoch) == 3 and all(len(b["keys"]) == 8 for b in epoch)
    stream = loader.forever()
    keys = {k for _ in range(12) for k in next(stream)["keys"]}
    assert len(keys) > 16 and all(k.startswith("shard") for k in keys)
    custom = make_loader(config(tmp_path, vocab, samples_per_epoch=80), train=True)
    assert len(list(custom)) == 10


def test_eval_split_over_two_nodes_is_disjoint_complete_and_deterministic(tmp_path, vocab):
    write_shards(tmp_path, num_shards=5, per_shard=3, **SMALL)
    cfg = config(tmp_path, vocab, batch_size=4)
    node0, node1 = eval_keys(cfg, rank=0, world_size=2), eval_keys(cfg, rank=1, world_size=2)
    assert not set(node0) & set(node1)
    assert len(node0) + len(node1) == 15 and len(set(node0) | set(node1)) == 15
    assert eval_keys(cfg, rank=0, world_size=2) == node0
    batches = list(make_loader(cfg, train=False, rank=1, world_size=2))
    again = list(make_loader(cfg, train=False, rank=1, world_size=2))
    for first, second in zip(batches, again):  # the same masks and negatives each pass
        assert (first["input_ids"] == second["input_ids"]).all()
        assert (first["region_labels"] == second["region_labels"]).all()


def image_token_reference(batch, b: int) -> torch.Tensor:
    """[IMG] of row b recomputed from the batch itself: the mean of the regions that are neither
    masked nor overlap a masked one with IoU > 0.4 (IoU is the same on normalised boxes). Needs
    objective 0 or 2: with objective 1 a negative's masked regions carry no label."""
    n = int(batch["image_mask"][b].sum()) - 1
    boxes, masked = batch["image_loc"][b, 1:n + 1, :4], batch["region_labels"][b, 1:n + 1].bool()
    lo, hi = (torch.maximum(boxes[:, None, :2], boxes[None, :, :2]),
              torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:]))
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    kept = ~masked & ~((iou > 0.4) & masked[None, :]).any(1)
    return batch["image_feat"][b, 1:n + 1][kept].mean(0) if kept.any() else torch.zeros(batch["image_feat"].shape[-1])


def test_eval_split_by_dataloader_worker_is_complete_and_float32(tmp_path, vocab):
    write_shards(tmp_path, num_shards=4, per_shard=3, **SMALL)
    cfg = config(tmp_path, vocab, num_workers=2, batch_size=4, objective=0)  # 0: negatives keep region labels
    batches = list(make_loader(cfg, train=False, rank=0, world_size=1))
    keys = [k for batch in batches for k in batch["keys"]]
    assert len(keys) == 12 and len(set(keys)) == 12
    for batch in batches:  # workers send float16; the loader restores the float32 contract
        assert batch["image_feat"].dtype == batch["region_targets"].dtype == torch.float32
        for b in range(len(batch["keys"])):
            torch.testing.assert_close(batch["image_feat"][b, 0], image_token_reference(batch, b), rtol=2e-3, atol=1e-3)
    half = next(iter(make_loader(config(tmp_path, vocab, half_features=True), train=False)))
    full = next(iter(make_loader(config(tmp_path, vocab), train=False)))
    assert half["image_feat"].dtype == half["region_targets"].dtype == torch.float16
    assert (half["region_targets"].float() == full["region_targets"]).all()
    assert (half["image_feat"][:, 1:].float() == full["image_feat"][:, 1:]).all()
    torch.testing.assert_close(half["image_feat"][:, 0].float(), full["image_feat"][:, 0], rtol=1e-3, atol=1e-3)


def test_corrupt_truncated_and_bad_samples_are_skipped_and_counted(tmp_path, vocab):
    write_shards(tmp_path, num_shards=1, per_shard=6, **SMALL)
    whole = write_shards(tmp_path / "src", num_shards=1, per_shard=6, prefix="cut", **SMALL)[0].read_bytes()
    (tmp_path / "cut-000000.tar").write_bytes(whole[: len(whole) // 2 + 100])  # truncated mid-member
    (tmp_path / "junk-000000.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    rng = np.random.default_rng(1)
    broken = make_sample(rng, "broken", **SMALL)
    broken["features.npy"] = b"\x93NUMPY garbage"
    no_boxes = make_sample(rng, "noboxes", **SMALL)
    del no_boxes["boxes.npy"]
    write_tar(tmp_path / "bad-000000.tar", {"broken": broken, "noboxes": no_boxes,
                                            "fine": make_sample(rng, "fine", **SMALL)})
    loader = make_loader(config(tmp_path, vocab, batch_size=4), train=False)
    with pytest.warns(DataWarning) as caught:
        keys = [k for batch in loader for k in batch["keys"]]
    good_keys = {f"shard000_{i:05d}" for i in range(6)}
    assert good_keys | {"fine"} <= set(keys)
    assert set(keys) - good_keys - {"fine"} <= {f"cut000_{i:05d}" for i in range(6)}
    counts = loader.error_counts()
    messages = "\n".join(str(w.message) for w in caught)
    assert counts["corrupt_shards"] == 2, messages
    assert counts["bad_samples"] >= 2
    assert "junk-000000.tar" in messages and "cut-000000.tar" in messages
    assert "bad-000000.tar" in messages and "'noboxes'" in messages and "boxes.npy" in messages
    assert "'broken'" in messages and "features.npy" in messages


def test_training_on_only_broken_shards_stops_instead_of_spinning(tmp_path, vocab):
    for i in range(2):
        (tmp_path / f"junk-{i:06d}.tar").write_bytes(b"not a tar" * 100)
    (tmp_path / "sizes.json").write_text(json.dumps({"junk-000000.tar": 5, "junk-000001.tar": 5}))
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    loader = make_loader(config(tmp_path, vocab), train=True)
    with pytest.warns(DataWarning), pytest.raises(NoUsableSamples, match="all 2 shard.*corrupt_shards"):
        next(iter(loader))
    assert loader.error_counts()["corrupt_shards"] >= 2  # both opened (resampling may repeat one)


def test_training_on_shards_without_a_caption_stops_instead_of_spinning(tmp_path, vocab):
    rng = np.random.default_rng(0)
    for shard in range(3):
        write_tar(tmp_path / f"x-{shard:06d}.tar",
                  {f"{shard}{i}": make_sample(rng, f"{shard}{i}", caption=None, **SMALL) for i in range(2)})
    (tmp_path / "sizes.json").write_text(json.dumps({f"x-{shard:06d}.tar": 2 for shard in range(3)}))
    loader = make_loader(config(tmp_path, vocab, seed=0), train=True)
    with pytest.raises(NoUsableSamples, match="all 3 shard.*uncaptioned [1-9]"):
        next(iter(loader))
    # one captioned sample anywhere is enough to train on (it is resampled)
    write_tar(tmp_path / "x-000001.tar", {"ok": make_sample(rng, "ok", **SMALL)})
    batch = next(iter(make_loader(config(tmp_path, vocab, seed=0, shuffle_buffer=1), train=True)))
    assert batch["keys"] == ["ok"] * 8


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling would create the file


def test_pickled_members_are_never_unpickled(tmp_path, vocab):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    sample = make_sample(np.random.default_rng(0), "evil", **SMALL)
    sample.update({"pyd": payload, "pickle": payload, "extra.pyd": payload})
    write_tar(tmp_path / "evil-000000.tar", {"evil": sample})
    keys = eval_keys(config(tmp_path, vocab))
    assert keys == ["evil"] and not marker.exists()
    assert decode_member("x.pyd", payload) is None and decode_member("x.pickle", payload) is None
    with pytest.raises(ValueError, match="allow_pickle"):  # an object array inside .npy is refused too
        buffer = io.BytesIO()
        np.save(buffer, np.array([_Marker(str(marker))], dtype=object), allow_pickle=True)
        decode_member("x.npy", buffer.getvalue())
    assert not marker.exists()


def test_mixed_recipes_are_refused_unless_allowed(tmp_path, vocab):
    other = {**RECIPE, "weights_hash": "ffffffffffff"}
    write_shards(tmp_path / "a", num_shards=1, per_shard=4, prefix="a", **SMALL)
    write_shards(tmp_path / "b", num_shards=1, per_shard=4, prefix="b", recipe=other, **SMALL)
    both = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(RecipeMismatch, match="weights_hash|ffffffffffff"):
        make_loader(config(both, vocab), train=False)
    loader = make_loader(config(both, vocab, allow_mixed_recipes=True), train=False)
    assert loader.recipe == {"mixed": [RECIPE, other]}
    assert len([k for batch in loader for k in batch["keys"]]) == 8
    assert make_loader(config(tmp_path / "a", vocab), train=False).recipe == RECIPE


def test_a_shard_whose_samples_disagree_with_recipe_json_stops_the_stream(tmp_path, vocab):
    write_shards(tmp_path, num_shards=1, per_shard=4, recipe={**RECIPE, "detector": "other-net"}, **SMALL)
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    with pytest.raises(RecipeMismatch, match="shard-000000.tar.*detector"):
        list(make_loader(config(tmp_path, vocab), train=False))


def test_recipe_from_the_first_sample_without_recipe_json(tmp_path, vocab):
    write_shards(tmp_path, num_shards=1, per_shard=2, **SMALL)
    (tmp_path / "recipe.json").unlink()
    assert make_loader(config(tmp_path, vocab), train=False).recipe == RECIPE


def test_tokenizer_from_directory_lowercases_and_truncates(tmp_path, vocab):
    from pipelines.data.tokenization import CaptionTokenizer, load_tokenizer

    write_vocab(tmp_path / "vocab.txt")
    tok = CaptionTokenizer(load_tokenizer(tmp_path), max_seq_len=36)
    ids, lengths = tok(["The DOG", " ".join(["dog"] * 50)])
    vocab_ids = {w: i for i, w in enumerate((tmp_path / "vocab.txt").read_text().split())}
    assert ids[0, :4].tolist() == [vocab_ids["[CLS]"], vocab_ids["the"], vocab_ids["dog"], vocab_ids["[SEP]"]]
    assert lengths.tolist() == [4, 36] and ids[1, -1] == vocab_ids["[SEP]"] and (ids[0, 4:] == 0).all()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_captionless_samples_are_counted_not_batched(tmp_path, vocab):
    rng = np.random.default_rng(0)
    write_tar(tmp_path / "x-000000.tar", {"a": make_sample(rng, "a", caption=None, **SMALL),
                                          "b": make_sample(rng, "b", **SMALL)})
    loader = make_loader(config(tmp_path, vocab), train=False)
    assert [k for batch in loader for k in batch["keys"]] == ["b"]
    assert loader.error_counts()["uncaptioned"] == 1


def test_tar_helper_writes_the_documented_members(tmp_path):
    path = write_shards(tmp_path, num_shards=1, per_shard=1, num_boxes=3, **SMALL)[0]
    with tarfile.open(path) as tar:
        names = sorted(tar.getnames())
    assert names == sorted(f"shard000_00000.{e}" for e in ("json", "txt", "features.npy", "boxes.npy",
                                                            "cls_prob.npy"))


def test_trainer_on_loader_batches_with_fixed_size_heads_and_float16_features(tmp_path, vocab):
    """The GPU path on CPU: float16 features and compact targets from the loader, cast and padded in
    the trainer, fixed-size heads, on-device skip: the same training as exact selection."""
    from pipelines.train.metrics import read_metrics
    from pipelines.train.trainer import TrainConfig, Trainer
    write_shards(tmp_path / "shards", num_shards=2, per_shard=12, **SMALL)
    rows = []
    for static in (False, True):
        data = config(str(tmp_path / "shards"), vocab, batch_size=6, seed=3, half_features=True,
                      samples_per_epoch=10 ** 6)
        overrides = dict(vocab_size=100, v_feature_size=16, v_target_size=6, max_position_embeddings=40)
        batch = next(iter(make_loader(data)))
        assert batch["image_feat"].dtype == torch.float16 and batch["region_targets"].dim() == 2
        trainer = Trainer(TrainConfig(out=tmp_path / str(static), preset="vilbert-tiny", model_overrides=overrides,
                                      batch_size=6, micro_batch_size=6, max_steps=4, log_every=1, save_every=100,
                                      tensorboard=False, static_heads=static, seed=1))
        trainer.fit(make_loader(data).forever())
        rows.append(read_metrics(tmp_path / str(static) / "metrics.csv"))
    for exact, fixed in zip(*rows):
        for key in ("loss", "mlm_loss", "mrm_loss", "align_loss"):
            assert abs(exact[key] - fixed[key]) < 1e-4 * max(1.0, abs(exact[key])), (key, exact[key], fixed[key])
        assert fixed["masked_overflow"] == 0
    assert rows[1][-1]["mrm_loss"] > 0


def test_a_fifo_named_tar_never_blocks_a_reader(tmp_path):
    """A FIFO opened for reading waits for a writer forever: every glob of shards passes it by."""
    import os
    import signal

    from extractor.sources import discover_inputs
    from pipelines.tasks.features import FeatureStore

    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("a FIFO blocked")))
    signal.alarm(30)
    try:
        write_shards(tmp_path / "shards", num_shards=1, per_shard=2)
        os.mkfifo(tmp_path / "shards" / "zz-fifo.tar")
        assert all(not u.endswith("zz-fifo.tar") for u in expand_shards(str(tmp_path / "shards")))
        with pytest.raises(ValueError, match="zz-fifo.tar: not a regular file"):
            expand_shards(str(tmp_path / "shards" / "zz-fifo.tar"))
        assert len(FeatureStore(tmp_path / "shards")) == 2
        images = tmp_path / "images"
        images.mkdir()
        os.mkfifo(images / "inputs.tar")
        assert discover_inputs(str(images), None, problems=[]) == []
    finally:
        signal.alarm(0)


def test_samples_of_other_widths_and_cut_npy_headers_are_skipped_not_fatal(tmp_path, vocab):
    rng = np.random.default_rng(5)
    good = {f"g{i}": make_sample(rng, f"g{i}", **SMALL) for i in range(3)}
    wide = make_sample(rng, "wide", feature_dim=24, num_classes=6)  # another detector's width
    more_classes = make_sample(rng, "classes", feature_dim=16, num_classes=9)
    cut = make_sample(rng, "cut", **SMALL)
    cut["features.npy"] = cut["features.npy"][:40]  # inside the header's dict literal
    write_tar(tmp_path / "x-000000.tar", {**good, "wide": wide, "classes": more_classes, "cut": cut})
    loader = make_loader(config(tmp_path, vocab, batch_size=8), train=False)
    with pytest.warns(DataWarning) as caught:
        batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == ["g0", "g1", "g2"]
    assert batches[0]["image_feat"].shape[-1] == 16 and loader.error_counts()["bad_samples"] == 3
    messages = "\n".join(str(w.message) for w in caught)
    assert "'wide'" in messages and "features 24 / classes 6 wide, the run's first sample 16 / 6" in messages
    assert "'classes'" in messages and "'cut'" in messages and "unreadable .npy header" in messages


def test_sizes_json_of_other_shapes_is_one_line_naming_the_file(tmp_path):
    from pipelines.data.shards import count_samples

    write_shards(tmp_path, num_shards=2, per_shard=3, **SMALL)
    urls = expand_shards(str(tmp_path))
    assert count_samples(urls) == 6
    sizes = tmp_path / "sizes.json"
    for content, said in (('{"shard-000000.tar": -1, "shard-000001.tar": 3}', "has the sample count -1"),
                          ('{"shard-000000.tar": 3.0, "shard-000001.tar": 3}', "has the sample count 3.0"),
                          ('{"shard-000000.tar": true, "shard-000001.tar": 3}', "has the sample count True"),
                          ('[3, 3]', "a JSON list, expected an object"), ("{", "not valid JSON")):
        sizes.write_text(content)
        with pytest.raises(ValueError, match=rf"^{sizes}: .*{said}"):
            count_samples(urls)
