"""Optimizer and learning-rate schedule of the official ViLBERT pretraining.

AdamW (betas 0.9/0.98, eps 1e-8), weight decay 0.01 except biases and LayerNorm weights;
parameters initialised from BERT train at `bert_lr_scale` x the base learning rate; linear warmup
over the first `warmup` fraction of steps, then linear decay to zero.
"""
from __future__ import annotations

import torch
from torch import nn


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or ".norm." in name


def param_groups(model: nn.Module, lr: float, weight_decay: float, bert_params: set[str] = frozenset(),
                 bert_lr_scale: float = 0.1) -> list[dict]:
    """Four groups: {decay, no decay} x {BERT-initialised, new}. Names are `model.named_parameters()`."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (is_no_decay(name, p), name in bert_params)
        groups.setdefault(key, []).append(p)
    out = []
    for (no_decay, from_bert), params in sorted(groups.items()):
        out.append({
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": lr * (bert_lr_scale if from_bert else 1.0),
            "name": f"{'bert' if from_bert else 'new'}-{'no_decay' if no_decay else 'decay'}",
        })
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01, bert_params: set[str] = frozenset(),
                    bert_lr_scale: float = 0.1, betas=(0.9, 0.98), eps: float = 1e-8) -> torch.optim.AdamW:
    # The fused kernel (CUDA and CPU) is the fastest and can skip a non-finite step on the device.
    devices = {p.device.type for p in model.parameters()}
    fused = len(devices) == 1 and devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, bert_params, bert_lr_scale),
                             betas=betas, eps=eps, fused=fused or None)


def warmup_linear(total_steps: int, warmup: float = 0.1):
    """Multiplier for LambdaLR: (s+1)/W for s < W, then linear decay to 0 at total_steps."""
    warm = max(1, int(round(warmup * total_steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.1):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, warmup))
