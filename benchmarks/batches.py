"""Synthetic pretraining batches for the benchmarks: the trainer's host batch, the loader's compact
form, and the official model's arguments (36 tokens, 36 regions + [IMG], 15 % masked tokens and
regions, half the captions mismatched)."""
from __future__ import annotations

import torch

from vilbert import IGNORE_INDEX


def make_batch(cfg, B: int, T: int = 36, R: int = 37, aligned_only: bool = False, seed: int = 0) -> dict:
    """A host batch in the trainer's contract (pipelines/data/batching.py), but with the full
    (B, R, C) region targets: `ours()` makes the compact (M, C) rows the loader sends."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    lm = torch.randint(1, cfg.vocab_size, (B, T), generator=g)
    lm[torch.rand(B, T, generator=g) > 0.15] = IGNORE_INDEX
    lm[:, 0] = IGNORE_INDEX
    align = torch.zeros(B, dtype=torch.long) if aligned_only else (torch.rand(B, generator=g) < 0.5).long()
    regions = (torch.rand(B, R, generator=g) < 0.15).long()
    regions[:, 0] = 0
    lm[align == 1], regions[align == 1] = IGNORE_INDEX, 0  # objective 1: negatives carry no targets
    return dict(
        input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids), lm_labels=lm,
        image_feat=torch.randn(B, R, cfg.v_feature_size, generator=g), image_loc=torch.rand(B, R, 5, generator=g),
        image_mask=torch.ones(B, R, dtype=torch.long), region_labels=regions,
        region_targets=torch.softmax(torch.randn(B, R, cfg.v_target_size, generator=g), -1), align_labels=align,
    )


def ours(batch: dict, half: bool = False) -> dict:
    """The loader's form: compact targets of the masked regions; float16 features on a GPU
    (DataConfig.half_features, as vilbert-train sets there)."""
    out = dict(batch, region_targets=batch["region_targets"][batch["region_labels"] == 1])
    if half:
        out["image_feat"], out["region_targets"] = out["image_feat"].half(), out["region_targets"].half()
    return out


def official_inputs(batch: dict) -> dict:
    """Our batch -> the official forward's arguments (-1 = no MLM label; regions without [IMG])."""
    return dict(
        input_ids=batch["input_ids"], image_feat=batch["image_feat"], image_loc=batch["image_loc"],
        token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"],
        image_attention_mask=batch["image_mask"], masked_lm_labels=batch["lm_labels"].masked_fill(
            batch["lm_labels"] == IGNORE_INDEX, -1),
        image_label=batch["region_labels"][:, 1:], image_target=batch["region_targets"][:, 1:],
        next_sentence_label=batch["align_labels"],
    )
