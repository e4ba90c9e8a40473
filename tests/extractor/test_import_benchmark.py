"""The import benchmark runs every format and both exports, prints its table and writes its JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "import_benchmark.py"


def test_benchmark_prints_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("import_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main_benchmark(["--records", "3", "--boxes", "4", "--dim", "8", "--out", str(tmp_path)])
    steps = [row["step"] for row in result["rows"]]
    assert steps == ["import butd-tsv", "import lxmert-tsv", "import vilbert-lmdb", "import npz", "import h5",
                     "export h5", "export butd-tsv"]
    assert all(row["records"] == 3 and row["records_per_s"] > 0 for row in result["rows"])
    assert "records/s" in capsys.readouterr().out
    (written,) = tmp_path.glob("import-*.json")
    assert json.loads(written.read_text())["rows"] == result["rows"]
