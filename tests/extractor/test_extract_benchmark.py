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
                        "--size", "80x60", "--out", str(tmp_path)])
    assert [r["batch_size"] for r in rows] == [1, 2] and all(r["images_per_second"] > 0 for r in rows)
    assert "images/s" in capsys.readouterr().out
    (result,) = tmp_path.glob("extract-cpu-*.json")
    assert json.loads(result.read_text())["rows"] == rows
