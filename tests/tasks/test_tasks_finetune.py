"""Fine-tuning as a schedule of epochs: the official per-task settings, validation after each epoch
and the best epoch kept, gradient accumulation, batches from DataLoader workers, and a killed run
that resumes exactly (on VQA files in the official format and Flickr-style retrieval files)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.tasks import TASKS
from pipelines.tasks.base import Task, TaskOptions
from pipelines.tasks.finetune import StepBatches, make_plan
from pipelines.tasks.loading import batch_loader
from pipelines.tasks.retrieval import RetrievalTask
from pipelines.train.checkpoints import list_checkpoints, load_checkpoint
from vilbert import load_pretrained

from tasks_data import make_retrieval, make_vqa, run_cli, tiny_checkpoint, write_vocab

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
# 80 training questions, 16 a step: 5 steps an epoch, 15 in all; validation on the 24 val questions
SCHEDULE = ("--epochs", "3", "--batch-size", "16", "--lr", "1e-3", "--eval-batch-size", "10")


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    return {"root": root, "data": make_vqa(root), "vocab": write_vocab(root), "ckpt": tiny_checkpoint(root / "ckpt")}


def run(d, out, *extra):
    return run_cli("vqa", d, out, "--checkpoint", str(d["ckpt"]), *extra)


def test_the_official_settings_are_the_per_task_defaults():
    """vilbert-multi-task's vilbert_tasks.yml (lr, num_epoch, batch_size, max_seq_length)."""
    official = {"vqa": (4e-5, 20, 128, 23), "gqa": (4e-5, 20, 128, 26), "refcoco": (2e-5, 20, 256, 20),
                "refcoco+": (2e-5, 20, 256, 20), "refcocog": (2e-5, 20, 256, 20), "retrieval": (2e-5, 20, 128, 30),
                "nlvr2": (2e-5, 20, 64, 40), "snli-ve": (2e-5, 20, 256, 56), "vcr": (2e-5, 10, 64, 80)}
    assert {name: (t.default_lr, t.default_epochs, t.default_batch_size, t.default_max_seq_length)
            for name, t in TASKS.items()} == official
    assert {name: t.val_split for name, t in TASKS.items()} == {
        "vqa": "val", "gqa": "val", "refcoco": "val", "refcoco+": "val", "refcocog": "val", "retrieval": "val",
        "nlvr2": "dev", "snli-ve": "dev", "vcr": "val"}
    opts = TaskOptions(data=Path("."), features=Path("."), out=Path("."), epochs="official")
    Task.__init__(TASKS["vcr"].__new__(TASKS["vcr"]), opts)
    assert (opts.epochs, opts.batch_size, opts.lr, opts.val_split, opts.warmup) == (10.0, 64, 2e-5, "val", 0.1)


def test_epochs_validate_and_keep_the_best_epoch_beside_the_last(vqa, tmp_path):
    out = tmp_path / "out"
    assert run(vqa, out, *SCHEDULE) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["train_steps"], res["epochs"], res["batch_size"], res["processes"]) == (15, 3, 16, 1)
    history = res["history"]
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 5), (2, 10), (3, 15)]
    assert all(h["questions"] == 24 and 0 <= h["accuracy"] <= 1 and h["train_loss"] > 0 for h in history)
    best = max(history, key=lambda h: h["accuracy"])  # the first of equals
    assert res["best"] == {"epoch": best["epoch"], "step": best["step"], "split": "val", "metric": "accuracy",
                           "value": best["accuracy"]}
    assert res["evaluated"].startswith(f"best: epoch {best['epoch']:g}")
    assert res["splits"]["val"]["accuracy"] == best["accuracy"]  # the val split, evaluated on the best weights
    assert load_pretrained(out / "best").checkpoint_metadata["step"] == best["step"]
    last = load_pretrained(out / "finetuned")
    assert last.checkpoint_metadata["train_steps"] == 15
    model, state = load_checkpoint(out / "checkpoints" / "step-00000015")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000010", "step-00000015"]
    assert state["step"] == 15 and state["scheduler"]["last_epoch"] == 15 and len(state["losses"]) == 15
    for a, b in zip(model.state_dict().values(), last.state_dict().values()):
        assert torch.equal(a, b)  # the last checkpoint holds the last weights


