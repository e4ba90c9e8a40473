"""`torchrun ... -m pipelines.eval_cli` on two gloo processes: DDP fine-tuning that trains as one
process accumulating the same batches, and evaluation in shares that gathers exactly one
prediction per item (splits that do not divide by two) with the metrics of one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks_data import make_retrieval, make_vqa, run_cli, tiny_checkpoint, write_vocab

REPO = Path(__file__).resolve().parents[2]


def torchrun(port: int, task: str, d: dict, out: Path, *extra) -> None:
    args = ["--task", task, "--data", str(d["data"]), "--features", str(d["root"] / "features"), "--out", str(out),
            "--tokenizer", str(d["vocab"]), "--device", "cpu", *extra]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "pipelines.eval_cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def state(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step-{step:08d}" / "trainer_state.pt", weights_only=True)


@pytest.mark.slow
def test_ddp_fine_tuning_and_sharded_evaluation_of_an_odd_split(tmp_path):
    root = tmp_path / "d"
    d = {"root": root, "data": make_vqa(root), "vocab": write_vocab(root), "ckpt": tiny_checkpoint(root / "ckpt")}
    for name, key in (("v2_OpenEnded_mscoco_val2014_questions.json", "questions"),
                      ("v2_mscoco_val2014_annotations.json", "annotations")):
        doc = json.loads((d["data"] / name).read_text())
        doc[key] = doc[key][:-1]  # 23 questions: 6 chunks of 4, 3 for each process (12 and 11 questions)
        (d["data"] / name).write_text(json.dumps(doc))
    schedule = ["--checkpoint", str(d["ckpt"]), "--epochs", "2", "--batch-size", "16", "--micro-batch-size", "4",
                "--lr", "1e-3", "--eval-batch-size", "4"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    torchrun(29571, "vqa", d, ddp, *schedule)
    assert run_cli("vqa", d, single, *schedule) == 0  # one process, 4 passes of 4 a step
    res = json.loads((ddp / "results.json").read_text())
    assert (res["processes"], res["batch_size"], res["train_steps"]) == (2, 16, 10)
    # each process read its part of each step: together the batches of the single process
    np.testing.assert_allclose(state(ddp, 10)["losses"], state(single, 10)["losses"], rtol=1e-4)
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == ["step-00000005", "step-00000010"]  # one writer
    val = [q["question_id"] for q in json.loads((d["data"] / "v2_OpenEnded_mscoco_val2014_questions.json")
                                                .read_text())["questions"]]
    preds = json.loads((ddp / "predictions_val.json").read_text())
    assert [p["question_id"] for p in preds] == val and len(val) == 23  # each question once, in order
    # the model it evaluated (the best epoch's), evaluated by one process: the same predictions and metrics
    alone = tmp_path / "alone"
    assert run_cli("vqa", d, alone, "--checkpoint", str(ddp / "best"), "--eval-batch-size", "4") == 0
    assert json.loads((alone / "predictions_val.json").read_text()) == preds
    assert json.loads((alone / "results.json").read_text())["splits"]["val"] == res["splits"]["val"]
    assert res["history"][-1]["questions"] == 23


@pytest.mark.slow
def test_retrieval_scores_caption_shares_that_do_not_divide_evenly(tmp_path):
    d = {"root": tmp_path, "data": make_retrieval(tmp_path, n_train=2, n_test=7), "vocab": write_vocab(tmp_path),
         "ckpt": tiny_checkpoint(tmp_path / "ckpt")}
    # 21 captions x 7 images, 16 pairs a pass: 2 captions a pass, 11 passes: 6 (12 captions) and 5 (9)
    args = ["--checkpoint", str(d["ckpt"]), "--max-seq-length", "30", "--pair-batch", "16"]
    torchrun(29572, "retrieval", d, tmp_path / "ddp", *args)
    assert run_cli("retrieval", d, tmp_path / "single", *args) == 0
    a, b = (json.loads((tmp_path / p / "results.json").read_text())["splits"]["test"] for p in ("ddp", "single"))
    a.pop("pairs_per_s"), b.pop("pairs_per_s")
    assert a == b and a["captions"] == 21 and a["images"] == 7
    pa, pb = (json.loads((tmp_path / p / "predictions_test.json").read_text()) for p in ("ddp", "single"))
    assert pa == pb and len(pa) == 21
    shutil.rmtree(tmp_path / "ddp" / "checkpoints", ignore_errors=True)
