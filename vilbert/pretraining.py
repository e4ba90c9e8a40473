"""`ViLBert`: a backbone with the three pretraining heads, optional task heads, and the losses."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .config import ViLBertConfig
from .heads import (
    IGNORE_INDEX,
    AlignmentHead,
    MaskedLanguageHead,
    MaskedRegionHead,
    RegionClassHead,
    RelationshipHead,
    alignment_loss,
    masked_lm_loss,
    masked_region_loss,
    soft_cross_entropy_loss,
)
from .model import BackboneOutput, build_backbone
from .task_heads import TaskHeads


@dataclass
class PretrainingOutput:
    backbone: BackboneOutput
    align_logits: torch.Tensor  # (B, 2), class 0 = aligned
    mlm_logits: torch.Tensor  # (N, V) at counted masked tokens, or (B, T, V) without labels
    region_logits: torch.Tensor  # (M, C) at counted masked regions, or (B, R, C) without labels
    mlm_labels: torch.Tensor | None = None  # (N,), IGNORE_INDEX at the padding of a fixed-capacity selection
    overflow: torch.Tensor | None = None  # () masked positions beyond `masked_capacity` (not in the losses)
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    mrm_loss: torch.Tensor | None = None
    align_loss: torch.Tensor | None = None
    # objective "vlbert" only: the text-only rows' MLM loss, whether each predicted word is in a
    # text-only row (N,), and the masked regions' targets (M, C) and validity (M,) for accuracies
    mlm_text_loss: torch.Tensor | None = None
    mlm_text_only: torch.Tensor | None = None
    region_targets: torch.Tensor | None = None
    region_valid: torch.Tensor | None = None


def predicted_positions(lm_labels: torch.Tensor, region_labels: torch.Tensor, align_labels: torch.Tensor,
                        mask_loss_on_mismatch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked tokens (B, T) and regions (B, R) whose labels count: all of them, or with
    mask_loss_on_mismatch False (official "objective 1") only those of aligned pairs."""
    counted = torch.ones_like(align_labels, dtype=torch.bool)
    if not mask_loss_on_mismatch:
        counted = align_labels == 0
    return (lm_labels != IGNORE_INDEX) & counted[:, None], (region_labels == 1) & counted[:, None]


def masked_index(selected: torch.Tensor, capacity: int | None):
    """Flat indices of the True entries of selected (B, L), in row-major order.

    capacity None: -> index (N,), None, 0: exact (a data-dependent shape: one host sync).
    capacity K: -> index (K,), valid (K,) bool, overflow (): always K indices, the first N valid;
    no host sync and a fixed shape (for torch.compile and CUDA graphs). Entries beyond K are
    dropped and counted in `overflow`."""
    flat = selected.flatten()  # (B*L,)
    if capacity is None:
        return flat.nonzero().squeeze(1), None, torch.zeros((), dtype=torch.long, device=flat.device)
    index = torch.nonzero_static(flat, size=capacity, fill_value=0).squeeze(1)  # (K,)
    count = flat.sum()
    valid = torch.arange(capacity, device=flat.device) < count  # (K,)
    return index, valid, (count - capacity).clamp(min=0)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) -> (N, ...) at flat indices over (B, L)."""
    return x.flatten(0, 1)[index]


def masked_targets(targets: torch.Tensor, region_labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The target rows at flat positions `index` (N,) -> (N, C), from full targets (B, R, C) or
    from compact ones (M, C) that hold the region_labels == 1 positions in row-major order."""
    if targets.dim() == 3:
        return gather_rows(targets, index)
    if targets.shape[0] == 0:  # nothing masked; a fixed-capacity index still wants rows
        return targets.new_zeros(index.shape[0], targets.shape[1])
    row = (region_labels == 1).flatten().cumsum(0) - 1  # (B*R,) compact row of each masked position
    return targets[row[index].clamp(min=0)]


