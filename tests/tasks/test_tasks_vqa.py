"""VQA v2 end to end on tiny files in the official JSON format ("what colour is the circle")."""
import json
import pickle

import numpy as np
import pytest
import torch

from pipelines.tasks.base import TaskOptions
from pipelines.tasks.vqa import VQATask, build_answer_vocab, load_answer_list, load_vqa_split
from pipelines.tasks.vqa_eval import vqa_accuracy

from tasks_data import make_vqa, run_cli, tiny_checkpoint, write_vocab


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    return {"root": root, "data": make_vqa(root), "vocab": write_vocab(root), "ckpt": tiny_checkpoint(root / "ckpt")}


def run(d, out, *extra):
    return run_cli("vqa", d, out, *extra)


def test_answer_vocabulary_and_soft_targets(vqa, tmp_path):
    train = load_vqa_split(vqa["data"], "train")
    assert len(train) == 80 and len(train[0]["answers"]) == 10
    vocab = build_answer_vocab(train, 3129)
    assert sorted(vocab) == ["blue", "green", "red", "yellow"]
    assert len(build_answer_vocab(train, 2)) == 2
    task = VQATask(TaskOptions(data=vqa["data"], features=vqa["root"] / "features", out=tmp_path,
                               tokenizer=vqa["vocab"], batch_size=6))
    assert task.head() == ("vqa", "answer", 4)
    assert json.loads((tmp_path / "answers.json").read_text()) == task.answers
    b = task.train_batch(np.random.default_rng(0))
    # the released soft scores: 8 x the right colour -> 1.0, 2 x the next colour -> 0.6 (not 2/3)
    assert (b["targets"].max(1).values == 1.0).all()
    assert torch.allclose(b["targets"].sort(1, descending=True).values[:, 1], torch.full((6,), 0.6))
    assert b["image_feat"].shape == (6, 4, 32) and (b["image_loc"][:, 0] == torch.tensor([0., 0, 1, 1, 1])).all()
    assert task.opts.max_seq_length == 23 and task.opts.lr == 4e-5  # official per-task defaults
    both = VQATask(TaskOptions(data=vqa["data"], features=vqa["root"] / "features", out=tmp_path,
                               tokenizer=vqa["vocab"], extra={"train_split": "train,val"}))
    assert len(both.load_train()) == 80 + 24


def test_built_vocabulary_is_the_released_one():
    """Normalised multiple-choice answers given by >= 9 questions (the released rule), most frequent first."""
    def items(mc, n):
        return [{"mc_answer": mc, "answers": [mc] * 10} for _ in range(n)]

    train = items("Two", 9) + items("2", 5) + items("Red.", 9) + items("blue", 8) + items("the cat", 10)
    assert build_answer_vocab(train, 3129) == ["2", "cat", "red"]  # 14, 10, 9 questions; blue has 8
    assert build_answer_vocab(train, 3129, min_count=8) == ["2", "cat", "red", "blue"]
    assert build_answer_vocab(train, 1) == ["2"]


def test_malformed_vqa_records_name_the_file_and_field(vqa, tmp_path):
    import shutil

    data = tmp_path / "bad"
    shutil.copytree(vqa["data"], data)
    path = data / "v2_mscoco_val2014_annotations.json"
    doc = json.loads(path.read_text())
    doc["annotations"][3]["answers"] = ["red"] * 10  # strings instead of {"answer": ...}
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"annotations.json: record #3 \(question \d+\): each of 'answers' must be"):
        load_vqa_split(data, "val")
    del doc["annotations"][3]["answers"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="annotations.json: record #3 has no 'answers'"):
        load_vqa_split(data, "val")
    qpath = data / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions = json.loads(qpath.read_text())
    questions["questions"][0]["question_id"] = "1"
    qpath.write_text(json.dumps(questions))
    with pytest.raises(ValueError, match="questions.json: record #0: 'question_id' is '1', expected int"):
        load_vqa_split(data, "val")


