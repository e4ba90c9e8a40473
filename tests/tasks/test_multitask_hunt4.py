"""vilbert-multitask's config and OUT checks found by the fourth bug hunt: every bad value is one line
naming the file and the field before any training (task options, bounds, duplicate keys, batch
arithmetic, task tokens), a re-run with other task tokens or other weights is refused, what is in the
way in OUT is found up front, split names stay plain names, OUT outside the inputs and locked, and a
user's own OUT/finetuned is never replaced."""
import json
import re
import shutil
from pathlib import Path

import pytest

from common.outputs import out_lock
from pipelines.tasks.multitask import ConfigError, load_config

from tasks_data import exit_status, make_refer, make_vqa, one_line_err, tiny_checkpoint, write_vocab


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt4")
    d = {"root": root, "vocab": write_vocab(root), "vqa": make_vqa(root / "vqa"), "ref": make_refer(root / "ref"),
         "ckpt": tiny_checkpoint(root / "ckpt")}
    return d


def doc(d, iterations=2, **vqa):
    return {"tokenizer": str(d["vocab"]), "train_iterations": iterations, "workers": 0, "save_every": 1,
            "eval_batch_size": 8, "tasks": [{"task": "vqa", "data": str(d["vqa"]),
                                             "features": str(d["root"] / "vqa" / "features"), "batch_size": 4,
                                             "extra": {"min_answer_count": 1}, **vqa}]}


def ref_entry(d, **extra):
    return {"task": "refcoco+", "data": str(d["ref"]), "features": str(d["root"] / "ref" / "features"),
            "batch_size": 4, "extra": extra}


def write(path: Path, document) -> Path:
    path.write_text(json.dumps(document) if path.suffix == ".json" else __import__("yaml").safe_dump(document))
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message[len(str(path)) + 2:]


def run(config, out, *extra, ckpt=None):
    return exit_status(__import__("pipelines.multitask_cli", fromlist=["main"]).main,
                       [str(config), "--out", str(out), "--device", "cpu", *(extra or ["--checkpoint", str(ckpt)])])



def test_each_task_option_is_checked_against_the_task_and_its_type(d, tmp_path):
    cases = [({"answers": 5}, "tasks[0].extra.answers: expected a path, got 5"),
             ({"answers": str(tmp_path / "none.json")}, f"tasks[0].extra.answers: file not found: {tmp_path}"),
             ({"answers": str(tmp_path)}, f"tasks[0].extra.answers: not a file: {tmp_path}"),
             ({"min_answer_count": "many"}, "tasks[0].extra.min_answer_count: expected an integer, got 'many'"),
             ({"num_answers": 0}, "tasks[0].extra.num_answers: expected an integer in [1, "),
             ({"bogus": 3}, "tasks[0].extra.bogus: not an option of vqa (its options are answers, num_answers"),
             ({"gt_features": str(tmp_path)}, "tasks[0].extra.gt_features: not an option of vqa"),
             ({"train_split": "train,../x"}, "tasks[0].extra.train_split: expected plain split names")]
    for k, (extra, message) in enumerate(cases):
        assert refused(write(tmp_path / f"v{k}.yaml", doc(d, extra=extra))).startswith(message)
    ref = [({"gt_features": 5}, "tasks[0].extra.gt_features: expected a path, got 5"),
           ({"visualize": -3}, "tasks[0].extra.visualize: expected an integer in [0, "),
           ({"iou_rule": "bogus"}, "tasks[0].extra.iou_rule: expected one of vilbert-multi-task, vl-bert, refer"),
           ({"eval_on_gt": "yes"}, "tasks[0].extra.eval_on_gt: expected true/false, got 'yes'")]
    for k, (extra, message) in enumerate(ref):
        document = {**doc(d), "tasks": [ref_entry(d, **extra)]}
        assert refused(write(tmp_path / f"r{k}.yaml", document)).startswith(message)
    good = load_config(write(tmp_path / "good.yaml", {**doc(d), "tasks": [ref_entry(d, hard_targets=True,
                                                                                     visualize=2)]}))
    assert good.tasks[0].extra == {"soft_targets": False, "visualize": 2}  # as vilbert-eval --hard-targets
    from pipelines.eval_cli import TASK_OPTIONS
    from pipelines.tasks import TASKS
    from pipelines.tasks.multitask_config import EXTRA_CHECKS, TASK_EXTRA

    assert set(TASK_OPTIONS) <= set(EXTRA_CHECKS) and set(TASK_EXTRA) == set(TASKS)  # vilbert-eval's, mirrored


