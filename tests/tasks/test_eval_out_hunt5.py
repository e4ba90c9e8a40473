"""What an OUT already holds, on the fifth hunt's inputs: `--no-save` drops only the weights of its
own run, an OUT of another command or task is refused before any work, an evaluation alone never
replaces a fine-tuned run's results, a model is never fine-tuned from where the run writes, a whole
checkpoint of another command is never set aside as damaged, and region features of two widths in
one folder (or a --gt-boxes store of another width) are one line, never a matmul traceback."""
import json
import shutil

import numpy as np
import pytest

from pipelines.train.checkpoints import list_checkpoints, save_checkpoint
from vilbert import ViLBert

from tasks_data import (
    make_nlvr2,
    make_refer,
    one_line_err,
    run_cli,
    tiny_checkpoint,
    tiny_config,
    write_shards,
    write_vocab,
)


@pytest.fixture(scope="module")
def nlvr2(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr2")
    return {"root": root, "data": make_nlvr2(root, n_pairs=(8, 4, 4)), "vocab": write_vocab(root),
            "ckpt": tiny_checkpoint(root / "ckpt")}


def run(d, out, *extra):
    return run_cli("nlvr2", d, out, "--checkpoint", str(d["ckpt"]), "--split", "dev", "--batch-size", "4", *extra)


def test_no_save_drops_only_the_weights_of_its_own_run(nlvr2, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "step-00000005").mkdir(parents=True)  # not a checkpoint: set aside, never deleted
    (out / "checkpoints" / "step-00000005" / "notes.txt").write_text("mine")
    (out / "checkpoints" / "mine.txt").write_text("precious")
    (out / "best").mkdir()
    (out / "best" / "x.txt").write_text("mine too")
    assert run(nlvr2, out, "--train-steps", "2", "--val-split", "none", "--no-save") == 0
    assert (out / "checkpoints" / "mine.txt").read_text() == "precious"
    assert (out / "checkpoints" / "step-00000005.damaged" / "notes.txt").read_text() == "mine"
    assert (out / "best" / "x.txt").read_text() == "mine too"  # this run validated nothing: its best/ is not its
    assert not list_checkpoints(out / "checkpoints") and not (out / "finetuned").exists()
    clean = tmp_path / "clean"
    assert run(nlvr2, clean, "--train-steps", "2", "--val-split", "dev", "--no-save") == 0
    assert sorted(p.name for p in clean.iterdir()) == ["predictions_dev.json", "results.json"]  # nothing left


def test_an_out_of_another_command_or_task_is_refused_before_any_work(nlvr2, tmp_path, capsys):
    cases = []
    for name, file, content, said in (
            ("mt", "results.json", json.dumps({"config": "mt.yaml", "model": "x", "tasks": {}}),
             "holds a vilbert-multitask run"),
            ("pre", "metrics.csv", "step,loss\n", "holds a vilbert-train run"),
            ("snli", "results.json", json.dumps({"task": "snli-ve", "model": "x", "splits": {}}),
             "holds a snli-ve run"),
            ("foreign", "results.json", "[1, 2]", "not the results of a vilbert-eval run")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(content)
        cases.append((tmp_path / name, said))
    for out, said in cases:
        before = sorted(p.name for p in out.iterdir())
        for extra in ((), ("--train-steps", "2")):
            capsys.readouterr()
            assert run(nlvr2, out, *extra) == 1
            assert said in one_line_err(capsys)
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing removed


def test_an_evaluation_alone_never_replaces_a_fine_tuned_runs_results(nlvr2, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(nlvr2, out, "--train-steps", "2", "--save-every", "1") == 0
    kept = (out / "results.json").read_text()
    capsys.readouterr()
    assert run(nlvr2, out) == 1
    assert "holds a fine-tuned run (finetuned/, checkpoints/, results.json of 2 steps)" in one_line_err(capsys)
    assert (out / "results.json").read_text() == kept
    assert run(nlvr2, out, "--train-steps", "2", "--save-every", "1") == 0  # the same command: evaluated again
    evaluations = tmp_path / "evals"
    assert run(nlvr2, evaluations) == 0 and run(nlvr2, evaluations) == 0  # evaluations replace evaluations
    capsys.readouterr()
    assert run_cli("nlvr2", nlvr2, tmp_path / "o2", "--checkpoint", str(out / "finetuned"), "--split", "dev") == 0


def test_a_model_is_never_fine_tuned_from_where_the_run_writes(nlvr2, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(nlvr2["ckpt"], out / "finetuned")
    capsys.readouterr()
    status = run_cli("nlvr2", nlvr2, out, "--checkpoint", str(out / "finetuned"), "--split", "dev",
                     "--train-steps", "2")
    assert status == 1
    assert f"--checkpoint {out / 'finetuned'}: lies in {out / 'finetuned'}, which this fine-tuning writes over" \
           in one_line_err(capsys)


def test_a_whole_checkpoint_of_another_command_is_left_where_it_is(nlvr2, tmp_path, capsys):
    out = tmp_path / "out"
    model = ViLBert(tiny_config())
    save_checkpoint(out / "checkpoints", 3, model, {"step": 3, "samples": 48, "optimizer": {}}, {}, 2)  # pretraining's
    capsys.readouterr()
    assert run(nlvr2, out, "--train-steps", "2") == 1
    err = one_line_err(capsys)
    assert "step-00000003: a checkpoint of another command's run (trainer_state.pt lacks" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]  # not renamed .damaged


def test_features_of_two_widths_in_one_folder_are_one_line_before_any_work(nlvr2, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(nlvr2["root"] / "features", mixed)
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    write_shards(tmp_path / "wide", {"dev-1-0-img0": (np.ones((1, 48), np.float32), boxes)})  # 48 wide, later
    shutil.copy(tmp_path / "wide" / "feat-000000.tar", mixed / "zz-000000.tar")
    d = {**nlvr2, "root": tmp_path}
    (tmp_path / "features").symlink_to(mixed)
    for extra in ((), ("--train-steps", "2")):
        capsys.readouterr()
        assert run(d, tmp_path / f"out{len(extra)}", *extra) == 1
        err = one_line_err(capsys)
        assert "sample dev-1-0-img0 has features 48 wide, the other samples of" in err and "32" in err, err


def test_a_gt_boxes_store_of_another_width_is_one_line_before_any_work(tmp_path, capsys):
    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    d = {"root": narrow, "data": make_refer(narrow, n_images=(4, 3, 2, 2)), "vocab": write_vocab(narrow)}
    make_refer(wide, n_images=(4, 3, 2, 2), feature_size=48)
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    for extra in (("--eval-on-gt-boxes",), ("--train-steps", "2")):
        capsys.readouterr()
        status = run_cli("refcoco+", d, tmp_path / f"o{len(extra)}", "--checkpoint", str(ckpt), "--split", "val",
                         "--gt-boxes", str(wide / "features"), *extra)
        assert status == 1
        assert f"{wide / 'features'} (--gt-boxes): region features are 48 wide, the model reads 32" \
               in one_line_err(capsys)


def test_a_task_option_the_task_does_not_read_is_a_usage_error(nlvr2, tmp_path, capsys):
    for extra, said in ((("--visualize", "3"), "--visualize is an option of refcoco, refcoco+, refcocog; --task "
                                                "nlvr2 does not read it"),
                        (("--eval-on-gt-boxes",), "--eval-on-gt-boxes is an option of refcoco"),
                        (("--min-answer-count", "1"), "--min-answer-count is an option of vqa")):
        assert run(nlvr2, tmp_path / "out", *extra) == 2  # it was ignored without a word
        assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run(nlvr2, tmp_path / "twice", "--split", "dev") == 0  # a split named twice is evaluated once
    assert capsys.readouterr().out.count("nlvr2 dev:") == 1
