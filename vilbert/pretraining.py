"""`ViLBert`: a backbone with the three pretraining heads, optional task heads, and the losses."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ViLBertConfig
from .heads import (
    AlignmentHead, MaskedLanguageHead, MaskedRegionHead, alignment_loss, masked_lm_loss, masked_region_loss,
)
from .model import BackboneOutput, build_backbone
from .task_heads import TaskHeads

IGNORE_INDEX = -100  # lm_labels value for tokens that are not predicted


@dataclass
class PretrainingOutput:
    backbone: BackboneOutput
    align_logits: torch.Tensor  # (B, 2), class 0 = aligned
    mlm_logits: torch.Tensor  # (N, V) at counted masked tokens, or (B, T, V) without labels
    region_logits: torch.Tensor  # (M, C) at counted masked regions, or (B, R, C) without labels
    mlm_labels: torch.Tensor | None = None  # (N,)
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    mrm_loss: torch.Tensor | None = None
    align_loss: torch.Tensor | None = None


def init_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation: N(0, std) for Linear/Embedding weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViLBert(nn.Module):
    """Backbone (`config.arch`) + masked-language, masked-region and alignment heads.

    `task_heads` declares downstream heads, name -> (kind, size); see `vilbert.task_heads`.
    """

    def __init__(self, config: ViLBertConfig, task_heads: dict | None = None):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        visual_dim = config.v_hidden_size if config.arch == "vilbert" else config.hidden_size
        self.mlm_head = MaskedLanguageHead(config, self.backbone.embeddings.word_embeddings)
        self.region_head = MaskedRegionHead(config, visual_dim)
        self.alignment_head = AlignmentHead(config)
        self.task_heads = TaskHeads(config, task_heads)
        self.apply(lambda m: init_weights(m, config.initializer_range))
        if hasattr(self.backbone, "post_init"):
            self.backbone.post_init()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        image_feat: torch.Tensor,  # (B, R, F), position 0 = [IMG]
        image_loc: torch.Tensor,  # (B, R, 5)
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, T)
        image_mask: torch.Tensor | None = None,  # (B, R)
        lm_labels: torch.Tensor | None = None,  # (B, T), IGNORE_INDEX where not predicted
        region_labels: torch.Tensor | None = None,  # (B, R), 1 = masked region to predict
        region_targets: torch.Tensor | None = None,  # (B, R, C) detector class distribution
        align_labels: torch.Tensor | None = None,  # (B,), 0 = aligned, 1 = mismatched caption
        task_ids: torch.Tensor | None = None,
        mask_loss_on_mismatch: bool = False,  # True = official "objective 0", False = "objective 1"
        **_unused,
    ) -> PretrainingOutput:
        out = self.backbone(input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_mask, task_ids)
        align_logits = self.alignment_head(out.pooled_text, out.pooled_image)  # (B, 2)
        if lm_labels is None or region_labels is None or region_targets is None or align_labels is None:
            return PretrainingOutput(out, align_logits, self.mlm_head(out.text), self.region_head(out.image))

        text = out.text
        if self.backbone.embeddings.task_embeddings is not None:  # drop the task token
            text = torch.cat([text[:, :1], text[:, 2:]], dim=1)
        counted = torch.ones_like(align_labels, dtype=torch.bool)
        if not mask_loss_on_mismatch:
            counted = align_labels == 0
        token_sel = (lm_labels != IGNORE_INDEX) & counted[:, None]  # (B, T)
        region_sel = (region_labels == 1) & counted[:, None]  # (B, R)

        # The heads run only at the selected positions: (N, D) and (M, Dv) instead of every position.
        mlm_logits = self.mlm_head(text[token_sel])  # (N, V)
        mlm_labels = lm_labels[token_sel]  # (N,)
        region_logits = self.region_head(out.image[region_sel])  # (M, C)

        mlm = masked_lm_loss(mlm_logits, mlm_labels)
        mrm = masked_region_loss(region_logits, region_targets[region_sel])
        align = alignment_loss(align_logits, align_labels)
        return PretrainingOutput(
            out, align_logits, mlm_logits, region_logits, mlm_labels,
            loss=mlm + mrm + align, mlm_loss=mlm, mrm_loss=mrm, align_loss=align,
        )

    def task_logits(self, name: str, out: BackboneOutput, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.task_heads(name, out, image_mask)
