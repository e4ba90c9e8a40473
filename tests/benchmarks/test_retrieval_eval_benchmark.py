"""The retrieval-evaluation benchmark runs on a tiny model: both scoring paths give the same scores,
the projection follows from the measured rate, and both training steps are timed."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrieval_eval_benchmark_runs_and_its_two_scorings_agree(tmp_path, capsys):
    bench = load("retrieval_eval_benchmark")
    out = tmp_path / "retrieval.json"
    assert bench.main(["--preset", "vilbert-tiny", "--device", "cpu", "--captions", "3", "--images", "5",
                       "--pair-batch", "4", "--regions", "7", "--batch-size", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    cached, full, vqa, pre = doc["results"]
    assert cached["pairs"] == 15 and full["pairs"] == 5  # one caption against the images, the whole model
    assert full["max_abs_diff"] < 1e-4  # the cache changes the cost, not the scores
    for row in (cached, full):
        assert row["pairs_per_s"] > 0
        assert abs(row["flickr30k_1kx5k_h"] - 5e6 / row["pairs_per_s"] / 3600) < 0.01 * row["flickr30k_1kx5k_h"] + 0.01
    assert vqa["samples_per_s"] > 0 and pre["samples_per_s"] > 0 and vqa["batch_size"] == pre["batch_size"] == 2
    assert abs(vqa["x_pretraining"] - vqa["samples_per_s"] / pre["samples_per_s"]) < 0.02
    assert doc["precision"] == "fp32" and doc["regions"] == 7
    assert "Flickr30k 1k images x 5k captions" in capsys.readouterr().out
