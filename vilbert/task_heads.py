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

VL-BERT's own heads (jackroos/VL-BERT, each task's `final_mlp`; Linear layers start Xavier-uniform
with zero bias, the transforms as copies of the pretrained heads, see `ViLBert.add_task_head`):

| kind          | input                                             | official counterpart (`final_mlp`) |
|---------------|---------------------------------------------------|------------------------------------|
| masked_answer | text state at `positions`: MLM transform, Dropout(0.1), Linear | vqa, CLASSIFIER_TYPE mlm |
| region_mlp    | each visual state: MVRC transform (dense, GELU), Linear | refcoco                  |
| cls_linear    | pooled [CLS] (tanh pooler): Dropout(0.1), Linear  | vcr, CLASSIFIER_TYPE 1fc           |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import PredictionTransform, fuse
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


class MaskedAnswerClassifier(nn.Module):
    """VL-BERT's VQA head: BERT's MLM transform (dense, GELU, LayerNorm) -> Dropout -> Linear."""

    def __init__(self, dim: int, out_dim: int, eps: float, dropout: float = 0.1):
        super().__init__()
        self.transform = PredictionTransform(dim, eps)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.transform(x)))


class RegionMLPClassifier(nn.Module):
    """VL-BERT's referring head: the masked-RoI head's transform (dense, GELU) -> Dropout -> Linear."""

    def __init__(self, dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(F.gelu(self.dense(x))))


class DropoutLinear(nn.Module):
    """Dropout -> Linear (VL-BERT's 1fc classifier)."""

    def __init__(self, dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(x))


VLBERT_KINDS = ("masked_answer", "region_mlp", "cls_linear")


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
        "masked_answer": lambda: MaskedAnswerClassifier(d_t, n, c.layer_norm_eps),
        "region_mlp": lambda: RegionMLPClassifier(d_t, n),
        "cls_linear": lambda: DropoutLinear(d_t, n),
    }
    if kind not in makers:
        raise ValueError(f"unknown task head kind {kind!r}; known: {sorted(makers)}")
    if kind in VLBERT_KINDS and c.arch != "vlbert":
        raise ValueError(f"task head kind {kind!r} is VL-BERT's; this model is {c.arch!r}")
    head = makers[kind]()
    if kind in VLBERT_KINDS:  # the official init_weight of final_mlp
        for m in head.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    return head


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

    def forward(self, name: str, out: BackboneOutput, image_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of head `name`: (B, n) for pooled kinds, (B, R, n) for region kinds, (B, T, n) for
        token. Region logits outside `image_mask` are pushed to -10000 as in the official code.
        `positions` (B,): the text position each row's masked_answer head reads."""
        kind, _ = self.spec[name]
        head = self.heads[name]
        if kind in ("region", "region_mlp"):
            logits = head(self.dropout(out.image) if kind == "region" else out.image)  # (B, R, n)
            if image_mask is not None:
                logits = logits.masked_fill(~image_mask.bool()[..., None], -10000.0)
            return logits
        if kind == "token":
            return head(self.dropout(out.text))
        if kind == "masked_answer":
            if positions is None:
                raise ValueError(f"task head {name!r} ({kind}) needs the positions of its [MASK] tokens")
            rows = torch.arange(out.text.shape[0], device=out.text.device)
            return head(out.text[rows, positions])  # (B, n)
        if kind == "cls_linear":
            return head(out.pooled_text)  # (B, n)
        fused = self.dropout(fuse(out.pooled_text, out.pooled_image, self.fusion_method))  # (B, Dbi)
        if kind == "pair":
            return head(fused.reshape(-1, 2 * fused.shape[-1]))  # (B/2, n): consecutive pairs
        return head(fused)
