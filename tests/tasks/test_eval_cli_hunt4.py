"""vilbert-eval's refusals found by the fourth bug hunt: a resume of another answer list, task token
or model; an unlabelled validation split; VL-BERT's text length; split names that are paths; an OUT
inside the dataset; two runs in one OUT; a seed out of range; options the model cannot honour."""
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.outputs import check_out_outside, out_lock
from pipelines.eval_checks import check_fit
from pipelines.train.checkpoints import list_checkpoints
from vilbert import ViLBert, load_preset, load_pretrained, save_pretrained

from tasks_data import make_retrieval, make_vqa, one_line_err, run_cli, tiny_checkpoint, vocab_size, write_vocab

STEPS = ("--train-steps", "2", "--batch-size", "16", "--min-answer-count", "1", "--val-split", "none")


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_hunt4")
    d = {"root": root, "data": make_vqa(root), "vocab": write_vocab(root), "ckpt": tiny_checkpoint(root / "ckpt"),
         "tokens": tiny_checkpoint(root / "tokens", task_specific_tokens=True),
         "other": tiny_checkpoint(root / "other", seed=1)}
    questions = json.loads((d["data"] / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    (d["data"] / "test-dev_questions.json").write_text(json.dumps(questions))  # no annotations: no labels
    return d



def test_a_resume_with_other_answers_task_token_or_model_is_refused(vqa, tmp_path, capsys):
    out = tmp_path / "out"
    answers = sorted(json.loads(run_cli_answers(vqa, tmp_path)))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(answers))
    b.write_text(json.dumps(answers[::-1]))  # the same size, another order: another head
    common = ("--checkpoint", str(vqa["tokens"]), *STEPS, "--val-split", "val")
    assert run_cli("vqa", vqa, out, *common, "--answers", str(a)) == 0
    capsys.readouterr()
    assert run_cli("vqa", vqa, out, *common, "--answers", str(b)) == 1  # OUT/answers.json is the first to say so
    assert "answers.json: the run in this --out (finetuned/) was fine-tuned with another answer" in one_line_err(capsys)
    (out / "answers.json").unlink()  # without it, the resume check still refuses the other head
    assert run_cli("vqa", vqa, out, *common, "--answers", str(b)) == 1
    assert "fine-tuned with other settings than this run's (task answers: " in one_line_err(capsys)
    (out / "answers.json").write_text(json.dumps(answers))
    assert run_cli("vqa", vqa, out, *common, "--answers", str(a), "--task-token", "3") == 1
    assert "task_token: 1 then, 3 now" in one_line_err(capsys)
    assert run_cli("vqa", vqa, out, *common[2:], "--checkpoint", str(vqa["other"]), "--answers", str(a)) == 1
    err = one_line_err(capsys)
    assert f"model: 'checkpoint {vqa['tokens'].resolve()}' then" in err and str(vqa["other"].resolve()) in err
    # every model folder the run saved records the task's settings, for a later evaluation to check
    recorded = {"vqa": json.loads(json.dumps(task_settings(vqa, a)))}
    for folder in (out / "finetuned", out / "best", *list_checkpoints(out / "checkpoints")):
        assert load_pretrained(folder).checkpoint_metadata["task_settings"] == recorded, folder
    assert run_cli("vqa", vqa, out, *common, "--answers", str(a)) == 0  # the same again


def run_cli_answers(vqa, tmp_path) -> str:
    assert run_cli("vqa", vqa, tmp_path / "vocab", "--checkpoint", str(vqa["ckpt"]), "--min-answer-count", "1",
                   "--split", "val") == 0
    return (tmp_path / "vocab" / "answers.json").read_text()


def task_settings(vqa, answers: Path) -> dict:
    from pipelines.tasks.base import TaskOptions
    from pipelines.tasks.vqa import VQATask

    opts = TaskOptions(data=vqa["data"], features=vqa["root"] / "features", out=answers.parent / "t",
                       tokenizer=vqa["vocab"], extra={"answers": str(answers)})
    return VQATask(opts).settings()


def test_an_unlabelled_validation_split_is_refused_before_fine_tuning(vqa, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("vqa", vqa, out, "--checkpoint", str(vqa["ckpt"]), "--epochs", "1", "--batch-size", "16",
                   "--min-answer-count", "1", "--val-split", "test-dev", "--split", "val") == 1
    err = one_line_err(capsys)
    assert "--val-split test-dev" in err and "has no labels" in err and "--val-split none" in err
    assert not (out / "checkpoints").exists()


def test_vlbert_texts_are_cut_to_its_positions_less_two(vqa, tmp_path, capsys, caplog):
    config = SimpleNamespace(vocab_size=100, max_position_embeddings=32, arch="vlbert")
    opts = SimpleNamespace(max_seq_length=100)
    check_fit(config, 50, opts, "m")
    assert opts.max_seq_length == 30
    opts.max_seq_length, config.arch = 100, "vilbert"
    check_fit(config, 50, opts, "m")
    assert opts.max_seq_length == 32
    # long questions through the whole command: texts of 30 tokens, + [IMG]/END = the 32 positions
    root = tmp_path / "long"
    data = make_vqa(root, n_train=8, n_val=4)
    for name in data.glob("*questions.json"):
        qs = json.loads(name.read_text())
        for q in qs["questions"]:
            q["question"] = " ".join([q["question"].rstrip("?")] * 8) + "?"
        name.write_text(json.dumps(qs))
    d = {"root": root, "data": data, "vocab": write_vocab(root)}
    config = load_preset("vlbert-tiny", vocab_size=vocab_size(), v_feature_size=32, v_target_size=5,
                         max_position_embeddings=32)  # as tests/tasks/test_tasks_vlbert.py's, 32 positions
    ckpt = save_pretrained(ViLBert(config), tmp_path / "vl", {"note": "tiny VL-BERT, 32 positions"})
    with caplog.at_level(logging.WARNING, logger="vilbert.eval"):
        assert run_cli("vqa", d, tmp_path / "out", "--checkpoint", str(ckpt), "--train-steps", "1", "--batch-size",
                       "4", "--min-answer-count", "1", "--max-seq-length", "64", "--split", "val") == 0, \
            capsys.readouterr().err
    assert "texts are cut to 30 tokens" in caplog.text


@pytest.mark.parametrize("split", ["../../x", "a/b", ".hidden", "..", "a\\b", "x\0y"])
def test_split_names_that_are_not_plain_names_are_refused(vqa, tmp_path, capsys, split):
    out = tmp_path / "deep" / "out"
    for option in ("--split", "--val-split"):
        assert run_cli("vqa", vqa, out, "--checkpoint", str(vqa["ckpt"]), option, split) == 2
        err = capsys.readouterr().err
        assert "is not a plain split name" in err and option in err
    assert not (tmp_path / "deep").exists() and not list(tmp_path.rglob("predictions_*"))


def test_an_out_inside_an_input_folder_is_refused(vqa, tmp_path, capsys):
    for out, option in ((vqa["data"] / "results", "--data"), (vqa["root"] / "features", "--features"),
                        (vqa["data"], "--data")):
        assert run_cli("vqa", vqa, out, "--checkpoint", str(vqa["ckpt"]), "--split", "val") == 2
        err = capsys.readouterr().err
        assert f"--out {out} lies inside {option} " in err and "write results elsewhere" in err
    assert not (vqa["data"] / "results").exists() and not list(vqa["root"].rglob("predictions_*"))
    check_out_outside(tmp_path / "elsewhere", {"--data": vqa["data"], "--gt-boxes": None})
    with pytest.raises(ValueError, match="lies inside --gt-boxes"):
        check_out_outside(tmp_path / "g" / "o", {"--gt-boxes": tmp_path / "g"})


def test_a_second_run_in_the_same_out_is_refused_naming_the_holder(vqa, tmp_path, capsys):
    out = tmp_path / "out"
    with out_lock(out, "vilbert-eval"):
        assert run_cli("vqa", vqa, out, "--checkpoint", str(vqa["ckpt"]), *STEPS) == 1
        err = one_line_err(capsys)
        assert f"vilbert-eval (pid {os.getpid()} on " in err and "is running in this folder" in err
        assert not (out / "checkpoints").exists() and not (out / "answers.json").exists()
        with pytest.raises(ValueError, match="is running in this folder"):
            with out_lock(out, "vilbert-multitask"):
                pass
    assert not out.exists()  # the lock made it, and took it back
    out.mkdir()
    (out / ".run.lock").write_text("vilbert-eval (pid 1 on gone, since then)\n")  # left by a kill -9: no holder
    assert run_cli("vqa", vqa, out, "--checkpoint", str(vqa["ckpt"]), *STEPS, "--split", "val") == 0
    assert not (out / ".run.lock").exists() and (out / "results.json").exists()


def test_a_seed_out_of_range_is_a_usage_error(vqa, tmp_path, capsys):
    for seed in (str(10**23), "-1"):
        assert run_cli("vqa", vqa, tmp_path / "out", "--checkpoint", str(vqa["ckpt"]), "--seed", seed) == 2
        err = capsys.readouterr().err
        assert "'--seed'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_options_the_model_cannot_honour_are_warned_or_refused(vqa, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="vilbert.eval"):
        assert run_cli("vqa", vqa, tmp_path / "out", "--checkpoint", str(vqa["ckpt"]), "--min-answer-count", "1",
                       "--split", "val", "--task-token", "3") == 0
    assert caplog.text.count("--task-token 3 is ignored: the model has no task tokens") == 1
    assert run_cli("vqa", vqa, tmp_path / "t", "--checkpoint", str(vqa["tokens"]), "--min-answer-count", "1",
                   "--split", "val", "--task-token", "20") == 1
    assert "--task-token 20: the model has task tokens 0 to 19" in one_line_err(capsys)
    root = tmp_path / "retrieval"
    d = {"root": root, "data": make_retrieval(root), "vocab": write_vocab(root)}
    assert run_cli("retrieval", d, tmp_path / "r", "--checkpoint", str(vqa["ckpt"]), "--score-head", "retrieval") == 1
    err = one_line_err(capsys)
    assert "--score-head retrieval: the model has no 'retrieval' head" in err
    assert not (tmp_path / "r").exists()
