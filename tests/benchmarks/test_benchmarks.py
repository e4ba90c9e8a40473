"""The training-step benchmark runs our variants and writes its JSON (the official code is not
part of the project, so its variant needs --official-repo and is not run here)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_runs_our_variants(tmp_path, capsys):
    bench = load("train_step_benchmark")
    out = tmp_path / "step.json"
    assert bench.main(["--preset", "vilbert-tiny", "--variants", "official,eager,static", "--device", "cpu",
                       "--batch-size", "4", "--steps", "1", "--warmup", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["results"]] == ["eager", "static"]  # no --official-repo: no official row
    assert all(r["samples_per_s"] > 0 and r["x_official"] is None for r in doc["results"])
    assert [r["sync_ops"] for r in doc["results"]] == [2, 0]  # exact selection: token and region nonzero
    assert doc["precision"] == "fp32" and doc["official_precision"] == "fp32"  # a CPU's defaults
    assert doc["peak_tflops"] > 0 and doc["peak_source"].startswith("measured")  # MFU's denominator on a CPU
    assert "samples_per_s" in capsys.readouterr().out


def test_benchmark_batches_match_the_loader_and_official_forms():
    bench = load("train_step_benchmark")
    cfg = bench.load_preset("vilbert-tiny")
    full = bench.make_batch(cfg, 6)
    mine = bench.ours(full)
    masked = full["region_labels"] == 1
    assert mine["region_targets"].shape == (int(masked.sum()), cfg.v_target_size)
    torch.testing.assert_close(mine["region_targets"], full["region_targets"][masked])
    official = bench.official_inputs(full)
    assert official["image_target"].shape[1] == official["image_label"].shape[1] == 36  # no [IMG]
    assert ((official["masked_lm_labels"] == -1) == (full["lm_labels"] == -100)).all()
    assert (full["lm_labels"][full["align_labels"] == 1] == -100).all() and not masked[full["align_labels"] == 1].any()


def test_extract_parts_benchmark_runs_and_the_two_selections_agree(tmp_path):
    bench = load("extract_parts_benchmark")
    out = tmp_path / "parts.json"
    assert bench.main(["--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 6 and all(r["per_second"] > 0 and r["ms"] > 0 for r in rows)
    assert [r["same_result"] for r in rows[2:4]] == [True, True]
    assert "numpy" in rows[4]["part"] and "tensor" in rows[5]["part"]


def test_peak_nominal_by_gpu_name_and_measured_matmul_rate(tmp_path):
    peak = load("peak")
    assert peak.nominal_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak.nominal_bf16_tflops("NVIDIA H100 PCIe") == 756.0  # not the SXM figure
    assert peak.nominal_bf16_tflops("AMD EPYC") is None
    rate = peak.matmul_tflops(64, torch.float32, "cpu")
    assert 0 < rate < 100  # TFLOP/s of one small product on a CPU
    tflops, source = peak.bf16_peak("cpu")
    assert tflops > 0 and source.startswith("measured: best bf16") and "thread" in source
    out = tmp_path / "peak.json"
    assert peak.main(["--device", "cpu", "--dtypes", "fp32,bf16", "--sizes", "32,64", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["dtype"], r["n"]) for r in rows] == [("fp32", 32), ("fp32", 64), ("bf16", 32), ("bf16", 64)]
    assert all(r["TFLOP_s"] > 0 for r in rows)