def test_answer_list_files(tmp_path):
    (tmp_path / "a.json").write_text('["yes", "no", "2"]')
    (tmp_path / "a.txt").write_text("yes\nno\n")
    (tmp_path / "label2ans.pkl").write_bytes(pickle.dumps(["yes", "no"], protocol=2))
    assert load_answer_list(tmp_path / "a.json") == ["yes", "no", "2"]
    assert load_answer_list(tmp_path / "a.txt") == ["yes", "no"]
    assert load_answer_list(tmp_path / "label2ans.pkl") == ["yes", "no"]
    (tmp_path / "bad.json").write_text('{"yes": 0}')
    with pytest.raises(ValueError, match="bad.json: expected a non-empty list"):
        load_answer_list(tmp_path / "bad.json")


def test_finetune_and_standard_accuracy(vqa, tmp_path):
    out = tmp_path / "out"
    assert run(vqa, out, "--checkpoint", str(vqa["ckpt"]), "--train-steps", "60", "--lr", "1e-3",
               "--batch-size", "16") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["train_loss_last"] < res["train_loss_first"]
    m = res["splits"]["val"]
    assert m["questions"] == 24 and m["scored"] == 24 and m["accuracy_other"] == m["accuracy"]
    # the reported accuracy is the standard VQA accuracy of the written predictions
    preds = {p["question_id"]: p["answer"] for p in json.loads((out / "predictions_val.json").read_text())}
    val = load_vqa_split(vqa["data"], "val")
    assert m["accuracy"] == pytest.approx(np.mean([vqa_accuracy(preds[q["question_id"]], q["answers"]) for q in val]))
    # an answer file fixes the head size; a questions-only split is answered but not scored
    (tmp_path / "answers.json").write_text(json.dumps(["red", "green", "blue", "yellow", "circle"]))
    import shutil

    data = shutil.copytree(vqa["data"], tmp_path / "data")  # the shared folder keeps no test-dev split
    qs = data / "v2_OpenEnded_mscoco_val2014_questions.json"
    (data / "test_questions.json").write_text(qs.read_text())
    (data / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(qs.read_text())
    out2 = tmp_path / "out2"
    assert run({**vqa, "data": data}, out2, "--checkpoint", str(vqa["ckpt"]),
               "--answers", str(tmp_path / "answers.json"), "--split", "test", "--split", "test-dev") == 0
    splits = json.loads((out2 / "results.json").read_text())["splits"]
    assert splits == {"test": {"questions": 24}, "test-dev": {"questions": 24}}
    submission = json.loads((out2 / "predictions_test-dev.json").read_text())  # the EvalAI file
    assert len(submission) == 24 and all(set(p) == {"question_id", "answer"} for p in submission)
    assert all(isinstance(p["question_id"], int) and isinstance(p["answer"], str) for p in submission)


def test_head_size_mismatch_is_an_error(vqa, tmp_path, capsys):
    from official_state import CFG, official_state

    torch.save(official_state(answers=11), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_dict()))
    root = tmp_path / "d12"  # the official test config reads 12-d features
    d12 = {"root": root, "data": make_vqa(root, feature_size=12), "vocab": write_vocab(root)}
    assert run(d12, tmp_path / "o", "--official-checkpoint", str(tmp_path / "pytorch_model.bin"),
               "--official-config", str(tmp_path / "config.json")) == 1
    assert "'vqa' head has 11 outputs, the vqa data needs 4" in capsys.readouterr().err
    # on the 32-d features of the other data the width is what is wrong, said before anything runs
    assert run(vqa, tmp_path / "o", "--official-checkpoint", str(tmp_path / "pytorch_model.bin"),
               "--official-config", str(tmp_path / "config.json")) == 1
    assert "region features are 32 wide, the model reads 12" in capsys.readouterr().err


def test_a_missing_evaluation_split_is_found_before_fine_tuning(vqa, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(vqa, out, "--checkpoint", str(vqa["ckpt"]), "--train-steps", "2", "--split", "val",
               "--split", "test-dev") == 1
    assert "no questions file for split 'test-dev'" in capsys.readouterr().err
    assert not (out / "finetuned").exists() and not list(out.glob("predictions_*.json"))
