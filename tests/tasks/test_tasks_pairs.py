"""SNLI-VE and NLVR2 end to end on tiny files in their released formats: loading, one-line errors,
fine-tuning on synthetic scenes that need the image and the words, accuracy checked against the
written predictions."""
import json

import numpy as np
import pytest
import torch

from pipelines.tasks.base import TaskOptions
from pipelines.tasks.nlvr2 import NLVR2Task
from pipelines.tasks.snli_ve import SNLIVETask

from tasks_data import make_nlvr2, make_snli_ve, run_cli, tiny_checkpoint, write_vocab


@pytest.fixture(scope="module")
def snli(tmp_path_factory):
    root = tmp_path_factory.mktemp("snli")
    return {"root": root, "data": make_snli_ve(root), "vocab": write_vocab(root), "ckpt": tiny_checkpoint(root / "c")}


@pytest.fixture(scope="module")
def nlvr2(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr2")
    return {"root": root, "data": make_nlvr2(root), "vocab": write_vocab(root), "ckpt": tiny_checkpoint(root / "c")}


def options(d, tmp_path, **kw):
    return TaskOptions(data=d["data"], features=d["root"] / "features", out=tmp_path, tokenizer=d["vocab"], **kw)


def accuracy_from_predictions(path):
    preds = json.loads(path.read_text())
    return sum(p["prediction"] == p["label"] for p in preds) / len(preds), preds


def test_snli_ve_items_labels_and_batches(snli, tmp_path):
    task = SNLIVETask(options(snli, tmp_path, batch_size=6))
    dev = task.load_split("dev")
    assert len(dev) == 120 and dev[0]["images"] == [str(3000000 + 400)] and dev[0]["sentence"].startswith("a ")
    assert [it["label"] for it in dev[:3]] == [2, 0, 1]  # entailment, contradiction, neutral: official indices
    assert task.head() == ("entailment", "pooled_linear", 3) and task.opts.max_seq_length == 56
    b = task.train_batch(np.random.default_rng(0))
    assert b["input_ids"].shape[0] == 6 and b["image_feat"].shape[:2] == (6, 3) and b["labels"].shape == (6,)


def test_snli_ve_gold_dash_is_unlabelled_and_bad_lines_name_the_file(snli, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    rows = [{"Flikr30kID": "3000400.jpg", "sentence2": "a red circle", "gold_label": "-"},
            {"Flikr30kID": "3000400.jpg", "sentence2": "a red circle", "gold_label": "entailment"}]
    (data / "snli_ve_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = SNLIVETask(TaskOptions(data=data, features=snli["root"] / "features", out=tmp_path,
                                  tokenizer=snli["vocab"]))
    assert [it["label"] for it in task.load_split("dev")] == [None, 2]
    (data / "snli_ve_test.jsonl").write_text('{"Flikr30kID": "1.jpg", "gold_label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"snli_ve_test.jsonl:1: no 'sentence2' string"):
        task.load_split("test")
    (data / "snli_ve_test.jsonl").write_text('{"Flikr30kID": "1.jpg", "sentence2": "x", "gold_label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"snli_ve_test.jsonl:1: gold_label 'maybe' is none of"):
        task.load_split("test")
    with pytest.raises(FileNotFoundError, match="snli_ve_train.jsonl: SNLI-VE train split not found"):
        task.load_split("train")


@pytest.mark.slow
def test_snli_ve_fine_tunes_far_above_chance(snli, tmp_path):
    out = tmp_path / "out"  # 2,500 steps: 0.74 / 0.73 measured on dev / test (46 s, one CPU thread)
    assert run_cli("snli-ve", snli, out, "--checkpoint", str(snli["ckpt"]), "--train-steps", "2500",
                   "--lr", "1.5e-3", "--batch-size", "32") == 0
    results = json.loads((out / "results.json").read_text())
    for split in ("dev", "test"):
        m = results["splits"][split]
        acc, preds = accuracy_from_predictions(out / f"predictions_{split}.json")
        assert m["accuracy"] == pytest.approx(acc) and m["count"] == m["scored"] == len(preds) == 120
        assert m["accuracy"] >= 0.6  # chance: 1/3; the hypothesis alone tells nothing
    # the untrained model of the same shape: near chance
    assert run_cli("snli-ve", snli, tmp_path / "control", "--checkpoint", str(snli["ckpt"]), "--split", "dev") == 0
    control = json.loads((tmp_path / "control" / "results.json").read_text())["splits"]["dev"]["accuracy"]
    assert control < results["splits"]["dev"]["accuracy"] - 0.25


def test_nlvr2_items_pair_the_two_images_of_an_identifier(nlvr2, tmp_path):
    task = NLVR2Task(options(nlvr2, tmp_path, batch_size=4))
    dev = task.load_split("dev")
    assert dev[0]["images"] == ["dev-0-0-img0", "dev-0-0-img1"] and dev[0]["id"] == "dev-0-0-0"
    assert {it["label"] for it in dev} <= {0, 1} and task.head() == ("nlvr2", "pair", 2)
    b = task.train_batch(np.random.default_rng(0))
    assert b["input_ids"].shape[0] == 8 and b["image_feat"].shape[0] == 8 and b["labels"].shape == (4,)
    assert torch.equal(b["input_ids"][0], b["input_ids"][1])  # the sentence goes with each image
    (tmp_path / "bad.json").write_text('{"identifier": "x", "sentence": "s", "label": "True"}\n')
    with pytest.raises(ValueError, match=r"bad.json:1: identifier 'x' is not SPLIT-SET-PAIR-SENTENCE"):
        NLVR2Task(TaskOptions(data=tmp_path, features=nlvr2["root"] / "features", out=tmp_path,
                              tokenizer=nlvr2["vocab"])).load_split("bad")


@pytest.mark.slow
def test_nlvr2_fine_tunes_far_above_chance(nlvr2, tmp_path):
    out = tmp_path / "out"  # 1,500 steps: 0.925 on dev and test-P measured (34 s, one CPU thread)
    assert run_cli("nlvr2", nlvr2, out, "--checkpoint", str(nlvr2["ckpt"]), "--train-steps", "1500",
                   "--lr", "1e-3", "--batch-size", "32") == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["splits"]) == {"dev", "test1"}
    for split in ("dev", "test1"):
        acc, preds = accuracy_from_predictions(out / f"predictions_{split}.json")
        assert results["splits"][split]["accuracy"] == pytest.approx(acc) and len(preds) == 40
    majority = max(np.mean([p["label"] == "True" for p in preds]), np.mean([p["label"] == "False" for p in preds]))
    assert results["splits"]["dev"]["accuracy"] >= 0.8 and results["splits"]["dev"]["accuracy"] > majority + 0.2


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    from tasks_data import make_gqa

    root = tmp_path_factory.mktemp("gqa")
    return {"root": root, "data": make_gqa(root), "vocab": write_vocab(root), "ckpt": tiny_checkpoint(root / "c")}


@pytest.mark.slow
def test_gqa_vocabulary_exact_match_and_submission_file(gqa, tmp_path):
    from pipelines.tasks.gqa import GQATask

    task = GQATask(options(gqa, tmp_path, batch_size=4))
    assert set(task.labels) == {"red", "green", "blue", "yellow", "yes", "no"} and task.head()[:2] == ("gqa", "answer")
    assert task.opts.max_seq_length == 26 and task.opts.lr == 4e-5
    narrow = GQATask(options(gqa, tmp_path / "narrow", extra={"num_answers": 2}))
    assert len(narrow.labels) == 2  # the two most frequent answers; the other questions score 0
    out = tmp_path / "out"
    assert run_cli("gqa", gqa, out, "--checkpoint", str(gqa["ckpt"]), "--train-steps", "2000", "--lr", "1e-3",
                   "--batch-size", "32", "--split", "val", "--split", "testdev") == 0
    results = json.loads((out / "results.json").read_text())
    for split in ("val", "testdev"):
        submission = json.loads((out / f"predictions_{split}.json").read_text())
        assert all(set(p) == {"questionId", "prediction"} for p in submission)  # GQA's submission format
        gold = json.loads((gqa["data"] / f"{split}_balanced_questions.json").read_text())
        exact = sum(p["prediction"] == gold[p["questionId"]]["answer"] for p in submission) / len(gold)
        assert results["splits"][split]["accuracy"] == pytest.approx(exact)
    # chance: a quarter of the questions are colour questions answered at random (1/4), half yes/no (1/2)
    assert results["splits"]["testdev"]["accuracy"] >= 0.8  # 0.99 measured (2,000 steps, 37 s)


@pytest.mark.parametrize("task", ["snli-ve", "nlvr2", "gqa"])
def test_a_released_multi_task_checkpoint_evaluates_with_its_own_head(task, tmp_path, caplog):
    """vil_tri_prediction, vil_binary_prediction and vil_prediction_gqa of an official checkpoint (random
    tensors in the official layout, with task tokens) drive the tasks as they are: no fine-tuning, no new head."""
    import logging

    from official_state import CFG, official_state
    from tasks_data import make_gqa

    torch.save(official_state(task_tokens=True), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_dict()))
    root = tmp_path / "d12"  # the official test config reads 12-d features
    make = {"snli-ve": lambda: make_snli_ve(root, n_images=(0, 3, 3), feature_size=12),
            "nlvr2": lambda: make_nlvr2(root, n_pairs=(0, 4, 4), feature_size=12),
            "gqa": lambda: make_gqa(root, n_images=(0, 3, 3), feature_size=12)}
    d = {"root": root, "data": make[task](), "vocab": write_vocab(root)}
    extra = []
    if task == "gqa":  # the official test head has 5 answers
        (tmp_path / "answers.json").write_text(json.dumps(["red", "green", "blue", "yes", "no"]))
        extra = ["--answers", str(tmp_path / "answers.json")]
    with caplog.at_level(logging.INFO, logger="vilbert.eval"):
        assert run_cli(task, d, tmp_path / "o", "--official-checkpoint", str(tmp_path / "pytorch_model.bin"),
                       "--official-config", str(tmp_path / "config.json"), *extra) == 0
    assert "added a new" not in caplog.text
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["model"].startswith("official checkpoint") and res["train_steps"] == 0
    assert all("accuracy" in m for m in res["splits"].values())


def test_a_model_that_does_not_fit_the_tokenizer_or_a_damaged_checkpoint_is_one_line(snli, tmp_path, capsys):
    import shutil

    big = tmp_path / "big"
    big.mkdir()
    words = (snli["vocab"]).read_text().split() + [f"w{i}" for i in range(40000)]  # more than BERT's 30522
    (big / "vocab.txt").write_text("\n".join(words) + "\n")
    assert run_cli("snli-ve", {**snli, "vocab": big / "vocab.txt"}, tmp_path / "o", "--checkpoint",
                   str(snli["ckpt"]), "--split", "dev") == 1
    assert "--tokenizer has 40025 tokens, the model reads" in capsys.readouterr().err
    ckpt = shutil.copytree(snli["ckpt"], tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert run_cli("snli-ve", snli, tmp_path / "o", "--checkpoint", str(ckpt), "--split", "dev") == 1
    assert "model.safetensors: not a readable safetensors file" in capsys.readouterr().err
    # texts longer than the model's positions: cut to them, with a warning, instead of an IndexError
    assert run_cli("snli-ve", snli, tmp_path / "o2", "--checkpoint", str(snli["ckpt"]), "--split", "dev",
                   "--max-seq-length", "5000") == 0


def test_fields_of_the_wrong_kind_are_one_line(tmp_path):
    from pipelines.tasks.retrieval import load_retrieval_split
    from pipelines.tasks.vqa import load_vqa_split

    (tmp_path / "test.jsonl").write_text('{"img_path": "1.jpg", "sentences": "a red circle"}\n')
    with pytest.raises(ValueError, match=r"test.jsonl:1: .*'sentences' must be a list of non-empty strings"):
        load_retrieval_split(tmp_path, "test")  # each character was a caption
    (tmp_path / "val_questions.json").write_text(json.dumps({"questions": [
        {"question_id": 1, "image_id": 1, "question": "how many?"}]}))
    (tmp_path / "val_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "multiple_choice_answer": 5, "answers": [{"answer": "5"}]}]}))
    with pytest.raises(ValueError, match="'multiple_choice_answer' is 5, expected a string"):
        load_vqa_split(tmp_path, "val")
