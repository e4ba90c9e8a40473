"""12-in-1 multi-task fine-tuning (`vilbert-multitask`, vilbert-multi-task's train_tasks.py): the
schedule checked by hand on stub tasks (which task trains in which iteration, the epoch of the
largest task, the loss scales, the learning rate of each step, a plateaued task trained every 4th
iteration), then VQA + refcoco+ on the synthetic files: both tasks learn, the final model holds both
heads and `vilbert-eval` evaluates it, a killed run resumes exactly, a bad config is one line."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipelines.multitask_cli import main
from pipelines.tasks.base import Task, TaskOptions
from pipelines.tasks.multitask import (
    MultiTaskConfig,
    Plateau,
    TaskEntry,
    iterations_per_epoch,
    load_config,
    loss_scales,
    runs_at,
    validates_after,
)
from pipelines.tasks.multitask_train import MultiTaskTrainer
from pipelines.train.optim import warmup_linear
from vilbert import load_pretrained

from tasks_data import exit_status, make_refer, make_vqa, run_cli, tiny_checkpoint, write_vocab

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def test_the_schedule_rules_by_hand():
    assert loss_scales([4e-5, 2e-5, 2e-5]) == [2.0, 1.0, 1.0]  # VQA at 4e-5 beside refcoco+ at 2e-5
    assert iterations_per_epoch([3, 5, 2]) == 5
    assert [i for i in range(13) if runs_at(i, True, 4)] == [0, 4, 8, 12]
    assert all(runs_at(i, False, 4) for i in range(13))
    assert [d for d in range(1, 21) if validates_after(d, 3, 20)] == [3, 6, 9, 12, 15, 18, 20]
    p = Plateau()  # patience 1, threshold 0.001, continue_threshold 0.005, cooldown 1
    assert [p.step(v) for v in (0.5, 0.6, 0.6005, 0.6)] == [False, False, False, True]  # 2 misses in a row
    # paused: the cooldown forgives the next miss; a second miss in a row pauses it again (before the drop
    # is looked at), a score > 0.5% below the best (0.597) trains it again; after that cooldown, 2 misses pause
    assert [p.step(v) for v in (0.598, 0.5985, 0.5969, 0.5969)] == [True, True, True, False]
    assert [p.step(0.5969) for _ in range(3)] == [False, False, True]
    p.reset()
    assert p.state() == {"best": None, "misses": 0, "cooling": 0, "paused": False}


class StubTask(Task):
    """Items 0..n-1; its loss is w (the model's one weight) times 1, so each step's gradient is the
    task's loss scale; its validations give the scores in `scores`, in turn."""

    def __init__(self, opts, name, n, scores):
        super().__init__(opts)
        self.name, self.n, self.scores = name, n, list(scores)

    def train_items(self):
        return list(range(self.n))

    def collate(self, items, rng):
        return {"items": torch.tensor(items)}

    def loss(self, model, batch):
        return model.w.sum()

    def evaluate(self, model, split):
        return {"accuracy": self.scores.pop(0)}, []


def stub_trainer(tmp_path, monkeypatch, total, scores_a, scores_b):
    def task(name, n, lr, scores):
        opts = TaskOptions(data=tmp_path, features=tmp_path, out=tmp_path / name, batch_size=2, epochs=1.0, lr=lr,
                           val_split="val", workers=0)
        return StubTask(opts, name, n, scores)

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(1))
    a, b = task("a", 6, 4e-5, scores_a), task("b", 10, 2e-5, scores_b)  # 3 and 5 batches of 2 an epoch
    config = MultiTaskConfig(tasks=[], train_iterations=total, weight_decay=0.0, plateau_reset_after_epochs=[],
                             workers=0)
    trainer = MultiTaskTrainer(model, [a, b], config, tmp_path, torch.device("cpu"))
    monkeypatch.setattr(trainer, "save", lambda: None)
    steps, real_step = [], trainer.task_step

    def task_step(t, batches):
        steps.append((trainer.iteration, "ab"[t]))
        return real_step(t, batches)

    def before_optimizer_step(optimizer, args, kwargs):
        steps[-1] += (model.w.grad.item(), optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(trainer, "task_step", task_step)
    trainer.optimizer.register_step_pre_hook(before_optimizer_step)
    return trainer, steps


def test_an_iteration_steps_each_task_and_a_plateaued_one_every_4th(tmp_path, monkeypatch):
    # a: validated after iterations 3 6 9 12 15 18 20; its third score is its second miss: paused after 9,
    # trained again once a score falls > 0.5% below the best (after 15). b: after 5 10 15 20, improving.
    trainer, steps = stub_trainer(tmp_path, monkeypatch, 20, [0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4],
                                  [0.1, 0.2, 0.3, 0.4])
    result = trainer.run()
    a_runs = [i for i, name, *_ in steps if name == "a"]
    assert a_runs == [*range(9), 12, *range(15, 20)]  # paused: only iteration 12 (0-based) of 9..14
    assert [i for i, name, *_ in steps if name == "b"] == list(range(20))
    assert [name for i, name, *_ in steps if i == 3] == ["a", "b"]  # in the config's order
    assert (trainer.per_epoch, trainer.total, trainer.scales, trainer.base_lr) == (5, 20, [2.0, 1.0], 2e-5)
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {2e-5}  # one AdamW at the smallest lr
    assert all(grad == {"a": 2.0, "b": 1.0}[name] for _, name, grad, _ in steps)  # each loss x its lr / 2e-5
    factor = warmup_linear(20, 0.1)  # the schedule steps once an iteration, after its first optimizer step
    for i, name, _, lr in steps:
        first = name == "a" or i not in a_runs
        assert lr == pytest.approx(2e-5 * factor(i if first else i + 1))
    assert trainer.scheduler.last_epoch == 20
    history = result["tasks"]["a"]["history"]
    assert [(h["iteration"], h["paused"]) for h in history] == [(3, False), (6, False), (9, True), (12, True),
                                                                (15, False), (18, False), (20, False)]
    assert [h["batches"] for h in history] == [3, 6, 9, 9, 10, 13, 15]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6, 6.6667]  # iterations / its 3 batches an epoch
    assert [h["iteration"] for h in result["tasks"]["b"]["history"]] == [5, 10, 15, 20]
    assert (result["tasks"]["a"]["batches"], result["tasks"]["b"]["passes"]) == (15, 4)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["history"] == history


