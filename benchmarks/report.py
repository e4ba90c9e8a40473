"""What every benchmark prints and writes: a table of rows and a JSON document with the date,
the machine and the command."""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


def write_json(path: Path, script: str, argv: list[str] | None, device: str, rows: list[dict], **extra) -> None:
    """{date, machine, torch, command, **extra, results: rows} -> path."""
    allocator = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]  # glibc knobs
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_name(device),
           "torch": torch.__version__,
           "command": " ".join(allocator + ["python", f"benchmarks/{script}"]
                               + (argv if argv is not None else sys.argv[1:])),
           **extra, "results": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


def time_profile(run, device: str, rows: int, repeat: int = 2) -> str:
    """Where `run()` spends its time, from torch.profiler: the top `rows` ops and, on a GPU, kernels
    by self device time (by self CPU time on a CPU), over `repeat` runs. For tuning from one GPU call."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        for _ in range(repeat):
            run()
        if gpu:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total" if gpu else "self_cpu_time_total",
                                     row_limit=rows, max_name_column_width=70)
