"""SIGKILL a real extraction mid-run, re-run it: no duplicates, nothing missing, all shards readable."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from extractor.cli import main

from extract_helpers import write_images

ARGS = ["--config", "tiny", "--workers", "0", "--quiet", "--device", "cpu", "--shard-size", "3",
        "--batch-size", "1"]


def test_sigkill_then_rerun(tmp_path):
    images = write_images(tmp_path / "images", 24)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-c", "import sys; from extractor.cli import main; main(sys.argv[1:])",
               str(images), str(out), *ARGS, "--throttle", "0.1"]
    process = subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parents[2],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("shard-*.tar"))) < 2:
        time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()
    time.sleep(0.15)  # land inside the next shard
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    complete_before = sorted(p.name for p in out.glob("shard-*.tar"))
    assert 2 <= len(complete_before) < 8, "the kill must land mid-run"

    summary = main([str(images), str(out), *ARGS])
    assert summary["skipped"] == 3 * len(complete_before)
    assert summary["done"] + summary["skipped"] == 24 and summary["failed"] == 0

    keys = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:  # every complete shard is readable end to end
            names = archive.getnames()
            for member in archive.getmembers():
                archive.extractfile(member).read()
        keys.extend(sorted({n.split(".", 1)[0] for n in names}))
    assert len(keys) == len(set(keys)) == 24
    assert set(keys) == {f"img{i:03d}" for i in range(24)}
    assert not list(out.glob(".*.partial"))
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 24 and set(sizes) == {p.name for p in out.glob("shard-*.tar")}
