"""Retrieval: cached pair scoring equals the full forward, Flickr-style and Karpathy-style files,
zero-shot from a pretrained checkpoint, fine-tuning, and an official checkpoint's retrieval head."""
import json

import numpy as np
import pytest
import torch

from pipelines.tasks.base import TaskOptions
from pipelines.tasks.pair_scoring import PairScorer
from pipelines.tasks.retrieval import RetrievalTask, load_retrieval_split
from vilbert import ViLBert, ViLBertConfig

from tasks_data import make_retrieval, run_cli, tiny_checkpoint, tiny_config, write_vocab


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr")
    return {"root": root, "data": make_retrieval(root), "vocab": write_vocab(root),
            "ckpt": tiny_checkpoint(root / "ckpt")}


def run(d, out, *extra):
    return run_cli("retrieval", d, out, "--max-seq-length", "30", *extra)


@pytest.mark.parametrize("overrides", [{}, {"task_specific_tokens": True}, {"arch": "vlbert"}])
def test_cached_pair_scores_equal_the_full_forward(overrides):
    torch.manual_seed(0)
    if overrides.get("arch") == "vlbert":
        cfg = ViLBertConfig.from_dict({**tiny_config().to_dict(), "arch": "vlbert", "hidden_size": 48,
                                       "bi_hidden_size": 48})
    else:
        cfg = tiny_config(**overrides)
    model = ViLBert(cfg, {"retrieval": ("pooled_linear", 1)}).eval()
    C, I, T, R = 5, 3, 7, 6
    text = {"input_ids": torch.randint(5, 25, (C, T)), "token_type_ids": torch.zeros(C, T, dtype=torch.long),
            "attention_mask": torch.ones(C, T, dtype=torch.long)}
    text["attention_mask"][1, 4:] = 0
    images = {"image_feat": torch.randn(I, R, 32), "image_loc": torch.rand(I, R, 5),
              "image_mask": torch.ones(I, R, dtype=torch.long)}
    images["image_mask"][2, 3:] = 0
    tid = (lambda n, device: torch.full((n, 1), 8)) if overrides.get("task_specific_tokens") else None
    for head in ("alignment", "retrieval"):
        scorer = PairScorer(model, head, tid)
        assert scorer.cacheable == (cfg.arch == "vilbert")
        got = scorer.score_matrix(text, images, pair_batch=4)  # (C, I), several partial chunks
        want = torch.empty(C, I)
        with torch.no_grad():
            for c in range(C):
                for i in range(I):
                    out = model.backbone(text["input_ids"][c:c + 1], images["image_feat"][i:i + 1],
                                         images["image_loc"][i:i + 1], text["token_type_ids"][c:c + 1],
                                         text["attention_mask"][c:c + 1], images["image_mask"][i:i + 1],
                                         tid(1, None) if tid else None)
                    want[c, i] = scorer.score_outputs(out, images["image_mask"][i:i + 1])[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_flickr_and_karpathy_files(flickr, tmp_path):
    test = load_retrieval_split(flickr["data"], "test")
    assert len(test) == 8 and test[0][0] == str(1000092795 + 24) and len(test[0][1]) == 3
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        {"filename": "1.jpg", "split": "train", "sentences": [{"raw": "a dog"}]},
        {"filename": "2.jpg", "split": "restval", "sentences": [{"raw": "a cat"}]},
        {"filename": "3.jpg", "split": "test", "sentences": [{"raw": "a cow"}]}]}))
    assert load_retrieval_split(tmp_path, "train") == [("1", ["a dog"]), ("2", ["a cat"])]
    assert load_retrieval_split(tmp_path, "test") == [("3", ["a cow"])]
    # several Karpathy files unpack into one folder: the choice must be explicit
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filename": "COCO_val2014_000000000009.jpg", "split": "test", "sentences": [{"raw": "a bus"}]}]}))
    with pytest.raises(ValueError, match="several Karpathy split files .dataset_coco.json, dataset_flickr30k.json.; "
                                         "choose one with --karpathy-file"):
        load_retrieval_split(tmp_path, "test")
    assert load_retrieval_split(tmp_path, "test", "dataset_coco.json") == [("COCO_val2014_000000000009", ["a bus"])]
    assert load_retrieval_split(tmp_path, "test", "dataset_flickr30k.json") == [("3", ["a cow"])]
    with pytest.raises(FileNotFoundError, match="--karpathy-file dataset_f8k.json: no such file"):
        load_retrieval_split(tmp_path, "test", "dataset_f8k.json")
    (tmp_path / "val.jsonl").write_text('{"img_path": "1.jpg"}\n')
    with pytest.raises(ValueError, match=r"val.jsonl:1: expected"):
        load_retrieval_split(tmp_path, "val")


