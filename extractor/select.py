"""The bottom-up-attention region-selection rule (as used for ViLBERT / VL-BERT / LXMERT features).

For each foreground class, NMS (IoU 0.3) over the proposals scored by that class; every proposal
keeps the best score among the classes in which it survived (0 if none); keep proposals with that
score >= conf_threshold, but at least `min_boxes` and at most `max_boxes`, taking the best scores.
Caffe's generate_tsv.py runs it on the boxes in original-image pixels with +1 areas
(`box_offset=1`) and keeps the regions of the threshold branch in proposal order
(`threshold_order="proposal"`); the other two branches sort by score, ties later proposal first
(np.argsort(max_conf)[::-1]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from extractor.boxes import exclusive, iou_offset
from extractor.recipes import Recipe


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
                 nms_iou: float = 0.3, box_offset: float = 1.0, threshold_order: str = "proposal"):
        if not 0 < min_boxes <= max_boxes:
            raise ValueError(f"need 0 < min_boxes <= max_boxes, got {min_boxes}, {max_boxes}")
        if threshold_order not in ("proposal", "score"):
            raise ValueError(f"threshold_order must be 'proposal' or 'score', got {threshold_order!r}")
        self.box_offset = box_offset
        self.threshold_order = threshold_order
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
        keep = batched_nms(exclusive(boxes[proposal_ids].float(), self.box_offset), scores.float(), class_ids,
                           self.nms_iou)
        return best.scatter_reduce(0, proposal_ids[keep], scores[keep], reduce="amax")

    def best_surviving_scores_all_pairs(self, boxes: torch.Tensor, class_scores: torch.Tensor
                                        ) -> torch.Tensor:
        """Same rule over every (proposal, class) pair, as one greedy NMS run for all classes at
        once on a shared IoU matrix (per-class loops cost ~C kernel calls).  -> (R,)"""
        count, classes = class_scores.shape
        overlaps = iou_offset(boxes, self.box_offset) > self.nms_iou  # (R, R)
        order = torch.argsort(class_scores, dim=0, descending=True, stable=True)  # (R, C)
        columns = torch.arange(classes, device=boxes.device)
        suppressed = torch.zeros((classes, count), dtype=torch.bool, device=boxes.device)
        kept = torch.zeros_like(suppressed)  # (C, R)
        for rank in range(count):
            candidate = order[rank]  # (C,) the rank-th best proposal of every class
            alive = ~suppressed[columns, candidate]
            kept[columns, candidate] = alive
            suppressed |= alive[:, None] & overlaps[candidate]
        return torch.where(kept.T, class_scores, torch.zeros_like(class_scores)).amax(dim=1)

    def best_surviving_scores_top_pairs(self, boxes: torch.Tensor, class_scores: torch.Tensor, wanted: int,
                                        pairs: int = 1_000) -> torch.Tensor:
        """When too few proposals reach the threshold: the same exact rule with the floor at the
        score of the `pairs`-th best (proposal, class) pair, widened 4x until `wanted` proposals
        have an exact best score (>= floor); every pair at last: the all-pairs loop.  -> (R,)
        One batched NMS call per try instead of a loop over every proposal rank (1,000 pairs: 4,000
        coordinates, where torchvision still runs one NMS kernel, not one per class)."""
        flat = class_scores.flatten()
        while pairs < flat.numel():
            floor = flat.topk(pairs).values[-1]
            best = self.best_surviving_scores(boxes, class_scores, floor)
            if int((best >= floor).sum()) >= wanted:
                return best
            pairs *= 4
        return self.best_surviving_scores_all_pairs(boxes, class_scores)

    @classmethod
    def for_recipe(cls, recipe: Recipe, min_boxes: int = 10, max_boxes: int = 36, conf_threshold: float = 0.2,
                   nms_iou: float = 0.3) -> "RegionSelector":
        return cls(min_boxes, max_boxes, conf_threshold, nms_iou, box_offset=recipe.box_offset,
                   threshold_order=recipe.threshold_order)

    def by_score(self, best: torch.Tensor) -> torch.Tensor:
        """Indices by descending score; ties: the later proposal first under Caffe's rule
        (np.argsort()[::-1]), the earlier under the detectron2 ports' stable sort.  (R,) -> (R,)"""
        if self.threshold_order == "proposal":
            return torch.argsort(best, stable=True).flip(0)
        return torch.argsort(best, descending=True, stable=True)

    def __call__(self, boxes: torch.Tensor, fg_class_scores: torch.Tensor) -> Selection:
        """boxes (R, 4) proposals in original-image pixels (the +1 rule is not scale-free), in
        proposal order; fg_class_scores (R, C) class probabilities WITHOUT background."""
        count = boxes.shape[0]
        if count == 0:
            return Selection(torch.zeros(0, dtype=torch.long), torch.zeros(0))
        wanted = min(self.min_boxes, count)
        # cheap pass: only pairs above the threshold; exact whenever enough proposals reach it
        best = self.best_surviving_scores(boxes, fg_class_scores, self.conf_threshold)
        confident = int((best >= self.conf_threshold).sum())  # exact, and the same after a lower floor
        if confident < wanted:
            best = self.best_surviving_scores_top_pairs(boxes, fg_class_scores, wanted)
        if self.min_boxes <= confident <= self.max_boxes and self.threshold_order == "proposal":
            indices = (best >= self.conf_threshold).nonzero().squeeze(1)  # np.where: proposal order
        else:
            indices = self.by_score(best)[:max(min(confident, self.max_boxes), wanted)]
        return Selection(indices=indices, scores=best[indices])