def test_gradient_accumulation_trains_as_the_whole_batch(vqa, tmp_path, monkeypatch):
    """Without dropout (the answer head's 0.5 included): each pass draws its own masks."""
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, p=0.5, training=True, inplace=False: x)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ("--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--val-split", "none")
    assert run(vqa, whole, *common) == 0 and run(vqa, parts, *common, "--micro-batch-size", "4") == 0
    a, b = (torch.load(p / "checkpoints" / "step-00000005" / "trainer_state.pt", weights_only=True)
            for p in (whole, parts))
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)  # 4 passes of 4 = one of 16
    wa, wb = (load_pretrained(p / "checkpoints" / "step-00000005").state_dict() for p in (whole, parts))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


class ItemsTask(Task):
    """The items of a batch and one draw of its generator, to look at the schedule."""

    def collate(self, items, rng):
        return {"items": torch.tensor(items), "draw": torch.tensor(int(rng.integers(1 << 30)))}


def every(data) -> list:
    return [data[j] for j in range(len(data))]


def test_steps_read_each_item_once_an_epoch_whatever_the_processes(tmp_path):
    opts = TaskOptions(data=tmp_path, features=tmp_path, out=tmp_path, batch_size=8, epochs=2.0)
    task, items = ItemsTask(opts), list(range(21))
    one = make_plan(TaskOptions(**{**opts.__dict__, "micro_batch_size": 2}), 21, 1)  # 4 passes of 2
    two = make_plan(TaskOptions(**{**opts.__dict__, "micro_batch_size": 2}), 21, 2)  # 2 passes of 2, 2 processes
    assert (one.steps_per_epoch, one.total_steps, one.accumulation, two.accumulation) == (3, 6, 4, 2)
    single = every(StepBatches(task, items, one, 0, 0, 0))
    ranks = [every(StepBatches(task, items, two, 0, r, 0)) for r in (0, 1)]
    for step in range(6):  # a step's micro-batches interleave the processes: the same items, the same draws
        mine = single[4 * step:4 * step + 4]
        theirs = [ranks[m % 2][2 * step + m // 2] for m in range(4)]
        assert all(torch.equal(a["items"], b["items"]) and a["draw"] == b["draw"] for a, b in zip(mine, theirs))
    for epoch in range(2):
        seen = torch.cat([b["items"] for b in single[12 * epoch:12 * epoch + 12]]).tolist()
        assert sorted(seen[:21]) == items and seen[21:] == seen[:3]  # the last step filled up from the start
    first, second = (torch.cat([b["items"] for b in part]).tolist() for part in (single[:12], single[12:]))
    assert first != second  # each epoch its own order
    resumed = every(StepBatches(task, items, one, 0, 0, 4))  # from step 4
    assert all(torch.equal(a["items"], b["items"]) and a["draw"] == b["draw"] for a, b in zip(single[16:], resumed))


def test_workers_build_the_batches_the_main_thread_builds(tmp_path):
    d = {"root": tmp_path, "data": make_retrieval(tmp_path, n_train=12, n_test=4), "vocab": write_vocab(tmp_path)}
    task = RetrievalTask(TaskOptions(data=d["data"], features=tmp_path / "features", out=tmp_path,
                                     tokenizer=d["vocab"], batch_size=4, max_seq_length=30, epochs=1.0))
    plan = make_plan(task.opts, len(task.train_items()), 1)
    data = StepBatches(task, task.train_items(), plan, 3, 0, 0)
    main, workers = (list(batch_loader(data, task, n, False)) for n in (0, 2))
    assert len(main) == len(workers) == 9  # 36 captions, 4 a step
    for a, b in zip(main, workers):  # random negatives included
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    results = []
    for n in ("0", "2"):
        assert run_cli("retrieval", d, tmp_path / f"w{n}", "--checkpoint", str(ckpt), "--epochs", "1", "--batch-size",
                       "4", "--lr", "1e-3", "--max-seq-length", "30", "--val-split", "none", "--workers", n) == 0
        results.append(json.loads((tmp_path / f"w{n}" / "results.json").read_text()))
    for r in results:
        r.pop("seconds")
        r["splits"]["test"].pop("pairs_per_s")
    assert results[0] == results[1]


KILLED = """
import json, os, sys
sys.path.insert(0, {tests!r})
import pipelines.tasks.finetune as finetune
calls, real = [], finetune.TaskLoss.forward
def forward(self, batch):
    calls.append(1)
    if len(calls) == {kill_at}:
        os._exit(137)  # as abrupt as SIGKILL: no cleanup, no finally, workers orphaned
    return real(self, batch)
finetune.TaskLoss.forward = forward
from pathlib import Path
from tasks_data import run_cli
run_cli("vqa", {{k: Path(v) for k, v in json.loads({d!r}).items()}}, Path({out!r}), *{args!r})
"""


def test_a_killed_run_re_run_with_the_same_command_ends_as_the_unbroken_run(vqa, tmp_path):
    """With dropout, so that the RNG states must come back too."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", hidden_dropout_prob=0.1, v_hidden_dropout_prob=0.1)
    args = ["--checkpoint", str(ckpt), *SCHEDULE, "--workers", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli("vqa", vqa, straight, *args) == 0
    d = json.dumps({k: str(v) for k, v in vqa.items()})
    script = KILLED.format(tests=str(TESTS), kill_at=8, d=d, out=str(killed), args=args)  # in step 8, epoch 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step-00000005"]
    assert not (killed / "results.json").exists()
    assert run_cli("vqa", vqa, killed, *args) == 0  # the same command again
    a, b = (json.loads((p / "results.json").read_text()) for p in (straight, killed))
    a.pop("seconds"), b.pop("seconds")
    assert a == b  # every loss, validation and metric, bit for bit
    for name in ("predictions_val.json", "answers.json"):
        assert (straight / name).read_text() == (killed / name).read_text()
    for folder in ("finetuned", "best"):
        wa, wb = (load_pretrained(p / folder).state_dict() for p in (straight, killed))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a finished run re-run is evaluated again, not trained again; other settings are refused
    assert run_cli("vqa", vqa, killed, *args) == 0
    assert json.loads((killed / "results.json").read_text())["history"] == a["history"]


def test_resuming_with_other_settings_is_one_line(vqa, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(vqa, out, "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--val-split", "none") == 0
    capsys.readouterr()
    assert run(vqa, out, "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--val-split", "none") == 1
    err = capsys.readouterr().err
    assert "step-00000005: fine-tuned with other settings than this run's (lr: 0.001 then, 0.002 now)" in err
    assert "re-run the same command to resume, or choose another --out" in err and err.count("\n") == 1
    assert run(vqa, out, "--epochs", "1", "--train-steps", "3") == 2
    assert "give --epochs or --train-steps, not both" in capsys.readouterr().err
    assert run(vqa, tmp_path / "o2", "--epochs", "x") == 2
    assert "'x' is neither a number nor 'official'" in capsys.readouterr().err
    assert run(vqa, tmp_path / "o3", "--epochs", "1", "--val-split", "test-dev") == 1
    assert "no questions file for split 'test-dev'" in capsys.readouterr().err
    assert not (tmp_path / "o3" / "checkpoints").exists()  # found before any fine-tuning
    assert run(vqa, tmp_path / "o4", "--epochs", "1", "--batch-size", "16", "--no-save") == 0
    assert {p.name for p in (tmp_path / "o4").iterdir()} == {"results.json", "predictions_val.json", "answers.json"}


def test_the_compiled_step_is_one_graph_and_trains_as_eager(vqa, tmp_path, monkeypatch):
    """--compile wraps the whole step (model + task loss) as pretraining does; traced here with
    the aot_eager backend (inductor's code generation takes a minute on a CPU, and is pretraining's
    test), without dropout (a compiled graph draws its own masks)."""
    import functools

    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, p=0.5, training=True, inplace=False: x)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests' compilations
    common = ("--train-steps", "3", "--batch-size", "16", "--lr", "1e-3")
    assert run(vqa, tmp_path / "eager", *common) == 0 and run(vqa, tmp_path / "compiled", *common, "--compile") == 0
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    a, b = (torch.load(tmp_path / p / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=True)
            for p in ("eager", "compiled"))
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)


def test_a_non_finite_loss_stops_the_run_before_a_checkpoint_holds_it(tmp_path, capsys):
    from vilbert import load_pretrained, save_pretrained

    root = tmp_path / "d"
    d = {"root": root, "data": make_vqa(root, n_train=8, n_val=2), "vocab": write_vocab(root),
         "ckpt": tiny_checkpoint(root / "ckpt")}
    model = load_pretrained(d["ckpt"])
    with torch.no_grad():
        model.backbone.embeddings.norm.weight[:] = 3e38  # finite (NaN is refused on loading); the first loss is NaN
    save_pretrained(model, d["ckpt"])
    assert run(d, tmp_path / "out", "--epochs", "2", "--batch-size", "4", "--min-answer-count", "1") == 1
    err = capsys.readouterr().err
    assert "vqa: loss became nan at step 1; the checkpoints saved before it are intact" in err and err.count("\n") == 1
    assert not list_checkpoints(tmp_path / "out" / "checkpoints") and not (tmp_path / "out" / "best").exists()
