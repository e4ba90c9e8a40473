"""The bottom-up-attention region-selection rule (as used for ViLBERT / VL-BERT / LXMERT features).

For each foreground class, NMS (IoU 0.3) over the proposals scored by that class; every proposal
keeps the best score among the classes in which it survived (0 if none); keep proposals with that
score >= conf_threshold, but at least `min_boxes` and at most `max_boxes`, taking the best scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms


@dataclass
class Selection:
    indices: torch.Tensor  # (N,) proposal indices, best score first
    scores: torch.Tensor  # (N,) best surviving class score of each


def background_first(probs: torch.Tensor, background_last: bool = True) -> torch.Tensor:
    """Move the background column to column 0 (the shard convention).  (R, C+1) -> (R, C+1)"""
    if not background_last:
        return probs
    return torch.cat([probs[:, -1:], probs[:, :-1]], dim=1)


class RegionSelector:
    def __init__(self, min_boxes: int = 10, max_boxes: int = 36, conf_threshold: float = 0.2,
                 nms_iou: float = 0.3):
        if not 0 < min_boxes <= max_boxes:
            raise ValueError(f"need 0 < min_boxes <= max_boxes, got {min_boxes}, {max_boxes}")
        self.min_boxes = min_boxes
        self.max_boxes = max_boxes
        self.conf_threshold = conf_threshold
        self.nms_iou = nms_iou

    def best_surviving_scores(self, boxes: torch.Tensor, class_scores: torch.Tensor,
                              floor: float) -> torch.Tensor:
        """boxes (R, 4), class_scores (R, C) foreground only -> (R,) best surviving score.
        Only (proposal, class) pairs scoring >= floor enter NMS; greedy NMS never lets a lower
        score suppress a higher one, so every returned score >= floor is exact."""
        proposal_ids, class_ids = torch.nonzero(class_scores >= floor, as_tuple=True)
        scores = class_scores[proposal_ids, class_ids]
        best = class_scores.new_zeros(class_scores.shape[0])
        if len(scores) == 0:
            return best
        keep = batched_nms(boxes[proposal_ids].float(), scores.float(), class_ids, self.nms_iou)
        return best.scatter_reduce(0, proposal_ids[keep], scores[keep], reduce="amax")

    def __call__(self, boxes: torch.Tensor, fg_class_scores: torch.Tensor) -> Selection:
        """boxes (R, 4) proposals; fg_class_scores (R, C) class probabilities WITHOUT background."""
        count = boxes.shape[0]
        if count == 0:
            return Selection(torch.zeros(0, dtype=torch.long), torch.zeros(0))
        wanted = min(self.min_boxes, count)
        # cheap pass at the threshold; then lower floors (exact, see above) if too few reach it
        kth_max = fg_class_scores.max(dim=1).values.kthvalue(count - wanted + 1).values.item()
        start = min(self.conf_threshold, kth_max)
        for floor in (self.conf_threshold, start, start / 2, start / 8, start / 64, 0.0):
            best = self.best_surviving_scores(boxes, fg_class_scores, floor)
            if floor == 0.0 or int((best >= floor).sum()) >= wanted:
                break
        order = torch.argsort(best, descending=True, stable=True)
        confident = int((best >= self.conf_threshold).sum())
        count_kept = max(min(confident, self.max_boxes), wanted)
        indices = order[:count_kept]
        return Selection(indices=indices, scores=best[indices])
