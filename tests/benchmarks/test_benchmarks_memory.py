"""benchmarks/memory_benchmark.py: RSS reading, the slopes and flat rule, and a short loader stream
end to end; plus extract_benchmark.py --compare-precision on the tiny detector (a few seconds)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def memory():
    return load("memory_benchmark")


def test_reads_own_and_child_rss(memory):
    own = memory.proc_memory()
    assert own["VmRSS"] > 0 and 0 < own["RssAnon"] <= own["VmRSS"] and own["tar_maps"] == 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        deadline = time.time() + 5
        while child.pid not in memory.child_pids() and time.time() < deadline:
            time.sleep(0.05)
        kids = memory.children_memory()
        assert kids["count"] >= 1 and kids["VmRSS"] > 0
    finally:
        child.kill()
        child.wait()
    assert memory.proc_memory(child.pid) == {}


def test_slope_and_flat_rule(memory):
    xs = list(range(0, 10_000, 500))
    assert memory.slope_per_1000(xs, [100 + 0.002 * x for x in xs]) == pytest.approx(2.0)
    sampler = memory.RssSampler(every=100)
    for count in range(100, 2_100, 100):  # main heap grows 3 MiB per 1,000 samples, no workers
        mib = dict(rss=500 + 0.003 * count, anon=300 + 0.003 * count, file=200.0, tar_maps=0)
        sampler.points.append(dict(samples=count, children=0, main=mib, workers=dict(mib, rss=0.0, anon=0.0)))
    sampler.count = 2_000
    (row,) = memory.summarize("s", sampler, warmup=0.1, threshold=1.0)
    assert row["process"] == "main" and row["rss_start_mib"] == pytest.approx(500.6)
    assert row["anon_slope_mib_per_1000"] == pytest.approx(3.0) and not row["flat"]
    assert row["anon_robust_slope_mib_per_1000"] == pytest.approx(3.0)  # steady growth tilts every pair
    (row,) = memory.summarize("s", sampler, warmup=0.1, threshold=5.0)
    assert row["flat"]
    for point in sampler.points:  # no growth, but a transient peak of 100 MiB near the end
        point["main"] = dict(point["main"], anon=300.0 + (100.0 if point["samples"] == 1_900 else 0.0))
    (row,) = memory.summarize("s", sampler, warmup=0.1, threshold=1.0)
    assert row["anon_slope_mib_per_1000"] > 20 and row["anon_robust_slope_mib_per_1000"] == 0 and row["flat"]


def test_loader_stream_end_to_end(memory, tmp_path, capsys):
    result = memory.main(["--streams", "loader-0", "--samples", "320", "--shards", "2", "--samples-per-shard", "40",
                          "--samples-per-epoch", "80", "--shuffle-buffer", "20", "--every-batches", "1",
                          "--out", str(tmp_path)])
    # the main process's row (a "workers" row joins it when this process has other children, such as
    # the resource tracker that an earlier test's spawn pool leaves behind)
    (row,) = [r for r in result["rows"] if r["process"] == "main"]
    assert row["stream"] == "loader-0" and row["samples"] >= 320 and len(row["points"]) >= 5
    assert row["tar_maps_max"] >= 1  # the in-process loader memory-maps the shards
    assert "RssAnon" in capsys.readouterr().out
    (path,) = tmp_path.glob("memory-*.json")
    assert json.loads(path.read_text())["results"][0]["samples"] == row["samples"]


def test_compare_precision_tiny(tmp_path, capsys):
    rows = load("extract_benchmark").main(["--configs", "tiny", "--device", "cpu", "--images", "1", "--size", "80x60",
                                           "--compare-precision", "bf16", "--out", str(tmp_path)])
    check, bf16 = rows
    assert check["precision"] == "fp32 (fixed vs detected)" and check["feature_max_abs_diff"] < 1e-5
    assert bf16["precision"] == "bf16" and bf16["cosine_mean"] > 0.99 and 0 <= bf16["box_match_iou90"] <= 1
    assert "plumbing check" in capsys.readouterr().out
    (path,) = tmp_path.glob("extract-precision-cpu-*.json")
    assert json.loads(path.read_text())["results"] == rows
