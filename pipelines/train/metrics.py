"""Training logs: a CSV of per-step scalars, TensorBoard event files and a PNG of the loss curves;
the per-step sums behind them, kept on the training device."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from vilbert import IGNORE_INDEX

FIELDS = ["step", "samples", "loss", "mlm_loss", "mrm_loss", "align_loss", "align_accuracy", "mlm_accuracy",
          "lr", "samples_per_s", "data_wait_s", "skipped_steps", "masked_overflow",
          # objective vlbert: MLM of the text-only rows (mlm_loss / mlm_accuracy are the captions'),
          # masked-RoI classification (mrm_loss is its soft cross-entropy)
          "mlm_text_loss", "mlm_text_accuracy", "mrc_accuracy"]


class MetricsLogger:
    """Append-only CSV (resumable: rows past the resume step are dropped) + TensorBoard."""

    def __init__(self, out_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        rows = read_metrics(self.csv_path) if self.csv_path.exists() else []
        rows = [r for r in rows if r["step"] <= resume_step]
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: dict) -> None:
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: row.get(k, "") for k in FIELDS})
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "samples") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.csv; a whole number (step, samples) stays an int, so that a resumed run
    rewrites its earlier rows as they were written ("16", not "16.0")."""
    with open(path, newline="") as f:
        return [{k: (_number(v) if k != "step" else int(float(v))) for k, v in r.items() if v not in ("", None)}
                for r in csv.DictReader(f)]


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def plot_losses(csv_path: Path, png_path: Path) -> Path:
    """Loss curves (total, MLM, MRM, alignment) and alignment accuracy from metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "mlm_loss", "mrm_loss", "align_loss", "mlm_text_loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax1.plot(*zip(*pts), label=key)
    ax1.set_xlabel("step")
    ax1.set_title("losses")
    ax1.legend()
    for key in ("align_accuracy", "mlm_accuracy", "mlm_text_accuracy", "mrc_accuracy"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax2.plot(*zip(*pts), label=key)
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.set_title("accuracy")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    """`python -m pipelines.train.metrics RUN_DIR`: (re)draw RUN_DIR/loss_curves.png from metrics.csv now."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipelines.train.metrics",
                                     description="Redraw RUN_DIR/loss_curves.png from RUN_DIR/metrics.csv "
                                                 "(a vilbert-train run directory, also while it trains).")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    run = Path(parser.parse_args(argv).run_dir)
    if not (run / "metrics.csv").is_file():
        print(f"{run / 'metrics.csv'}: not found", file=sys.stderr)
        return 1
    print(plot_losses(run / "metrics.csv", run / "loss_curves.png"))
    return 0


# ---- per-step sums, on the training device ------------------------------------------------

LOSS_SUMS = ("loss", "mlm_loss", "mrm_loss", "align_loss", "mlm_text_loss")  # per micro-step means
STEP_SUMS = LOSS_SUMS + ("align_correct", "align_total", "mlm_correct", "mlm_total", "overflow",
                         "mlm_text_correct", "mlm_text_total", "mrc_correct", "mrc_total")


def new_step_sums(device: torch.device | str = "cpu") -> dict:
    """Zeroed sums, on the training device: a host-to-device copy of pageable memory would wait
    for the GPU."""
    sums = {k: torch.zeros((), device=device) for k in STEP_SUMS}
    return {**sums, "micro_steps": 0, "data_wait_s": 0.0}


def accumulate_step(stats: dict, out, tensors: dict) -> None:
    """Device-side sums; read back only when logging (no host sync per step)."""
    for k in LOSS_SUMS:
        if getattr(out, k, None) is not None:
            stats[k] = stats[k] + getattr(out, k).detach().float()
    labels = tensors["align_labels"]
    stats["align_correct"] = stats["align_correct"] + (out.align_logits.argmax(-1) == labels).sum()
    stats["align_total"] = stats["align_total"] + labels.numel()
    hit, counted = out.mlm_logits.argmax(-1) == out.mlm_labels, out.mlm_labels != IGNORE_INDEX  # (N,)
    text_only = getattr(out, "mlm_text_only", None)
    if text_only is not None:  # objective vlbert: the text-only rows' words apart
        stats["mlm_text_correct"] = stats["mlm_text_correct"] + (hit & text_only).sum()
        stats["mlm_text_total"] = stats["mlm_text_total"] + (counted & text_only).sum()
        hit, counted = hit & ~text_only, counted & ~text_only
    stats["mlm_correct"] = stats["mlm_correct"] + hit.sum()
    stats["mlm_total"] = stats["mlm_total"] + counted.sum()
    targets = getattr(out, "region_targets", None)
    if targets is not None:  # masked-RoI classification: argmax against the target's argmax
        valid = out.region_valid if out.region_valid is not None else torch.ones(len(targets), dtype=torch.bool,
                                                                                  device=targets.device)
        stats["mrc_correct"] = stats["mrc_correct"] + ((out.region_logits.argmax(-1) == targets.argmax(-1))
                                                       & valid).sum()
        stats["mrc_total"] = stats["mrc_total"] + valid.sum()
    stats["overflow"] = stats["overflow"] + out.overflow
    stats["micro_steps"] += 1


def step_metrics(sums: dict) -> dict:
    """Accuracies from summed counts (floats): alignment, MLM (captions), and with objective vlbert
    MLM of the text-only rows and masked-RoI classification (absent when nothing counted)."""
    out = {"align_accuracy": sums["align_correct"] / max(1, sums["align_total"]),
           "mlm_accuracy": sums["mlm_correct"] / max(1, sums["mlm_total"])}
    if sums["mlm_text_total"]:
        out["mlm_text_accuracy"] = sums["mlm_text_correct"] / sums["mlm_text_total"]
    if sums["mrc_total"]:
        out["mrc_accuracy"] = sums["mrc_correct"] / sums["mrc_total"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
