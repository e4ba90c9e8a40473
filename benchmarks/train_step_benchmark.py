"""The pretraining step side by side: this project's trainer step against the official model code.

    python benchmarks/train_step_benchmark.py --official-repo PATH          # GPU: bf16, batch 256
    python benchmarks/train_step_benchmark.py --official-repo PATH --device cpu --batch-size 8 --steps 3 --threads 1

PATH is a local vilbert-multi-task checkout (its `vilbert/vilbert.py`; nothing is downloaded and no
official code is part of this project). Without it only our variants run. One process, one
set of random weights: the official `BertForMultiModalPreTraining` is built first and its
weights are converted into ours, so every variant trains the same model on the same batch
(36 tokens, 36 regions + [IMG], 15 % masked tokens and regions, half the captions mismatched).

Variants (--variants):
  official  the official model + torch AdamW (foreach) + grad clipping, losses as its forward computes them;
            in fp32 as the official pretraining script runs by default (--official-precision bf16: under
            the same bf16 autocast as ours)
  eager     our Trainer step: exact masked selection (one host sync per selection), fused AdamW
  static    + fixed-size masked-head selection and on-device non-finite skip: no host sync in the step
  compile   + torch.compile (--compile-mode, e.g. max-autotune or reduce-overhead for CUDA graphs)

On CUDA, one extra step runs under torch.cuda.set_sync_debug_mode("warn"): `host_syncs` counts the
host synchronisations it reports. On every device, `sync_ops` counts the ops of one step that would make
the host wait for a GPU (pipelines/train/host_syncs.py: scalar reads, data-dependent shapes), for our eager
variants (the official one reads torch AdamW's host-side step counters, which the counter cannot tell
from device tensors on a CPU). `ops`: the ops of one step that compute (not views or allocations; eager
variants and official), about its kernel launches on a GPU, where a small batch is bound by launching them. \
Each timed step is the whole optimizer step, from a host batch (pinned on CUDA) to the updated
weights. FLOPs per sample are counted with torch.utils.flop_counter on the official model (forward +
backward) and MFU = samples/s x those FLOPs / --peak-tflops (default: the data sheet's dense bf16 peak
of a known GPU, e.g. 989.4 for an H100 SXM, 756 for an H100 PCIe; on a CPU the best bf16 matmul rate
measured at the benchmark's thread count, see benchmarks/peak.py; every variant, fp32 ones too, is
counted against that bf16 peak). `--check` first compares the losses of both codes in fp32 on an all-aligned batch.
Prints a table and writes JSON to benchmarks/results/.

On a CPU, glibc hands buffers above its mmap threshold (at most 32 MiB by default; the 94 MB word
embedding gradient, the bf16 weight casts) back to the kernel when freed and page-faults them in
again every step (`--profile`: 9 % of our bf16 step in zero-filling, most of it that gradient's fresh
pages), and the
official code, which allocates more, loses more (its bf16 step: 2.4-2.7 samples/s with glibc's
defaults, 3.4 with freed memory kept). A GPU's caching allocator keeps freed memory, so for CPU
ratios that stand for a GPU run the benchmark with glibc keeping it too:

    MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=4294967295 python benchmarks/train_step_benchmark.py ...
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_parity import import_official

from pipelines.train.host_syncs import HostSyncCounter, count_step_syncs
from pipelines.train.metrics import new_step_sums
from pipelines.train.trainer import TrainConfig, Trainer
from vilbert import load_preset
from vilbert.official import convert_official_state_dict

from batches import make_batch, official_inputs, ours
from peak import bf16_peak
from report import print_table, time_profile, write_json

RESULTS = Path(__file__).parent / "results"

OFFICIAL_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "v_feature_size", "v_target_size", "v_hidden_size", "v_num_hidden_layers", "v_num_attention_heads",
                 "v_intermediate_size", "v_hidden_dropout_prob", "v_attention_probs_dropout_prob", "bi_hidden_size",
                 "bi_num_attention_heads", "v_biattention_id", "t_biattention_id",
                 "initializer_range"]


def build_models(module, preset: str):
    """The official pretraining model (random weights) and our Trainer holding the same weights."""
    cfg = load_preset(preset)
    if module is None:
        return cfg, None
    off_cfg = module.BertConfig(cfg.vocab_size, **{k: getattr(cfg, k) for k in OFFICIAL_KEYS[1:]})
    off_cfg.fusion_method, off_cfg.visual_target, off_cfg.num_negative = cfg.fusion_method, 0, 128
    torch.manual_seed(0)
    official = module.BertForMultiModalPreTraining(off_cfg)
    return cfg, official


def our_trainer(preset: str, state: dict | None, cfg, batch_size: int, device: str, variant: str, mode: str,
                precision: str = "auto"):
    tc = TrainConfig(out=Path(tempfile.mkdtemp()), preset=preset, batch_size=batch_size, micro_batch_size=batch_size,
                     device=device, static_heads=variant != "eager", compile=variant == "compile",
                     tensorboard=False, max_steps=10**9, precision=precision)
    t = Trainer(tc)
    if state is not None:
        converted, _ = convert_official_state_dict(state, cfg)
        t.model.load_state_dict(converted.state_dict())
    model = torch.compile(t.model, mode=None if mode == "default" else mode) if variant == "compile" else t.model
    stats = new_step_sums(t.device)

    def step(batch):
        t._train_step(model, iter([batch]), stats)
    return t, step


def official_step_fn(official, device: torch.device, autocast_dtype):
    official.to(device).train()
    opt = torch.optim.AdamW(official.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01,
                            foreach=True)  # what a GPU gets by default, on every device

    def step(inputs):
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            mlm, mrm, align = official(**inputs)
        opt.zero_grad(set_to_none=True)
        (mlm + mrm + align).sum().backward()
        torch.nn.utils.clip_grad_norm_(official.parameters(), 1.0)
        opt.step()
    return step


def count_flops(official, cfg, device: torch.device) -> float:
    """Forward + backward FLOPs per training sample of the official model (fp32, batch 2)."""
    official.to(device).train()
    batch = {k: v.to(device) for k, v in official_inputs(make_batch(cfg, 2)).items()}
    with FlopCounterMode(display=False) as counter:
        mlm, mrm, align = official(**batch)
        (mlm + mrm + align).sum().backward()
    official.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def count_our_flops(trainer, batch: dict) -> float:
    """Forward + backward FLOPs per sample of our step's model (heads at the masked positions only)."""
    tensors = {k: v.to(trainer.device) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        trainer.model(**tensors).loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch["input_ids"])


