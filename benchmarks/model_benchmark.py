"""Forward+backward throughput and peak memory of the pretraining step.

    python benchmarks/model_benchmark.py                      # vilbert-tiny and vilbert-base, CPU or GPU
    python benchmarks/model_benchmark.py --presets vilbert-base --batch-size 256 --device cuda

Each preset runs in its own subprocess so that peak host memory (ru_maxrss) is its own. On CUDA
the step runs under bf16 autocast and peak memory is torch.cuda.max_memory_allocated. Inputs are
the pretraining shapes: 36 tokens, 36 regions + [IMG], 15% masked tokens and regions.
Prints a table and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vilbert import ViLBert, load_preset

from batches import make_batch
from report import print_table, write_json

RESULTS = Path(__file__).parent / "results"


def run_one(preset: str, batch_size: int, steps: int, device: str) -> dict:
    cfg = load_preset(preset)
    model = ViLBert(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = {k: v.to(device) for k, v in make_batch(cfg, batch_size).items()}
    use_bf16 = device == "cuda"

    def step():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "preset": preset, "device": device, "precision": "bf16-autocast" if use_bf16 else "fp32",
        "batch_size": batch_size, "steps": steps, "params_M": round(model.num_parameters() / 1e6, 2),
        "samples_per_s": round(batch_size * steps / dt, 2), "step_ms": round(1000 * dt / steps, 1),
        "peak_memory_MiB": round(peak, 1),
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "host max RSS",
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["vilbert-tiny", "vilbert-base"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 tiny / 8 base on CPU, 256 on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CPU, 50 on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one preset here
    p.add_argument("--out", type=Path, default=RESULTS / "model_benchmark.json")
    a = p.parse_args(argv)
    steps = a.steps or (50 if a.device == "cuda" else 10)

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.one:
        bs = a.batch_size or (256 if a.device == "cuda" else (64 if "tiny" in a.presets[0] else 8))
        print(json.dumps(run_one(a.presets[0], bs, steps, a.device)))
        return 0

    rows = []
    for preset in a.presets:
        cmd = [sys.executable, __file__, "--one", "--presets", preset, "--steps", str(steps), "--device", a.device,
               "--threads", str(a.threads)]
        if a.batch_size:
            cmd += ["--batch-size", str(a.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))

    print_table(rows, ["preset", "device", "precision", "batch_size", "params_M", "samples_per_s", "step_ms",
                       "peak_memory_MiB"])
    write_json(a.out, "model_benchmark.py", argv, a.device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
