"""Region proposal network: detectron2 names (`rpn_head.conv/objectness_logits/anchor_deltas`)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from extractor.boxes import (
    apply_deltas,
    box_sides,
    caffe_cell_anchors,
    cell_anchors,
    clip_boxes,
    grid_anchors,
    nms_offset,
)
from extractor.config import DetectorConfig


class RPNHead(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden_channels, num_anchors * 4, 1)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(features))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)  # (B,A,h,w), (B,4A,h,w)


def top_proposals(boxes: torch.Tensor, scores: torch.Tensor, image_size: Tuple[int, int], scale: float,
                  config: DetectorConfig) -> torch.Tensor:
    """The proposal layer after decoding: boxes (N, 4) of every anchor, scores (N,) -> the kept
    proposals best first (P, 4). Caffe (proposal_layer.py): clip to [0, W - 1], drop boxes with a
    side + 1 < 16 * scale, then the pre-NMS top-k, NMS with +1 areas, the post-NMS top-k.
    detectron2: the pre-NMS top-k first, clip to [0, W], drop empty boxes, NMS, top-k."""
    recipe, height, width = config.recipe, image_size[0], image_size[1]
    if not recipe.filter_before_topk:
        scores, order = scores.topk(min(config.rpn_pre_nms_topk, len(scores)))
        boxes = boxes[order]
    boxes = clip_boxes(boxes, height, width, recipe.box_offset)
    box_w, box_h = box_sides(boxes, recipe.box_offset)
    if recipe.filter_before_topk:
        valid = (box_w >= recipe.rpn_min_size * scale) & (box_h >= recipe.rpn_min_size * scale)
    else:
        valid = (box_w > recipe.rpn_min_size) & (box_h > recipe.rpn_min_size)
    kept = (valid & torch.isfinite(boxes).all(dim=1)).nonzero().squeeze(1)  # one host sync for both gathers
    boxes, scores = boxes[kept], scores[kept]
    if recipe.filter_before_topk:
        scores, order = scores.topk(min(config.rpn_pre_nms_topk, len(scores)))
        boxes = boxes[order]
    keep = nms_offset(boxes, scores, config.rpn_nms_iou, recipe.box_offset)[: config.rpn_post_nms_topk]
    return boxes[keep]


class RPN(nn.Module):
    def __init__(self, config: DetectorConfig, stride: int = 16):
        super().__init__()
        self.config = config
        self.stride = stride
        self.rpn_head = RPNHead(config.res4_channels, config.rpn_hidden_channels, config.num_anchors)
        # detectron2's anchors: what HF weight files store (and the loader checks); Caffe's: its recipe's
        self.register_buffer(
            "base_anchors", cell_anchors(config.anchor_sizes, config.anchor_aspect_ratios),
            persistent=False)
        self.register_buffer(
            "caffe_anchors", caffe_cell_anchors(config.anchor_sizes, config.anchor_aspect_ratios, stride),
            persistent=False)

    def head_outputs(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """features (B, C, h, w) -> objectness logits (B, h*w*A) and deltas (B, h*w*A, 4), cell-major."""
        logits, deltas = self.rpn_head(features)
        batch, num_anchors, height, width = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(batch, -1).float()  # (B, h*w*A)
        deltas = deltas.view(batch, num_anchors, 4, height, width).permute(0, 3, 4, 1, 2)
        return logits, deltas.reshape(batch, -1, 4)  # (B, h*w*A, 4)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, image_sizes: Sequence[Tuple[int, int]],
                scales: Sequence[float]) -> List[torch.Tensor]:
        """features (B, C, h, w) of images of the same size (no padding); image_sizes [(H, W)] of the
        resized images; scales (resized / original). Returns per image the proposals sorted by
        objectness.  [(R_i, 4)]"""
        logits, deltas = self.head_outputs(features)
        recipe = self.config.recipe
        base = self.caffe_anchors if recipe.anchors == "caffe" else self.base_anchors
        anchors = grid_anchors(base, features.shape[2], features.shape[3], self.stride)  # (h*w*A, 4)
        proposals = []
        for index, (size, scale) in enumerate(zip(image_sizes, scales)):
            boxes = apply_deltas(deltas[index], anchors, (1.0, 1.0, 1.0, 1.0), recipe.box_offset, recipe.clamp_deltas)
            proposals.append(top_proposals(boxes, logits[index], size, scale, self.config))
        return proposals
