"""Pretraining heads (masked language, masked region, alignment; VL-BERT's region classifier and
relationship head) and their losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # lm_labels value for tokens that are not predicted


class PredictionTransform(nn.Module):
    """dense -> GELU -> LayerNorm, before a prediction decoder."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class MaskedLanguageHead(nn.Module):
    """Transform + decoder tied to the word embeddings + output bias."""

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionTransform(config.hidden_size, config.layer_norm_eps)
        # Tied to the input embeddings; kept out of the module tree so the weight is saved once.
        self.__dict__["word_embeddings"] = word_embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(x), self.word_embeddings.weight, self.bias)  # (..., V)


class MaskedRegionHead(nn.Module):
    """Predicts the detector's class distribution (logits over v_target_size classes)."""

    def __init__(self, config, dim: int):
        super().__init__()
        self.transform = PredictionTransform(dim, config.layer_norm_eps)
        self.decoder = nn.Linear(dim, config.v_target_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))  # (..., C)


class RegionClassHead(nn.Module):
    """VL-BERT's masked-RoI classifier: dense -> GELU -> logits over v_target_size classes (no LayerNorm)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.decoder = nn.Linear(config.hidden_size, config.v_target_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(F.gelu(self.dense(x)))  # (..., C)


def fuse(pooled_text: torch.Tensor, pooled_image: torch.Tensor, method: str) -> torch.Tensor:
    """h_CLS and h_IMG -> one vector: elementwise product ("mul") or sum ("sum")."""
    return pooled_text * pooled_image if method == "mul" else pooled_text + pooled_image


class AlignmentHead(nn.Module):
    """fuse(h_CLS, h_IMG) -> dropout -> Linear(2). Class 0 = aligned, 1 = not aligned (official)."""

    def __init__(self, config):
        super().__init__()
        self.fusion_method = config.fusion_method
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(config.bi_hidden_size, 2)

    def forward(self, pooled_text: torch.Tensor, pooled_image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(fuse(pooled_text, pooled_image, self.fusion_method)))  # (B, 2)


class RelationshipHead(nn.Module):
    """VL-BERT's sentence-image relationship head: Linear(2) on the pooled [CLS]; the image's own
    pooled vector is not read. Class 0 = aligned, as AlignmentHead (the official head's rows are
    swapped on conversion: there 1 = the image's own caption)."""

    def __init__(self, config):
        super().__init__()
        self.classifier = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled_text: torch.Tensor, pooled_image: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(pooled_text)  # (B, 2)


# ---- losses -------------------------------------------------------------------------------

def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the selected masked tokens; rows labelled IGNORE_INDEX (the padding
    of a fixed-capacity selection) do not count; 0 when no row counts.

    logits (N, V), labels (N,)."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def masked_region_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over classes, averaged over the given regions.

    logits (N, C), target (N, C) (a distribution per row), valid (N,) bool: the rows that count
    (None: all). Zero when no row counts (no division by 0)."""
    log_pred = F.log_softmax(logits.float(), dim=-1)
    kl = F.kl_div(log_pred, target.float(), reduction="none").sum(-1)  # (N,)
    if valid is None:
        return kl.sum() / max(1, kl.shape[0])
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def soft_cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor,
                            valid: torch.Tensor | None = None) -> torch.Tensor:
    """VL-BERT's masked-RoI classification loss: -sum_c target_c log softmax(logits)_c, averaged over the
    given regions (the official `soft_cross_entropy`; it differs from the KL by the targets' entropy, a
    constant). logits (N, C), target (N, C) a distribution per row, valid (N,) bool (None: all); 0 when
    no row counts."""
    ce = -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # (N,)
    if valid is None:
        return ce.sum() / max(1, ce.shape[0])
    return (ce * valid).sum() / valid.sum().clamp(min=1)


def alignment_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """2-way cross-entropy; logits (B, 2), labels (B,) with 0 = aligned."""
    return F.cross_entropy(logits.float(), labels)
