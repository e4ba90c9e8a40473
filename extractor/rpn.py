"""Region proposal network: detectron2 names (`rpn_head.conv/objectness_logits/anchor_deltas`)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from extractor.boxes import apply_deltas, cell_anchors, clip_boxes, grid_anchors
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


class RPN(nn.Module):
    def __init__(self, config: DetectorConfig, stride: int = 16):
        super().__init__()
        self.config = config
        self.stride = stride
        self.rpn_head = RPNHead(config.res4_channels, config.rpn_hidden_channels, config.num_anchors)
        self.register_buffer(
            "base_anchors", cell_anchors(config.anchor_sizes, config.anchor_aspect_ratios),
            persistent=False)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, image_sizes: Sequence[Tuple[int, int]]
                ) -> List[torch.Tensor]:
        """features (B, C, h, w); image_sizes [(H, W)] of the resized, unpadded images.
        Returns per image the proposals sorted by objectness.  [(R_i, 4)]"""
        logits, deltas = self.rpn_head(features)
        batch, num_anchors, height, width = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(batch, -1).float()  # (B, h*w*A)
        deltas = deltas.view(batch, num_anchors, 4, height, width).permute(0, 3, 4, 1, 2)
        deltas = deltas.reshape(batch, -1, 4)  # (B, h*w*A, 4)
        anchors = grid_anchors(self.base_anchors, height, width, self.stride)  # (h*w*A, 4)
        cfg = self.config
        proposals = []
        for index, (image_h, image_w) in enumerate(image_sizes):
            topk = min(cfg.rpn_pre_nms_topk, logits.shape[1])
            scores, order = logits[index].topk(topk)
            boxes = apply_deltas(deltas[index, order], anchors[order], (1.0, 1.0, 1.0, 1.0))
            boxes = clip_boxes(boxes, image_h, image_w)
            sides = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            valid = (sides > cfg.rpn_min_box_size) & torch.isfinite(boxes).all(dim=1)
            kept = valid.nonzero().squeeze(1)  # one host sync for both gathers
            boxes, scores = boxes[kept], scores[kept]
            keep = nms(boxes, scores, cfg.rpn_nms_iou)[: cfg.rpn_post_nms_topk]
            proposals.append(boxes[keep])
        return proposals