def test_values_beyond_sane_bounds_and_duplicate_keys_are_refused_up_front(d, tmp_path):
    cases = [({"tasks": [{**doc(d)["tasks"][0], "batch_size": 10 ** 12}]},
              "tasks[0].batch_size: expected an integer in [1, 16777216], got 1000000000000"),
             ({"epochs": 1e308, "train_iterations": 0}, "epochs: expected a number in (0, 1000000]"),
             ({"train_iterations": 10 ** 21}, "train_iterations: expected an integer in [1, 1000000000000]"),
             ({"seed": 10 ** 23}, "seed: expected an integer in [0, 9223372036854775807]"),
             ({"seed": -1}, "seed: expected an integer in [0, 9223372036854775807], got -1"),
             ({"epochs": float("nan")}, "epochs: expected a number in (0, 1000000], got nan"),
             ({"tasks": [{**doc(d)["tasks"][0], "task_token": -1}]}, "tasks[0].task_token: expected an integer in")]
    for k, (change, message) in enumerate(cases):
        assert refused(write(tmp_path / f"b{k}.yaml", {**doc(d), **change})).startswith(message)
    path = tmp_path / "twice.json"
    path.write_text('{"tasks": [{"task": "vqa", "data": "x", "features": "y"}], "tasks": []}')
    assert refused(path) == "tasks: given twice in one mapping"
    path = tmp_path / "twice.yaml"
    path.write_text(f"tokenizer: {d['vocab']}\nseed: 1\nseed: 2\ntasks: []\n")
    assert refused(path).startswith("seed: given twice in one mapping (line 3)")


def test_split_names_that_are_not_plain_names_are_refused(d, tmp_path):
    for k, (change, field) in enumerate([({"splits": ["../../../../esc"]}, "splits"),
                                         ({"splits": ["val", "a/b"]}, "splits"),
                                         ({"val_split": ".hidden"}, "val_split"),
                                         ({"val_split": "../x"}, "val_split")]):
        message = refused(write(tmp_path / f"s{k}.yaml", doc(d, **change)))
        assert message.startswith(f"tasks[0].{field}: ") and "is not a plain split name" in message
    from pipelines.tasks.multitask import val_split_of

    assert val_split_of(load_config(write(tmp_path / "none.yaml", doc(d, val_split="none"))).tasks[0]) == ""


def test_the_batch_arithmetic_is_one_line_in_the_configs_words(tmp_path, d, capsys):
    config = write(tmp_path / "micro.yaml", doc(d, batch_size=2, micro_batch_size=4))
    assert run(config, tmp_path / "o", ckpt=d["ckpt"]) == 1
    err = one_line_err(capsys)
    assert f"{config}: tasks[0].batch_size / micro_batch_size: batch_size 2" in err and "--" not in err, err
    assert not (tmp_path / "o" / "checkpoints").exists()
    from pipelines.tasks.multitask_config import check_batch

    with pytest.raises(ConfigError, match=r"^cfg.yaml: tasks\[1\].batch_size / micro_batch_size: batch_size 2 is "
                                          "smaller than micro_batch_size 4 x 1 process"):
        check_batch(Path("cfg.yaml"), 1, 2, 4, 1)
    with pytest.raises(ConfigError, match=r"batch_size 3 does not divide among 4 processes: give a multiple "
                                          r"of 4 \(4\), or a micro_batch_size$"):
        check_batch(Path("cfg.yaml"), 0, 3, None, 4)
    with pytest.raises(ConfigError, match=r"^cfg.yaml: tasks\[0\].batch_size / micro_batch_size: batch_size 5 is not a "
                                          r"multiple of micro_batch_size 2 x 1 process\(es\) = 2: give batch_size 4 or "
                                          "6, or a micro_batch_size that divides it$"):
        check_batch(Path("cfg.yaml"), 0, 5, 2, 1)  # it was a warning, and each step took 4 items
    check_batch(Path("cfg.yaml"), 0, 8, 2, 2)