def check_losses(official, trainer, cfg) -> dict:
    """fp32, dropout off, all captions aligned: the losses of both codes on the same weights."""
    batch = make_batch(cfg, 4, aligned_only=True, seed=1)
    official.eval(), trainer.model.eval()
    dev = trainer.device
    official.to(dev)
    with torch.no_grad():
        mlm, mrm, align = official(**{k: v.to(dev) for k, v in official_inputs(batch).items()})
        mine = trainer.model(**{k: v.to(dev) for k, v in ours(batch).items()})
    official.train(), trainer.model.train()
    return {"mlm": abs(mlm.item() - mine.mlm_loss.item()), "mrm": abs(mrm.item() - mine.mrm_loss.item()),
            "align": abs(align.item() - mine.align_loss.item())}


def time_steps(step, batch: dict, steps: int, warmup: int, device: torch.device) -> tuple[float, float, int | None]:
    """-> (seconds per step, peak CUDA MiB or nan, host syncs per step seen by CUDA's sync debug mode
    in one extra step, or None on CPU)."""
    for _ in range(warmup):
        step(batch)
    syncs = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step(batch)
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in seen)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return dt, peak, syncs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-repo", type=Path, default=None)
    p.add_argument("--preset", default="vilbert-base")
    p.add_argument("--variants", default="official,eager,static,compile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 8 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="our variants' precision (auto: bf16 autocast on a GPU, fp32 on a CPU, as vilbert-train)")
    p.add_argument("--official-precision", choices=["fp32", "bf16"], default="fp32",
                   help="the official variant's precision (its scripts' default: fp32)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for the compile variant")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="for MFU (default: a known GPU's data-sheet dense bf16 peak, "
                   "else the measured bf16 matmul peak: benchmarks/peak.py)")
    p.add_argument("--check", action="store_true", help="compare fp32 losses of both codes first")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also print each variant's top ROWS ops/kernels over 2 steps (torch.profiler)")
    p.add_argument("--out", type=Path, default=RESULTS / "train_step_benchmark.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    B, steps = a.batch_size or (256 if gpu else 8), a.steps or (30 if gpu else 3)
    warmup = a.warmup if a.warmup is not None else (5 if gpu else 1)
    variants = a.variants.split(",")
    module = import_official(a.official_repo) if a.official_repo else None
    if module is None:
        variants = [v for v in variants if v != "official"]
    cfg, official = build_models(module, a.preset)
    state, flops, check = None, None, None
    if official is not None:
        official.to(device)
        state = {k: v.detach().cpu().clone() for k, v in official.state_dict().items()}  # every variant's start
        flops = count_flops(official, cfg, device)
        if a.check:
            trainer, _ = our_trainer(a.preset, state, cfg, B, a.device, "eager", a.compile_mode, "fp32")
            check = check_losses(official, trainer, cfg)
            check["our_gflop_per_sample"] = count_our_flops(trainer, ours(make_batch(cfg, 2))) / 1e9
            del trainer
    peak, peak_source = (a.peak_tflops, "--peak-tflops") if a.peak_tflops else bf16_peak(a.device)
    full = make_batch(cfg, B)
    batches = {"official": official_inputs(full), "ours": ours(full, half=gpu)}
    if gpu:
        batches = {name: {k: v.pin_memory() for k, v in b.items()} for name, b in batches.items()}

    rows, precision = [], a.precision
    for variant in variants:
        if variant == "official":
            step = official_step_fn(official, device, torch.bfloat16 if a.official_precision == "bf16" else None)
        else:
            trainer, step = our_trainer(a.preset, state, cfg, B, a.device, variant, a.compile_mode, a.precision)
            precision = trainer.precision
        inputs = batches["official" if variant == "official" else "ours"]
        dt, peak_mib, syncs = time_steps(step, inputs, steps, warmup + (2 if variant == "compile" else 0), device)
        if a.profile:
            print(f"== where a step's time goes: {variant}\n"
                  + time_profile(partial(step, inputs), a.device, a.profile),
                  flush=True)
        sync_ops = ops = None
        if variant in ("eager", "static"):
            counted = count_step_syncs(trainer, trainer.model, inputs, new_step_sums(trainer.device))
            sync_ops, ops = counted.total, counted.ops
        elif variant == "official":
            with HostSyncCounter() as counted:
                step(inputs)
            ops = counted.ops
        rows.append({"variant": variant, "batch_size": B, "step_ms": round(1000 * dt, 1),
                     "samples_per_s": float(f"{B / dt:.4g}"), "peak_cuda_MiB": round(peak_mib) if gpu else None,
                     "host_syncs": syncs,
                     "sync_ops": sync_ops, "ops": ops,
                     "MFU_pct": round(100 * B / dt * flops / (peak * 1e12), 1) if flops and peak else None})
        if variant == "official":  # off the GPU: the next variants' peak memory is their own
            official.zero_grad(set_to_none=True)
            official.to("cpu")
        else:
            trainer._settle_skips()
            del trainer
        del step
        if gpu:
            torch.cuda.empty_cache()
    base = next((r["step_ms"] for r in rows if r["variant"] == "official"), None)
    for r in rows:
        r["x_official"] = round(base / r["step_ms"], 2) if base else None

    print_table(rows, ["variant", "batch_size", "step_ms", "samples_per_s", "x_official", "MFU_pct", "peak_cuda_MiB",
                       "host_syncs", "sync_ops", "ops"])
    if flops:
        print(f"official model: {flops / 1e9:.2f} GFLOP per training sample (forward + backward); "
              f"MFU against {peak:.4g} TFLOP/s ({peak_source})")
    if check:
        print("fp32 loss |difference| official vs ours: "
              + ", ".join(f"{k} {check[k]:.2e}" for k in ("mlm", "mrm", "align")))
        print(f"our model: {check['our_gflop_per_sample']:.2f} GFLOP per training sample "
              "(heads at masked positions only)")
    write_json(a.out, "train_step_benchmark.py", argv, a.device, rows, preset=a.preset,
               precision=precision, official_precision=a.official_precision,
               gflop_per_sample_official=flops and flops / 1e9,
               peak_tflops=peak, peak_source=peak_source, loss_check=check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
