"""Downstream heads on top of a backbone, compatible with vilbert-multi-task's fine-tuned heads.

A head is declared by name -> (kind, output size). Kinds say what the head reads:

| kind          | input                                 | official counterpart                      |
|---------------|---------------------------------------|-------------------------------------------|
| answer        | fuse(h_CLS, h_IMG), MLP GELU+LayerNorm | `vil_prediction`, `vil_prediction_gqa`    |
| answer_relu   | fuse(h_CLS, h_IMG), MLP ReLU           | vilbert_beta `vil_prediction` (weight norm folded) |
| pair          | two fused vectors concatenated, MLP    | `vil_binary_prediction` (NLVR2)           |
| pooled_linear | fuse(h_CLS, h_IMG), Linear             | `vil_logit` (retrieval), `vil_tri_prediction` |
| region        | each visual hidden state, Linear       | `vision_logit` (referring expressions)    |
| token         | each text hidden state, Linear         | `linguisic_logit`                         |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import fuse
from .model import BackboneOutput


class MLPClassifier(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear (the official SimpleClassifier)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, eps: float = 1e-12):
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim, eps=eps)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(F.gelu(self.hidden(x))))


class ReluMLPClassifier(nn.Module):
    """Linear -> ReLU -> Dropout(0.5) -> Linear (vilbert_beta's SimpleClassifier, weight norm folded)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden_dim)
        self.dropout = nn.Dropout(0.5)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(F.relu(self.hidden(x))))


def _make_head(kind: str, n: int, c) -> nn.Module:
    bi, d_t, d_v = c.bi_hidden_size, c.hidden_size, c.v_hidden_size
    if c.arch == "vlbert":
        d_v = c.hidden_size
    makers = {
        "answer": lambda: MLPClassifier(bi, 2 * bi, n, c.layer_norm_eps),
        "answer_relu": lambda: ReluMLPClassifier(bi, 2 * bi, n),
        "pair": lambda: MLPClassifier(2 * bi, 2 * bi, n, c.layer_norm_eps),
        "pooled_linear": lambda: nn.Linear(bi, n),
        "region": lambda: nn.Linear(d_v, n),
        "token": lambda: nn.Linear(d_t, n),
    }
    if kind not in makers:
        raise ValueError(f"unknown task head kind {kind!r}; known: {sorted(makers)}")
    return makers[kind]()


class TaskHeads(nn.Module):
    def __init__(self, config, spec: dict[str, tuple[str, int]] | None = None):
        super().__init__()
        self.fusion_method = config.fusion_method
        self.spec = {name: (kind, int(n)) for name, (kind, n) in (spec or {}).items()}
        self.heads = nn.ModuleDict({name: _make_head(kind, n, config) for name, (kind, n) in self.spec.items()})
        self.dropout = nn.Dropout(0.1)

    def add(self, config, name: str, kind: str, n: int) -> None:
        self.spec[name] = (kind, int(n))
        self.heads[name] = _make_head(kind, n, config)

    def forward(self, name: str, out: BackboneOutput, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of head `name`: (B, n) for pooled kinds, (B, R, n) for region, (B, T, n) for token.
        Region logits at padded regions are pushed to -10000 as in the official code."""
        kind, _ = self.spec[name]
        head = self.heads[name]
        if kind == "region":
            logits = head(self.dropout(out.image))
            if image_mask is not None:
                logits = logits.masked_fill(~image_mask.bool()[..., None], -10000.0)
            return logits
        if kind == "token":
            return head(self.dropout(out.text))
        fused = self.dropout(fuse(out.pooled_text, out.pooled_image, self.fusion_method))  # (B, Dbi)
        if kind == "pair":
            return head(fused.reshape(-1, 2 * fused.shape[-1]))  # (B/2, n): consecutive pairs
        return head(fused)
