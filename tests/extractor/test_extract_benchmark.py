"""The extraction benchmark runs and writes its JSON (tiny config, two images)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "extract_benchmark.py"


def test_benchmark_prints_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("extract_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--configs", "tiny", "--device", "cpu", "--images", "2", "--batch-sizes", "1,2",
                        "--memory-formats", "contiguous,channels_last",
                        "--size", "80x60", "--out", str(tmp_path)])
    assert [(r["memory_format"], r["batch_size"]) for r in rows] == [
        ("contiguous", 1), ("contiguous", 2), ("channels_last", 1), ("channels_last", 2)]
    assert all(r["images_per_second"] > 0 for r in rows)
    assert len({r["gflop_per_image"] for r in rows}) == 1 and rows[0]["gflop_per_image"] > 0
    parts = rows[0]["gflop_per_image_by_part"]  # the detector's three parts hold all its arithmetic
    assert set(parts) == {"backbone", "proposal_generator", "roi_heads"} and min(parts.values()) > 0
    assert abs(sum(parts.values()) - rows[0]["gflop_per_image"]) <= 0.2
    # random weights: RPN (valid-box index, NMS) 2 + selection's cheap pass (nonzero finds no pair
    # >= 0.2, count) 2 + one widening try (nonzero, NMS, count) 3
    assert all(r["sync_ops_per_image"] == 7 for r in rows)
    assert "images/s" in capsys.readouterr().out
    (result,) = tmp_path.glob("extract-cpu-*.json")
    doc = json.loads(result.read_text())
    assert doc["results"] == rows
    assert doc["bf16_peak_tflops"] > 0 and doc["peak_source"].startswith("measured")  # no data sheet for a CPU
    for r in rows:  # the share of the peak that the row's images/s x GFLOP/image reach
        share = 100 * r["images_per_second"] * r["gflop_per_image"] / 1000 / doc["bf16_peak_tflops"]
        assert abs(r["pct_of_bf16_peak"] - share) <= 0.05 + 0.01 * share
