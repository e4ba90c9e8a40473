"""Task metrics: box IoU, referring-expression hit rate, retrieval recall@k (VQA: vqa_eval.py)."""
from __future__ import annotations

import numpy as np
import torch


def box_iou(a, b) -> torch.Tensor:
    """IoU of every box in `a` (N, 4) with every box in `b` (K, 4), x1 y1 x2 y2 -> (N, K).
    Continuous coordinates (no +1 pixel); degenerate boxes have IoU 0."""
    a = torch.as_tensor(a, dtype=torch.float32).reshape(-1, 4)
    b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)  # (N,)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # (K,)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, K, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # (N, K)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def hit_rate(pred_boxes, gt_boxes, threshold: float = 0.5) -> tuple[float, list[bool]]:
    """Fraction of predictions whose IoU with their own ground-truth box is >= threshold."""
    pred = torch.as_tensor(np.asarray(pred_boxes, np.float32)).reshape(-1, 4)
    gt = torch.as_tensor(np.asarray(gt_boxes, np.float32)).reshape(-1, 4)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predictions for {len(gt)} ground-truth boxes")
    if len(pred) == 0:
        return 0.0, []
    ious = box_iou(pred, gt).diagonal()  # (N,)
    hits = (ious >= threshold).tolist()
    return sum(hits) / len(hits), hits


def recall_at_k(scores, caption_image, ks=(1, 5, 10)) -> dict[str, float]:
    """Retrieval recall. scores: (C, I) caption x image similarity; caption_image: (C,) index of
    each caption's image. Text->image: rank of the caption's image among all images. Image->text:
    rank of the best-ranked of the image's own captions among all captions (images without a
    caption are skipped). Returns {"t2i_R@k": ..., "i2t_R@k": ...} as fractions."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    gt = torch.as_tensor(caption_image, dtype=torch.long)
    C, I = scores.shape
    own = scores[torch.arange(C), gt]  # (C,)
    t2i_rank = (scores > own[:, None]).sum(1)  # (C,) images strictly better than the right one
    # image->text: for each image, the best rank any of its captions reaches in the column
    i2t_rank = []
    for i in range(I):
        mine = (gt == i).nonzero().flatten()
        if len(mine) == 0:
            continue
        col = scores[:, i]  # (C,)
        i2t_rank.append(int((col > col[mine].max()).sum()))
    i2t_rank = torch.tensor(i2t_rank)
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i_rank < k).double().mean())
        out[f"i2t_R@{k}"] = float((i2t_rank < k).double().mean()) if len(i2t_rank) else 0.0
    return out