def test_training_batch_holds_positive_and_three_negatives(flickr, tmp_path):
    opts = TaskOptions(data=flickr["data"], features=flickr["root"] / "features", out=tmp_path,
                       tokenizer=flickr["vocab"], batch_size=3, max_seq_length=30)
    task = RetrievalTask(opts)
    b = task.train_batch(np.random.default_rng(0))
    assert b["input_ids"].shape[0] == 12 and b["image_feat"].shape[:2] == (12, 3)
    ids, feats = b["input_ids"].view(3, 4, -1), b["image_feat"].view(3, 4, 3, -1)
    assert torch.equal(ids[:, 0], ids[:, 2]) and torch.equal(ids[:, 0], ids[:, 3])  # same caption, other images
    assert torch.equal(feats[:, 0], feats[:, 1])  # same image, another image's caption
    assert not torch.equal(feats[:, 0], feats[:, 2]) and not torch.equal(feats[:, 0], feats[:, 3])
    assert task.hard.shape == (24, 20)


def test_zero_shot_then_finetuned(flickr, tmp_path):
    zero = tmp_path / "zero"
    assert run(flickr, zero, "--checkpoint", str(flickr["ckpt"])) == 0
    res = json.loads((zero / "results.json").read_text())
    m = res["splits"]["test"]
    assert m["captions"] == 24 and m["images"] == 8 and m["score_head"] == "alignment"
    for k in ("t2i", "i2t"):
        assert 0 <= m[f"{k}_R@1"] <= m[f"{k}_R@5"] <= m[f"{k}_R@10"] <= 1.0
    assert m["t2i_R@10"] == 1.0  # only 8 images to rank
    preds = json.loads((zero / "predictions_test.json").read_text())
    assert len(preds) == 24 and len(preds[0]["top10"]) == 8
    assert np.mean([p["rank"] < 1 for p in preds]) == pytest.approx(m["t2i_R@1"])

    first4 = tmp_path / "first4"
    assert run(flickr, first4, "--checkpoint", str(flickr["ckpt"]), "--max-images", "4", "--pair-batch", "3") == 0
    m4 = json.loads((first4 / "results.json").read_text())["splits"]["test"]
    assert m4["images"] == 4 and m4["captions"] == 12

    tuned = tmp_path / "tuned"
    assert run(flickr, tuned, "--checkpoint", str(flickr["ckpt"]), "--train-steps", "120", "--lr", "1e-3",
               "--batch-size", "8") == 0  # (at 40 steps the 4-way loss is still ln 4, up or down by noise)
    res = json.loads((tuned / "results.json").read_text())
    assert res["train_loss_last"] < res["train_loss_first"]
    assert (tuned / "finetuned" / "model.safetensors").is_file()


def test_official_checkpoint_uses_its_retrieval_head(flickr, tmp_path):
    from official_state import CFG, official_state

    torch.save(official_state(task_tokens=True), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_dict()))
    root = tmp_path / "d12"  # the official test config reads 12-d features
    d = {"root": root, "data": make_retrieval(root, n_train=2, n_test=4, feature_size=12), "vocab": flickr["vocab"]}
    assert run(d, tmp_path / "o", "--official-checkpoint", str(tmp_path / "pytorch_model.bin"),
               "--official-config", str(tmp_path / "config.json")) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["splits"]["test"]["score_head"] == "retrieval" and res["model"].startswith("official checkpoint")


def test_nan_features_are_an_error_naming_the_pairs_not_hits(tmp_path, capsys):
    import shutil

    from tasks_data import write_shards

    d = {"root": tmp_path, "data": make_retrieval(tmp_path, n_train=2, n_test=4), "vocab": write_vocab(tmp_path),
         "ckpt": tiny_checkpoint(tmp_path / "ckpt")}
    shutil.rmtree(tmp_path / "features")
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 40, 40], [50, 50, 90, 90]], np.float32)
    write_shards(tmp_path / "features", {str(1000092797 + k): (np.full((2, 32), np.nan, np.float32) if k < 2 else
                                                                 rng.normal(size=(2, 32)).astype(np.float32), boxes)
                                         for k in range(4)})
    assert run(d, tmp_path / "out", "--checkpoint", str(d["ckpt"])) == 1
    err = capsys.readouterr().err
    # the feature store refuses the sample before any score is made (metrics.check_finite_scores stays as
    # the second line of defence, for scores that overflow)
    assert "feature values are NaN or infinite" in err and "1000092797" in err
    assert not (tmp_path / "out" / "results.json").exists()
