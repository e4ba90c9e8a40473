"""refcoco+ end to end on a tiny synthetic dataset in the refer layout (refs(unc).p protocol 2,
instances.json, detected and ground-truth-box shards). The referred object is named by colour and
shape among four objects and a background box, so only the expression tells which region to pick."""
import json

import numpy as np
import pytest
import torch

from pipelines.tasks.base import TaskOptions
from pipelines.tasks.refcoco import RefCOCOTask, load_refer

from tasks_data import make_refer, run_cli, tiny_checkpoint, write_vocab


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    data = make_refer(root)
    return {"root": root, "data": data, "vocab": write_vocab(root), "ckpt": tiny_checkpoint(root / "ckpt")}


def run(d, out, *extra):
    return run_cli("refcoco+", d, out, *extra)


def test_load_refer_layout(refer):
    splits = load_refer(refer["data"])
    assert {k: len(v) for k, v in splits.items()} == {"train": 240, "val": 40, "testA": 32, "testB": 32}
    e = splits["val"][0]
    assert e["expression"].startswith("the ") and len(e["box"]) == 4 and e["box"][2] > e["box"][0]


def test_targets_are_regions_with_iou_at_least_half(refer, tmp_path):
    opts = TaskOptions(data=refer["data"], features=refer["root"] / "features", out=tmp_path,
                       tokenizer=refer["vocab"], batch_size=8, extra={"gt_features": refer["root"] / "gt_features"})
    task = RefCOCOTask(opts)
    b = task.train_batch(np.random.default_rng(0))
    assert b["image_feat"].shape == (8, 1 + 5 + 4, 32)  # [IMG] + 4 objects + background + 4 gt boxes
    assert (b["targets"][:, 0] == 0).all()  # [IMG] is never a target
    # the jittered detected box and the exact gt box of the referred object: soft targets = their IoU
    assert ((b["targets"] > 0).sum(1) == 2).all()
    assert (b["targets"][:, 5] == 0).all()  # the background box overlaps no object enough
    assert ((b["targets"] == 0) | (b["targets"] >= 0.5)).all() and (b["targets"].max(1).values == 1.0).all()
    opts.extra["soft_targets"] = False
    hard = RefCOCOTask(opts).train_batch(np.random.default_rng(0))["targets"]
    assert set(hard.unique().tolist()) == {0.0, 1.0}


def test_finetuning_beats_random_region_by_a_wide_margin(refer, tmp_path):
    out = tmp_path / "out"
    assert run(refer, out, "--checkpoint", str(refer["ckpt"]), "--gt-boxes", str(refer["root"] / "gt_features"),
               "--train-steps", "150", "--lr", "1e-3", "--batch-size", "32", "--visualize", "2") == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["splits"]) == {"val", "testA", "testB"}
    assert results["train_loss_last"] < results["train_loss_first"] / 3
    # random region baseline: one of the 5 candidate regions overlaps the referred box by IoU >= 0.5
    random_region = 1 / 5
    for split, m in results["splits"].items():
        assert m["upper_bound"] == 1.0
        assert m["accuracy"] >= random_region + 0.5, (split, m)
    preds = json.loads((out / "predictions_val.json").read_text())
    assert len(preds) == 40
    p = preds[0]
    assert set(p) >= {"sent_id", "ref_id", "image_id", "expression", "pred_box", "gt_box", "iou", "hit"}
    assert np.mean([q["hit"] for q in preds]) == pytest.approx(results["splits"]["val"]["accuracy"])
    assert all(q["hit"] == (q["iou"] >= 0.5) for q in preds)
    pngs = sorted((out / "visualize" / "val").glob("*.png"))
    assert len(pngs) == 2 and pngs[0].stat().st_size > 1000
    # the fine-tuned model reloads from OUT/finetuned and gives the same accuracy without training
    out2 = tmp_path / "again"
    assert run(refer, out2, "--checkpoint", str(out / "finetuned"), "--split", "val") == 0
    again = json.loads((out2 / "results.json").read_text())
    assert again["splits"]["val"]["accuracy"] == results["splits"]["val"]["accuracy"]

    # the same fine-tuning without co-attention (regions never see the expression) stays near chance:
    # it can learn to skip the background box (1/4) but not which object is meant
    blind = tmp_path / "blind"
    assert run(refer, blind, "--checkpoint", str(tiny_checkpoint(tmp_path / "blind_ckpt", with_coattention=False)),
               "--train-steps", "150", "--lr", "1e-3", "--batch-size", "32", "--split", "val", "--no-save") == 0
    assert json.loads((blind / "results.json").read_text())["splits"]["val"]["accuracy"] <= 0.4

    # the untrained model, evaluated the same way, is near the random baseline
    out3 = tmp_path / "untrained"
    assert run(refer, out3, "--checkpoint", str(refer["ckpt"]), "--split", "val", "--split", "testA") == 0
    untrained = json.loads((out3 / "results.json").read_text())["splits"]
    assert all(m["accuracy"] <= 0.5 for m in untrained.values()), untrained