def test_the_plateau_controllers_start_over_after_the_reset_epochs(tmp_path, monkeypatch):
    trainer, steps = stub_trainer(tmp_path, monkeypatch, 15, [0.5] * 5, [0.1, 0.2, 0.3])
    trainer.config.plateau_reset_after_epochs = [2]  # after iteration 10
    trainer.run()
    assert [i for i, name, *_ in steps if name == "a"] == [*range(9), *range(10, 15)]  # paused after 9


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    vocab = write_vocab(root)
    d = {"root": root, "vocab": vocab, "vqa": make_vqa(root / "vqa"), "ref": make_refer(root / "ref"),
         "ckpt": tiny_checkpoint(root / "ckpt")}
    d["config"] = write_config(root / "mt.yaml", d, 120)
    return d


def write_config(path: Path, d, iterations: int, **shared) -> Path:
    import yaml

    root = d["root"]
    doc = {"tokenizer": str(d["vocab"]), "train_iterations": iterations, "workers": 0, **shared, "tasks": [
        {"task": "vqa", "data": str(d["vqa"]), "features": str(root / "vqa" / "features"), "lr": 2e-3,
         "batch_size": 16, "extra": {"min_answer_count": 1}},
        {"task": "refcoco+", "data": str(d["ref"]), "features": str(root / "ref" / "features"), "lr": 1e-3,
         "batch_size": 32}]}
    path.write_text(yaml.safe_dump(doc))
    return path


