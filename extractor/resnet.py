"""ResNet building blocks with detectron2's module layout, so state-dict keys match
(`stem.conv1.weight`, `res2.0.conv1.norm.running_mean`, `res2.0.shortcut.weight`, ...)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from extractor.config import DetectorConfig


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all stored as buffers (detectron2)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm as y = x * scale + shift.  -> (C,), (C,)"""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class ConvNorm(nn.Conv2d):
    """A bias-free conv whose `.norm` child is a FrozenBatchNorm2d (detectron2's Conv2d(norm=...)).

    Runs as one conv with the norm folded in: weight * scale and a bias of shift, computed from the
    stored tensors at each call (so loading weights needs no extra step; a pass over the weights is
    cheap next to the activations). Saves the two elementwise passes over every conv output that
    applying the norm after the conv costs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.norm.scale_and_shift()  # (C_out,) each
        return self._conv_forward(x, self.weight * scale.view(-1, 1, 1, 1), shift)


class BasicStem(nn.Module):
    """7x7/2 conv + norm + ReLU + 3x3/2 max-pool (Caffe variant: padding 0, ceil_mode)."""

    def __init__(self, out_channels: int, caffe_maxpool: bool):
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3)
        self.caffe_maxpool = caffe_maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block; stride in the 1x1 conv (MSRA/Caffe weights)."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int,
                 stride: int = 1, dilation: int = 1):
        super().__init__()
        if in_channels != out_channels:
            self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride)
        else:
            self.shortcut = None
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, padding=dilation,
                              dilation=dilation)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place on the fresh conv outputs: no new buffer per ReLU and residual add
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def make_stage(num_blocks: int, in_channels: int, bottleneck_channels: int, out_channels: int,
               first_stride: int, dilation: int = 1) -> nn.Sequential:
    blocks: List[nn.Module] = []
    for index in range(num_blocks):
        blocks.append(BottleneckBlock(in_channels, bottleneck_channels, out_channels,
                                      stride=first_stride if index == 0 else 1, dilation=dilation))
        in_channels = out_channels
    return nn.Sequential(*blocks)


class ResNetC4Backbone(nn.Module):
    """stem + res2..res4; output is the stride-16 res4 map that feeds the RPN and the ROI pooler."""

    stride = 16

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.stem = BasicStem(config.stem_out_channels, config.caffe_maxpool)
        in_channels = config.stem_out_channels
        out_channels = config.res2_out_channels
        bottleneck = config.width_per_group
        for stage_index, name in enumerate(("res2", "res3", "res4")):
            stage = make_stage(config.blocks_per_stage[stage_index], in_channels, bottleneck,
                               out_channels, first_stride=1 if stage_index == 0 else 2)
            self.add_module(name, stage)
            in_channels, out_channels, bottleneck = out_channels, out_channels * 2, bottleneck * 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C4, H/16, W/16)
        x = self.stem(images)
        return self.res4(self.res3(self.res2(x)))


def make_res5_head(config: DetectorConfig) -> nn.Sequential:
    """res5 as the per-region head; bottom-up variant keeps stride 1 and dilates every 3x3 conv."""
    dilated = config.res5_dilation > 1
    return make_stage(config.blocks_per_stage[3], config.res4_channels, config.width_per_group * 8,
                      config.feature_dim, first_stride=1 if dilated else 2,
                      dilation=config.res5_dilation)
