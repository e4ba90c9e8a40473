"""The denominator of MFU: a device's dense bf16 matrix-multiply peak.

    python benchmarks/peak.py                       # this machine: measured GEMM rates per dtype and size
    python benchmarks/peak.py --threads 1 --dtypes fp32,bf16

On an NVIDIA GPU named in NOMINAL_BF16_TFLOPS, MFU is counted against the data sheet's dense bf16
peak, as the speed targets are (989.4 TFLOP/s for an H100 SXM). Elsewhere (a CPU) there is no such
figure to trust, so the peak is measured: the best rate of square bf16 matrix multiplications
(torch.matmul, so oneDNN / MKL on a CPU) at the current thread count. That is what "fraction of
the hardware" can mean on a CPU, and it makes the CPU's ratios comparable with the GPU targets: a
training step at 35 % of it does on this CPU what 35 % MFU asks of an H100.

Prints a table and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import print_table, write_json

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16 tensor-core peaks (NVIDIA data sheets), by a part of torch.cuda.get_device_name().
NOMINAL_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def nominal_bf16_tflops(device_name: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in device_name), None)


def matmul_tflops(n: int, dtype: torch.dtype, device: str, repeat: int = 3) -> float:
    """TFLOP/s of the fastest of `repeat` (n, n) @ (n, n) products (2 n^3 FLOPs each), after one
    untimed product."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    cuda = device.startswith("cuda")
    a @ b
    best = float("inf")
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def default_sizes(device: str) -> tuple[int, ...]:
    return (4096, 8192, 16384) if device.startswith("cuda") else (512, 1024, 2048)


def measured_peak(device: str, dtype: torch.dtype = torch.bfloat16, sizes=None) -> tuple[float, int]:
    """(best TFLOP/s over the sizes, the size that gave it)."""
    rates = {n: matmul_tflops(n, dtype, device) for n in sizes or default_sizes(device)}
    best = max(rates, key=rates.get)
    return rates[best], best


def bf16_peak(device: str) -> tuple[float, str]:
    """(TFLOP/s, where the figure comes from) for MFU: the data sheet on a known GPU, else measured."""
    if device.startswith("cuda"):
        nominal = nominal_bf16_tflops(torch.cuda.get_device_name())
        if nominal:
            return nominal, "data sheet, dense bf16"
    tflops, n = measured_peak(device)
    n_threads = torch.get_num_threads()
    threads = "" if device.startswith("cuda") else f", {n_threads} thread{'s' * (n_threads != 1)}"
    return tflops, f"measured: best bf16 {n}x{n} matmul{threads}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--sizes", default=None, help="comma-separated n of the (n, n) matrices (default: by device)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "peak.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = [int(n) for n in a.sizes.split(",")] if a.sizes else default_sizes(a.device)
    rows = [{"dtype": name, "n": n, "TFLOP_s": round(matmul_tflops(n, DTYPES[name], a.device), 4)}
            for name in a.dtypes.split(",") for n in sizes]
    print_table(rows, ["dtype", "n", "TFLOP_s"])
    nominal = nominal_bf16_tflops(torch.cuda.get_device_name()) if a.device.startswith("cuda") else None
    if nominal:
        print(f"data-sheet dense bf16 peak: {nominal} TFLOP/s")
    write_json(a.out, "peak.py", argv, a.device, rows, nominal_bf16_tflops=nominal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