def test_evaluate_on_gt_boxes(refer, tmp_path):
    assert run(refer, tmp_path, "--checkpoint", str(refer["ckpt"]), "--gt-boxes", str(refer["root"] / "gt_features"),
               "--eval-on-gt-boxes", "--split", "val") == 0
    m = json.loads((tmp_path / "results.json").read_text())["splits"]["val"]
    assert m["upper_bound"] == 1.0 and m["count"] == 40


def test_bad_inputs_fail_with_the_file_and_the_reason(refer, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "refs(unc).p").write_bytes((refer["data"] / "refs(unc).p").read_bytes())
    assert run({**refer, "data": bad}, tmp_path / "o", "--checkpoint", str(refer["ckpt"])) == 1
    assert "instances.json: COCO instances not found" in capsys.readouterr().err
    (bad / "instances.json").write_text("{not json")
    assert run({**refer, "data": bad}, tmp_path / "o", "--checkpoint", str(refer["ckpt"])) == 1
    assert "instances.json: not valid JSON" in capsys.readouterr().err
    out = tmp_path / "split"
    assert run(refer, out, "--checkpoint", str(refer["ckpt"]), "--split", "val", "--split", "testC") == 1
    assert "no refs in split(s) ['testC']" in capsys.readouterr().err
    assert not list(out.glob("predictions_*.json"))  # refused before val was evaluated


def test_official_checkpoint_with_task_tokens_and_refer_head(tmp_path):
    from official_state import CFG, official_state

    torch.save(official_state(task_tokens=True), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_dict()))
    root = tmp_path / "d12"  # the official test config reads 12-d features
    d = {"root": root, "data": make_refer(root, n_images=(0, 3, 0, 0), feature_size=12), "vocab": write_vocab(root)}
    assert run(d, tmp_path / "o", "--official-checkpoint", str(tmp_path / "pytorch_model.bin"),
               "--official-config", str(tmp_path / "config.json"), "--split", "val") == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["model"].startswith("official checkpoint") and res["splits"]["val"]["count"] == 12


def test_images_without_features_are_reported_up_front(refer, tmp_path, capsys):
    import shutil

    feats = tmp_path / "features"
    shutil.copytree(refer["root"] / "features", feats)
    first = sorted(feats.glob("*.tar"))[0]
    first.unlink()  # 16 of the 60 training images
    d = {**refer, "root": tmp_path}
    assert run(d, tmp_path / "o", "--checkpoint", str(refer["ckpt"])) == 0  # evaluation only: not needed
    assert run(d, tmp_path / "o", "--checkpoint", str(refer["ckpt"]), "--train-steps", "1") == 1
    err = capsys.readouterr().err
    assert "no features for 16 refer images" in err and str(feats) in err
    assert not (tmp_path / "o" / "finetuned").exists()  # refused before fine-tuning


# refcoco (refs(unc).p) and refcocog (refs(umd).p, val / test, the IoU rule checked by hand):
# test_tasks_refcoco_variants.py
