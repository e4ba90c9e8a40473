"""`torchrun ... -m pipelines.multitask_cli` on two gloo processes: VQA + refcoco+ with dropout, each
process reading half of every task's batch, killed after its checkpoint of iteration 10 and re-run
under torchrun: its losses, validations, plateau states, final evaluation and weights are those of
one process running the same config straight through (fp32 tolerance: the all-reduce adds in
another order), and only rank 0 wrote into OUT."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipelines.multitask_cli import main
from vilbert import load_pretrained

from tasks_data import exit_status, make_refer, make_vqa, tiny_checkpoint, write_vocab

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent

# every write into OUT (opened for writing, made, renamed, removed) logged per rank, as it happens
AUDITED = """
import json, os, sys
sys.path.insert(0, {repo!r})
OUT, RANK = os.path.abspath({out!r}) + os.sep, int(os.environ["RANK"])
log = open(os.path.join({logs!r}, f"writes-{{RANK}}-{{os.getpid()}}.jsonl"), "w", buffering=1)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE):
            return
        paths = [path]
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        paths = [args[0]]
    elif event == "os.rename":
        paths = list(args[:2])
    else:
        return
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(OUT):
            log.write(json.dumps([event, os.path.relpath(os.path.abspath(os.fsdecode(p)), OUT)]) + "\\n")

sys.addaudithook(hook)
import pipelines.tasks.finetune as finetune
calls, real = [], finetune.TaskLoss.forward
def forward(self, batch):
    calls.append(1)
    if RANK == 0 and len(calls) == {kill_at}:
        os._exit(137)  # as abrupt as SIGKILL; torchrun then stops rank 1
    return real(self, batch)
finetune.TaskLoss.forward = forward
from pipelines.multitask_cli import main
main({argv!r})
"""


def torchrun(port: int, tmp: Path, argv: list, out: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    logs = tmp / "writes"
    logs.mkdir(exist_ok=True)
    script = tmp / f"audited-{port}.py"
    script.write_text(textwrap.dedent(AUDITED.format(repo=str(REPO), out=str(out), logs=str(logs), kill_at=kill_at,
                                                     argv=argv)))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def writes(tmp: Path, rank: int) -> list:
    return [tuple(json.loads(line)) for f in sorted((tmp / "writes").glob(f"writes-{rank}-*.jsonl"))
            for line in f.read_text().splitlines()]


def assert_close(a, b, where="results"):
    """Equal, floats to fp32 tolerance."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


def write_config(path: Path, d: dict) -> Path:
    import yaml

    root = d["root"]
    doc = {"tokenizer": str(d["vocab"]), "train_iterations": 12, "save_every": 5, "workers": 0,
           "plateau_patience": 0, "eval_batch_size": 5, "tasks": [  # val: 24 vqa, 40 refcoco+ items: 3+2, 4+4 chunks
               {"task": "vqa", "data": str(d["vqa"]), "features": str(root / "vqa" / "features"), "lr": 2e-3,
                "batch_size": 16, "micro_batch_size": 4, "extra": {"min_answer_count": 1}},
               {"task": "refcoco+", "data": str(d["ref"]), "features": str(root / "ref" / "features"), "lr": 1e-3,
                "batch_size": 32, "micro_batch_size": 8, "splits": ["val"]}]}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_two_processes_killed_and_resumed_end_as_one_process_straight_through(tmp_path):
    root = tmp_path / "d"
    d = {"root": root, "vocab": write_vocab(root), "vqa": make_vqa(root / "vqa"), "ref": make_refer(root / "ref")}
    ckpt = tiny_checkpoint(root / "ckpt", hidden_dropout_prob=0.1, v_hidden_dropout_prob=0.1)
    config = write_config(root / "mt.yaml", d)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    argv = [str(config), "--out", str(ddp), "--checkpoint", str(ckpt), "--device", "cpu"]
    assert exit_status(main, [*argv[:2], str(single), *argv[3:]]) == 0  # one process: 4 and 4 passes a batch
    # 2 + 2 passes an iteration in each process: killed in the first of iteration 11 (refcoco+'s: vqa is paused
    # then), after the checkpoint of 10
    proc = torchrun(29573, tmp_path, argv, ddp, kill_at=41)
    assert proc.returncode != 0 and not (ddp / "results.json").exists(), proc.stderr[-3000:]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-00000008", "step-00000010"]
    proc = torchrun(29574, tmp_path, argv, ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "refcoco+" in proc.stdout  # rank 0's log and table
    a, b = (json.loads((p / "results.json").read_text()) for p in (ddp, single))
    assert (a.pop("processes"), b.pop("processes")) == (2, 1)
    a.pop("seconds"), b.pop("seconds")
    assert_close(a, b)  # every loss (averaged over the processes), validation, plateau state and final metric
    assert a["tasks"]["refcoco+"]["splits"]["val"] and [len(r["history"]) for r in a["tasks"].values()] == [3, 2]
    # vqa's second validation (iteration 10) misses: paused, it skips iterations 11 and 12 (after the resume too)
    vqa = a["tasks"]["vqa"]
    assert [h["paused"] for h in vqa["history"]] == [False, True, False] and vqa["batches"] == 10
    for name in ("vqa/metrics.json", "vqa/predictions_val.json", "refcoco+/predictions_val.json"):
        assert_close(json.loads((ddp / name).read_text()), json.loads((single / name).read_text()), name)
    wa, wb = (load_pretrained(p / "finetuned").state_dict() for p in (ddp, single))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    # rank 1 wrote nothing into OUT (it made the folders it evaluates into, nothing else)
    others = [(event, p) for event, p in writes(tmp_path, 1) if not (p in (".", "vqa") and event == "os.mkdir")]
    assert others == [], others
    written = {p.split(os.sep)[0] for _, p in writes(tmp_path, 0)}
    assert {"checkpoints", "finetuned", "results.json", "vqa", "refcoco+"} <= written, written