def test_a_task_token_beyond_the_models_is_refused_before_training(d, tmp_path, capsys):
    config = write(tmp_path / "tok.yaml", doc(d, task_token=1000))
    assert run(config, tmp_path / "o", ckpt=d["ckpt"]) == 1
    err = one_line_err(capsys)
    assert f"{config}: tasks[0].task_token: 1000 is not one of the model's 20 task tokens (0..19" in err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_re_run_with_another_task_token_or_other_weights_is_refused(d, tmp_path, capsys):
    config, out = write(tmp_path / "base.yaml", doc(d)), tmp_path / "out"
    assert run(config, out, ckpt=d["ckpt"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "finetuned" / "config.json").read_text())["metadata"]
    assert set(meta["task_settings"]) == {"vqa"}
    step = sorted((out / "checkpoints").iterdir())[-1]
    assert set(json.loads((step / "config.json").read_text())["metadata"]["task_settings"]) == {"vqa"}
    assert run(config, out, ckpt=d["ckpt"]) == 0  # the same command: resumed (at its end), finetuned replaced
    capsys.readouterr()
    copy = shutil.copytree(d["ckpt"], tmp_path / "other")  # the same weights elsewhere: another --checkpoint
    preset = tmp_path / "preset.json"  # the checkpoint's config, randomly initialised
    preset.write_text(json.dumps(json.loads((d["ckpt"] / "config.json").read_text())["config"]))
    for k, (cfg, args) in enumerate([(write(tmp_path / "tok.yaml", doc(d, task_token=3)), ["--checkpoint", str(
            d["ckpt"])]), (config, ["--checkpoint", str(copy)]), (config, ["--preset", str(preset)])]):
        assert run(cfg, out, *args) == 1
        err = one_line_err(capsys)
        assert "with other settings than this run's" in err, (k, err)
        assert ("task_tokens" if k == 0 else "model") in err, (k, err)


def test_what_is_in_the_way_in_out_is_found_before_training(d, tmp_path, capsys):
    write(tmp_path / "two.yaml", {**doc(d), "tasks": [doc(d, splits=["val"])["tasks"][0], ref_entry(d)]})
    out = tmp_path / "cli"
    out.mkdir()
    (out / "checkpoints").write_text("mine")
    assert run(tmp_path / "two.yaml", out, ckpt=d["ckpt"]) == 1
    assert f"{out / 'checkpoints'}: exists and is not a folder" in one_line_err(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # nothing written, vqa/answers.json neither
    from pipelines.multitask_cli import _made_by_us
    from pipelines.tasks.multitask import val_split_of
    from pipelines.tasks.multitask_config import check_out_paths

    config = load_config(tmp_path / "two.yaml")
    vals = [val_split_of(e) for e in config.tasks]
    for k, (name, kind) in enumerate([("vqa", "file"), ("checkpoints", "file"), ("finetuned", "file"),
                                      ("results.json", "folder"), ("vqa/predictions_val.json", "folder"),
                                      ("refcoco+/metrics.json", "folder"), ("vqa/answers.json", "folder")]):
        out = tmp_path / f"o{k}"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).mkdir() if kind == "folder" else (out / name).write_text("mine")
        with pytest.raises(ValueError, match=f"^{re.escape(str(out / name))}: exists and is not a "):
            check_out_paths(out, config, vals, _made_by_us)
    check_out_paths(tmp_path / "fresh", config, vals, _made_by_us)


def test_a_users_own_finetuned_folder_is_never_replaced(d, tmp_path, capsys):
    config = write(tmp_path / "c.yaml", doc(d))
    out = tmp_path / "o"
    (out / "finetuned").mkdir(parents=True)
    (out / "finetuned" / "notes.txt").write_text("mine")
    assert run(config, out, ckpt=d["ckpt"]) == 1
    assert "finetuned: exists and was not written by vilbert-multitask" in one_line_err(capsys)
    assert (out / "finetuned" / "notes.txt").read_text() == "mine" and not (out / "checkpoints").exists()
    from pipelines.multitask_cli import _made_by_us

    assert not _made_by_us(d["ckpt"])  # a model folder of another command's


def test_out_inside_an_input_or_in_use_is_refused(d, tmp_path, capsys):
    data = shutil.copytree(d["vqa"], tmp_path / "vqa")
    config = write(tmp_path / "c.yaml", doc(d, data=str(data)))
    for out in (data, data / "sub"):
        assert run(config, out, ckpt=d["ckpt"]) == 1
        err = one_line_err(capsys)
        assert f"{config}: " in err and "tasks[0].data" in err, err
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in d["vqa"].iterdir())
    out = tmp_path / "busy"
    with out_lock(out, "another vilbert-multitask"):
        assert run(config, out, ckpt=d["ckpt"]) == 1
        assert "another vilbert-multitask" in one_line_err(capsys)
        assert not (out / "checkpoints").exists()


def test_a_validation_split_without_labels_is_refused_before_training(d, tmp_path, capsys):
    data = shutil.copytree(d["vqa"], tmp_path / "vqa")  # test: val's questions without their answers
    questions = data / "v2_OpenEnded_mscoco_val2014_questions.json"
    shutil.copy(questions, data / "v2_OpenEnded_mscoco_test2014_questions.json")
    config = write(tmp_path / "c.yaml", doc(d, data=str(data), val_split="test"))
    assert run(config, tmp_path / "o", ckpt=d["ckpt"]) == 1
    assert f"{config}: tasks[0] (vqa): val_split test: the split has no labels" in one_line_err(capsys)
    assert not (tmp_path / "o" / "checkpoints").exists()
