"""Box arithmetic shared by the RPN and the region selection, in both recipes' conventions
(extractor/recipes.py). `offset` 1 is Caffe's +1 pixel rule: a box [x1, x2] is x2 - x1 + 1 wide;
offset 0 is detectron2's: x2 - x1."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch
from torchvision.ops import box_iou, nms

SCALE_CLAMP = math.log(1000.0 / 16)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """Anchors centred on (0, 0), ordered size-major then aspect ratio.  # (A, 4)"""
    anchors = []
    for size in sizes:
        area = size ** 2.0
        for ratio in aspect_ratios:
            width = math.sqrt(area / ratio)
            height = ratio * width
            anchors.append([-width / 2.0, -height / 2.0, width / 2.0, height / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def caffe_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], stride: int = 16) -> torch.Tensor:
    """Caffe's generate_anchors: each ratio applied to the stride x stride cell [0, 0, 15, 15] with
    sides rounded (np.round: half to even), then scaled by size / stride, centred on (7.5, 7.5).
    Ordered size-major like cell_anchors, the channel order of the detectron2-format weight files.  # (A, 4)"""
    centre = (stride - 1) / 2.0
    anchors = []
    for size in sizes:
        scale = size / stride
        for ratio in aspect_ratios:
            width = float(np.round(np.sqrt(stride * stride / ratio)))
            height = float(np.round(width * ratio))
            width, height = width * scale, height * scale
            anchors.append([centre - 0.5 * (width - 1), centre - 0.5 * (height - 1),
                            centre + 0.5 * (width - 1), centre + 0.5 * (height - 1)])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(base: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """Every anchor at every feature-map cell, cell-major.  # (H * W * A, 4)"""
    shifts_x = torch.arange(width, dtype=torch.float32, device=base.device) * stride
    shifts_y = torch.arange(height, dtype=torch.float32, device=base.device) * stride
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.view(1, -1, 4)).reshape(-1, 4)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor,
                 weights: Tuple[float, float, float, float], offset: float = 0.0, clamp: bool = True
                 ) -> torch.Tensor:
    """Decode (dx, dy, dw, dh) deltas relative to boxes.  deltas (R, 4k), boxes (R, 4) -> (R, 4k)
    With offset 1 (Caffe's bbox_transform_inv) widths are x2 - x1 + 1 and, as there, the decoded
    x2 is centre + w / 2 (no - 1); clamp: detectron2's cap on dw, dh (Caffe has none)."""
    deltas = deltas.float()
    boxes = boxes.float()
    widths = boxes[:, 2] - boxes[:, 0] + offset
    heights = boxes[:, 3] - boxes[:, 1] + offset
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw, dh = deltas[:, 2::4] / ww, deltas[:, 3::4] / wh
    if clamp:
        dw, dh = dw.clamp(max=SCALE_CLAMP), dh.clamp(max=SCALE_CLAMP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                       pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: float, width: float, offset: float = 0.0) -> torch.Tensor:
    """Clamp x to [0, width - offset] and y to [0, height - offset].  # (R, 4)"""
    x = boxes[:, 0::2].clamp(min=0, max=width - offset)
    y = boxes[:, 1::2].clamp(min=0, max=height - offset)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def box_sides(boxes: torch.Tensor, offset: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Widths and heights.  (R, 4) -> (R,), (R,)"""
    return boxes[:, 2] - boxes[:, 0] + offset, boxes[:, 3] - boxes[:, 1] + offset


def exclusive(boxes: torch.Tensor, offset: float) -> torch.Tensor:
    """Boxes whose x2, y2 are moved out by offset: torchvision's IoU (areas (x2 - x1)(y2 - y1),
    overlaps min(x2) - max(x1)) of these is exactly the +1-pixel IoU of the originals.  # (R, 4)"""
    if not offset:
        return boxes
    return boxes + boxes.new_tensor([0.0, 0.0, offset, offset])


def nms_offset(boxes: torch.Tensor, scores: torch.Tensor, iou: float, offset: float = 0.0) -> torch.Tensor:
    """Greedy NMS (suppress IoU > iou) in the given pixel convention. -> kept indices, best first"""
    return nms(exclusive(boxes.float(), offset), scores.float(), iou)


def iou_offset(boxes: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Pairwise IoU in the given pixel convention.  (R, 4) -> (R, R)"""
    boxes = exclusive(boxes.float(), offset)
    return box_iou(boxes, boxes)