def default_capacity(positions: int, prob: float = 0.15) -> int:
    """A fixed number of head rows for `positions` candidates each selected with `prob`: the mean
    plus 6 standard deviations (overflow about once in 10^9 batches), a multiple of 8."""
    mean = positions * prob
    k = mean + 6 * (mean * (1 - prob)) ** 0.5 + 8
    return min(positions, int(-(-k // 8) * 8))


@dataclass
class VLBertLosses:
    loss: torch.Tensor  # () the sum of the three, VL-BERT's pretraining loss
    mlm_captions: torch.Tensor  # () MLM with visual clues, over the caption rows' masked words
    mlm_text_only: torch.Tensor  # () MLM over the text-only corpus rows' masked words
    mrc: torch.Tensor  # () masked RoI classification with linguistic clues


def vlbert_pretraining_losses(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor, text_only: torch.Tensor,
                              region_logits: torch.Tensor, region_targets: torch.Tensor,
                              region_valid: torch.Tensor | None = None) -> VLBertLosses:
    """VL-BERT's pretraining losses, as pretrain/modules/resnet_vlbert_for_pretraining_multitask.py
    computes them with MLM_LOSS_NORM_IN_BATCH_FIRST and MVRC_LOSS_NORM_IN_BATCH_FIRST false (every
    released config) and no sentence-image relationship loss: the mean cross-entropy over the masked
    words of the caption rows and, separately, of the text-only rows, plus the soft cross-entropy to
    the detector's class distribution averaged over the masked regions. The official code gives NaN
    for a part with nothing masked; here it is 0.

    mlm_logits (N, V) and mlm_labels (N,) at the predicted words (IGNORE_INDEX rows do not count),
    text_only (N,) bool: whether each word's row is a text-only one; region_logits / region_targets
    (M, C) at the masked regions, region_valid (M,) bool (None: all)."""
    captions = masked_lm_loss(mlm_logits, mlm_labels.masked_fill(text_only, IGNORE_INDEX))
    corpus = masked_lm_loss(mlm_logits, mlm_labels.masked_fill(~text_only, IGNORE_INDEX))
    mrc = soft_cross_entropy_loss(region_logits, region_targets, region_valid)
    return VLBertLosses(captions + corpus + mrc, captions, corpus, mrc)


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
        self.mlm_head = MaskedLanguageHead(config, self.backbone.embeddings.word_embeddings)
        if config.arch == "vlbert":  # VL-BERT's own heads
            self.region_head, self.alignment_head = RegionClassHead(config), RelationshipHead(config)
        else:
            self.region_head = MaskedRegionHead(config, config.v_hidden_size)
            self.alignment_head = AlignmentHead(config)
        self.task_heads = TaskHeads(config, task_heads)
        self.apply(lambda m: init_weights(m, config.initializer_range))
        if hasattr(self.backbone, "post_init"):  # VL-BERT's own initial values
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
        region_targets: torch.Tensor | None = None,  # (B, R, C) detector class distribution, or (M, C) of the
                                                     # region_labels == 1 positions only, row-major
        align_labels: torch.Tensor | None = None,  # (B,), 0 = aligned, 1 = mismatched caption
        task_ids: torch.Tensor | None = None,
        mask_loss_on_mismatch: bool = False,  # True = official "objective 0", False = "objective 1"
        masked_capacity: tuple[int, int] | None = None,  # fixed head rows (tokens, regions); see masked_index
        masked_regions: torch.Tensor | None = None,  # VL-BERT: (B, R) bool, appearance replaced in the model
        text_only: torch.Tensor | None = None,  # VL-BERT: (B,) bool, rows of a text-only corpus
        objective: str = "vilbert",  # "vlbert": VL-BERT's losses (vlbert_pretraining_losses), no alignment loss
        **_unused,
    ) -> PretrainingOutput:
        vlbert = {k: v for k, v in (("masked_regions", masked_regions), ("text_only", text_only)) if v is not None}
        if vlbert and self.config.arch != "vlbert":
            raise ValueError(f"{sorted(vlbert)} are VL-BERT inputs; this model is {self.config.arch!r}")
        if objective == "vlbert" and self.config.arch != "vlbert":
            raise ValueError(f"objective 'vlbert' is VL-BERT's; this model is {self.config.arch!r}")
        if objective not in ("vilbert", "vlbert"):
            raise ValueError(f"objective must be 'vilbert' or 'vlbert', got {objective!r}")
        out = self.backbone(input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_mask, task_ids,
                            **vlbert)
        align_logits = self.alignment_head(out.pooled_text, out.pooled_image)  # (B, 2)
        if lm_labels is None or region_labels is None or region_targets is None or align_labels is None:
            return PretrainingOutput(out, align_logits, self.mlm_head(out.text), self.region_head(out.image))

        text = out.text
        if getattr(self.backbone.embeddings, "task_embeddings", None) is not None:  # drop the task token
            text = torch.cat([text[:, :1], text[:, 2:]], dim=1)
        token_sel, region_sel = predicted_positions(lm_labels, region_labels, align_labels,
                                                    mask_loss_on_mismatch)  # (B, T), (B, R)

        # The heads run only at the selected positions: (N, D) and (M, Dv) instead of every position.
        cap_t, cap_r = masked_capacity or (None, None)
        token_idx, token_ok, token_over = masked_index(token_sel, cap_t)  # (N,)
        region_idx, region_ok, region_over = masked_index(region_sel, cap_r)  # (M,)
        mlm_labels = gather_rows(lm_labels, token_idx)  # (N,)
        if token_ok is not None:  # padding rows do not count
            mlm_labels = mlm_labels.masked_fill(~token_ok, IGNORE_INDEX)
        mlm_logits = self.mlm_head(gather_rows(text, token_idx))  # (N, V)
        region_logits = self.region_head(gather_rows(out.image, region_idx))  # (M, C)

        if objective == "vlbert":
            rows = token_idx // lm_labels.shape[1]  # (N,) the row of each predicted word
            words_text_only = (text_only[rows] if text_only is not None
                               else torch.zeros_like(rows, dtype=torch.bool))
            targets = masked_targets(region_targets, region_labels, region_idx)  # (M, C)
            parts = vlbert_pretraining_losses(mlm_logits, mlm_labels, words_text_only, region_logits, targets,
                                              region_ok)
            # no relationship loss, so the pooler and relationship head are not trained: their outputs are
            # returned detached (DDP then counts those parameters unused instead of waiting for their gradients)
            out = replace(out, pooled_text=out.pooled_text.detach(), pooled_image=out.pooled_image.detach())
            return PretrainingOutput(
                out, align_logits.detach(), mlm_logits, region_logits, mlm_labels, loss=parts.loss,
                mlm_loss=parts.mlm_captions, mrm_loss=parts.mrc, align_loss=torch.zeros_like(parts.loss),
                overflow=token_over + region_over, mlm_text_loss=parts.mlm_text_only, mlm_text_only=words_text_only,
                region_targets=targets, region_valid=region_ok,
            )
        mlm = masked_lm_loss(mlm_logits, mlm_labels)
        mrm = masked_region_loss(region_logits, masked_targets(region_targets, region_labels, region_idx), region_ok)
        align = alignment_loss(align_logits, align_labels)
        return PretrainingOutput(
            out, align_logits, mlm_logits, region_logits, mlm_labels,
            loss=mlm + mrm + align, mlm_loss=mlm, mrm_loss=mrm, align_loss=align, overflow=token_over + region_over,
        )

    def task_logits(self, name: str, out: BackboneOutput, image_mask: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.task_heads(name, out, image_mask, positions)

    def add_task_head(self, name: str, kind: str, n: int) -> None:
        """A fresh downstream head. VL-BERT's heads start their transform as a copy of the pretrained
        head's, as the official fine-tuning configs do (PARTIAL_PRETRAIN_PREFIX_CHANGES): the VQA head
        from the MLM head's transform, the referring head from the masked-RoI head's dense layer."""
        self.task_heads.add(self.config, name, kind, n)
        head = self.task_heads.heads[name]
        with torch.no_grad():
            if kind == "masked_answer":
                head.transform.load_state_dict(self.mlm_head.transform.state_dict())
            elif kind == "region_mlp":
                head.dense.load_state_dict(self.region_head.dense.state_dict())
        head.to(self.mlm_head.bias.device)
