"""Box arithmetic shared by the RPN and ROI heads (detectron2 conventions: no +1 in widths)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

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


def grid_anchors(base: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """Every anchor at every feature-map cell, cell-major.  # (H * W * A, 4)"""
    shifts_x = torch.arange(width, dtype=torch.float32, device=base.device) * stride
    shifts_y = torch.arange(height, dtype=torch.float32, device=base.device) * stride
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.view(1, -1, 4)).reshape(-1, 4)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor,
                 weights: Tuple[float, float, float, float]) -> torch.Tensor:
    """Decode (dx, dy, dw, dh) deltas relative to boxes.  deltas (R, 4k), boxes (R, 4) -> (R, 4k)"""
    deltas = deltas.float()
    boxes = boxes.float()
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[:, 3::4] / wh).clamp(max=SCALE_CLAMP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                       pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Clamp x to [0, width] and y to [0, height].  # (R, 4)"""
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