def run(config, out, *extra):
    return exit_status(main, [str(config), "--out", str(out), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def trained(two, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "out"
    assert run(two["config"], out, "--checkpoint", str(two["ckpt"])) == 0
    return out


def test_both_tasks_learn_beyond_an_untrained_control(two, trained, tmp_path, capsys):
    results = json.loads((trained / "results.json").read_text())
    assert (results["iterations"], results["iterations_per_epoch"]) == (120, 8)  # refcoco+: 240 items / 32
    vqa, ref = results["tasks"]["vqa"], results["tasks"]["refcoco+"]
    assert (vqa["loss_scale"], ref["loss_scale"], vqa["task_token"], ref["task_token"]) == (2.0, 1.0, 1, 10)
    assert [h["iteration"] for h in ref["history"]][:3] == [8, 16, 24] and vqa["history"][0]["iteration"] == 5
    control = {}
    for name, d, extra in (("vqa", {**two, "data": two["vqa"], "root": two["root"] / "vqa"}, ["--answers", str(
            trained / "vqa" / "answers.json")]), ("refcoco+", {**two, "data": two["ref"], "root": two["root"] / "ref"},
                                                  [])):
        assert run_cli(name, d, tmp_path / name, "--checkpoint", str(two["ckpt"]), "--split", "val", *extra) == 0
        control[name] = json.loads((tmp_path / name / "results.json").read_text())["splits"]["val"]["accuracy"]
    final = {name: r["history"][-1]["accuracy"] for name, r in results["tasks"].items()}
    # measured: vqa 0.43 -> 0.73 (24 questions, 4 colours), refcoco+ 0.25 -> 0.83 (40 expressions, 5 regions)
    assert final["vqa"] > control["vqa"] + 0.2 and final["refcoco+"] > control["refcoco+"] + 0.4, (final, control)
    assert all(r["train_loss_last"] < r["train_loss_first"] for r in results["tasks"].values())


def test_the_final_model_holds_every_head_and_vilbert_eval_reads_it(two, trained, tmp_path):
    model = load_pretrained(trained / "finetuned")
    assert set(model.task_heads.spec) == {"vqa", "refer"} and model.config.task_specific_tokens
    results = json.loads((trained / "results.json").read_text())
    d = {**two, "data": two["vqa"], "root": two["root"] / "vqa"}
    assert run_cli("vqa", d, tmp_path / "vqa", "--checkpoint", str(trained / "finetuned"), "--split", "val",
                   "--answers", str(trained / "vqa" / "answers.json")) == 0
    evaluated = json.loads((tmp_path / "vqa" / "results.json").read_text())["splits"]["val"]
    assert evaluated["accuracy"] == results["tasks"]["vqa"]["history"][-1]["accuracy"]  # with task token 1
    d = {**two, "data": two["ref"], "root": two["root"] / "ref"}
    assert run_cli("refcoco+", d, tmp_path / "ref", "--checkpoint", str(trained / "finetuned"), "--split", "val") == 0
    evaluated = json.loads((tmp_path / "ref" / "results.json").read_text())["splits"]["val"]
    assert evaluated["accuracy"] == results["tasks"]["refcoco+"]["history"][-1]["accuracy"]


def test_each_task_does_as_well_as_its_single_task_run_of_the_same_steps(two, trained, tmp_path):
    """Each task of the multi-task run against vilbert-eval fine-tuning it alone for as many steps as the
    task took in the multi-task run, with the same batch and the learning rate the multi-task optimizer ran
    at (the smallest task lr: under AdamW the loss scale hardly changes a step), from the same checkpoint."""
    results = json.loads((trained / "results.json").read_text())
    multi = {name: r["history"][-1]["accuracy"] for name, r in results["tasks"].items()}
    single = {}
    for name, data, root, batch, extra in (
            ("vqa", two["vqa"], two["root"] / "vqa", 16, ["--answers", str(trained / "vqa" / "answers.json")]),
            ("refcoco+", two["ref"], two["root"] / "ref", 32, [])):
        steps = results["tasks"][name]["batches"]  # fewer than the 120 iterations if the task plateaued
        assert 30 <= steps <= 120
        d = {**two, "data": data, "root": root}
        assert run_cli(name, d, tmp_path / name, "--checkpoint", str(two["ckpt"]), "--train-steps", str(steps),
                       "--lr", str(results["base_lr"]), "--batch-size", str(batch), "--split", "val", "--no-save",
                       *extra) == 0
        single[name] = json.loads((tmp_path / name / "results.json").read_text())["splits"]["val"]["accuracy"]
    print("\nmulti-task", multi, "single-task", single)
    # within noise: 24 VQA questions (1 question = 0.042) and 40 expressions (0.025)
    assert all(multi[name] >= single[name] - 0.1 for name in multi), (multi, single)


KILLED = """
import os, sys
sys.path.insert(0, {tests!r})
import pipelines.tasks.finetune as finetune
calls, real = [], finetune.TaskLoss.forward
def forward(self, batch):
    calls.append(1)
    if len(calls) == {kill_at}:
        os._exit(137)  # as abrupt as SIGKILL
    return real(self, batch)
finetune.TaskLoss.forward = forward
from pipelines.multitask_cli import main
main({argv!r})
"""


def test_a_killed_run_re_run_with_the_same_command_ends_as_the_unbroken_run(two, tmp_path):
    """With dropout, so that the RNG states must come back too."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", hidden_dropout_prob=0.1, v_hidden_dropout_prob=0.1)
    config = write_config(tmp_path / "mt.yaml", two, 16, save_every=5)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--checkpoint", str(ckpt), "--device", "cpu"]
    assert run(config, straight, *args[:2]) == 0
    # killed in the first forward pass of iteration 13 (2 an iteration), after the checkpoints of 5, 8 and 10
    script = KILLED.format(tests=str(TESTS), kill_at=25, argv=[str(config), "--out", str(killed), *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000008", "step-00000010"]
    assert run(config, killed, *args[:2]) == 0
    a, b = (json.loads((p / "results.json").read_text()) for p in (straight, killed))
    a.pop("seconds"), b.pop("seconds")
    assert a == b  # every loss, validation and plateau state, bit for bit
    wa, wb = (load_pretrained(p / "finetuned").state_dict() for p in (straight, killed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_bad_config_is_one_line_naming_the_file_and_the_field(two, tmp_path, capsys):
    good = load_config(two["config"])
    assert [e.task for e in good.tasks] == ["vqa", "refcoco+"] and isinstance(good.tasks[0], TaskEntry)
    doc = json.loads(json.dumps(__import__("yaml").safe_load(two["config"].read_text())))
    cases = [({"tasks": [{**doc["tasks"][0], "task": "vqa2"}]}, "tasks[0].task: unknown task 'vqa2' (one of gqa"),
             ({"tasks": [doc["tasks"][0], {**doc["tasks"][1], "data": str(tmp_path / "nowhere")}]},
              f"tasks[1].data: folder not found: {tmp_path / 'nowhere'}"),
             ({"tasks": [{**doc["tasks"][0], "batch_size": "16"}]},
              "tasks[0].batch_size: expected an integer, got '16'"),
             ({"epochs": "many"}, "epochs: expected a number, got 'many'"),
             ({"tasks": [{**doc["tasks"][0], "bath_size": 4}]}, "tasks[0].bath_size: unknown field (the fields are"),
             ({"tasks": [{"task": "vqa", "data": doc["tasks"][0]["data"]}]}, "tasks[0].features: missing"),
             ({"tasks": [doc["tasks"][0], doc["tasks"][0]]}, "tasks[1].task: 'vqa' is listed twice")]
    for k, (change, message) in enumerate(cases):
        path = tmp_path / f"bad{k}.json"
        path.write_text(json.dumps({**doc, **change}))
        assert run(path, tmp_path / f"o{k}", "--checkpoint", str(two["ckpt"])) == 1
        err = capsys.readouterr().err
        assert f"{path}: {message}" in err and err.count("\n") == 1, err
        assert not (tmp_path / f"o{k}").exists()
    assert run(two["config"], tmp_path / "o", "--checkpoint", str(two["ckpt"]), "--preset", "vilbert-tiny") == 2
    assert "give exactly one of --checkpoint, --official-checkpoint or --preset" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("tasks: [\n")
    assert run(tmp_path / "bad.yaml", tmp_path / "o", "--checkpoint", str(two["ckpt"])) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.yaml'}: not valid YAML (" in err and err.count("\n") == 1
