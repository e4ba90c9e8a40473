"""`--backend detectron2`: the same network assembled from detectron2's own modules.

The pieces detectron2 lacks are added by subclassing: the Caffe max-pool stem, the res4-only
backbone output, a tensor-in/tensor-out RPN head, and the attribute-aware box predictor (reused
from extractor.roi_heads). Everything else — ResNet stages, FrozenBN, the RPN head's convolutions,
ROIPool — is detectron2's, under the same parameter names, so the same weight files load. The
recipe (proposal decoding, NMS, selection) is the torch backend's: extractor/recipes.py.
tests/extractor/test_extract_detectron2.py checks both backends agree (it runs where detectron2
is installed: CI installs the wheel in ../shared/wheels/ when there is one).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from extractor.config import DetectorConfig
from extractor.detector import RANDOM_INIT_SEED, BottomUpDetector, build_detector

try:
    from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
    from detectron2.structures import Boxes
except ImportError as error:  # pragma: no cover - exercised only without detectron2
    raise ImportError("--backend detectron2 needs detectron2 (pip install "
                      "'git+https://github.com/facebookresearch/detectron2.git'); "
                      f"import failed: {error}") from error


class CaffeMaxPoolStem(BasicStem):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class TensorRPNHead(StandardRPNHead):
    """detectron2's head takes and returns lists of feature maps (one per level); C4 has one."""

    def forward(self, features: torch.Tensor):  # (B, C4, h, w) -> (B, A, h, w), (B, 4A, h, w)
        logits, deltas = super().forward([features])
        return logits[0], deltas[0]


class Res4Backbone(ResNet):
    stride = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C4, H/16, W/16)
        return super().forward(x)["res4"]


def _stage(config: DetectorConfig, index: int, in_channels: int, first_stride: int, dilation: int):
    factor = 2 ** index
    blocks = config.blocks_per_stage[index]
    return ResNet.make_stage(
        BottleneckBlock, blocks, stride_per_block=[first_stride] + [1] * (blocks - 1),
        in_channels=in_channels, bottleneck_channels=config.width_per_group * factor,
        out_channels=config.res2_out_channels * factor, norm="FrozenBN", stride_in_1x1=True,
        dilation=dilation)


class Detectron2BottomUpDetector(BottomUpDetector):
    def __init__(self, config: DetectorConfig):
        super().__init__(config)
        stem_cls = CaffeMaxPoolStem if config.caffe_maxpool else BasicStem
        stem = stem_cls(in_channels=3, out_channels=config.stem_out_channels, norm="FrozenBN")
        stages = [_stage(config, 0, config.stem_out_channels, 1, 1),
                  _stage(config, 1, config.res2_out_channels, 2, 1),
                  _stage(config, 2, config.res2_out_channels * 2, 2, 1)]
        self.backbone = Res4Backbone(stem, stages, out_features=["res4"])
        self.proposal_generator.rpn_head = TensorRPNHead(
            in_channels=config.res4_channels, num_anchors=config.num_anchors, box_dim=4,
            conv_dims=(config.rpn_hidden_channels,))
        dilation = config.res5_dilation
        self.roi_heads.res5 = torch.nn.Sequential(*_stage(
            config, 3, config.res4_channels, 1 if dilation > 1 else 2, dilation))
        self.d2_pooler = ROIPooler(output_size=config.pooler_resolution, scales=(1.0 / 16,),
                                   sampling_ratio=0, pooler_type="ROIPool")
        self.roi_heads.pooled_features = self._pooled_features

    def _pooled_features(self, features: List[torch.Tensor], boxes: List[torch.Tensor]) -> torch.Tensor:
        """As Res5ROIHeads.pooled_features, with detectron2's pooler: image by image, then res5 once."""
        if sum(len(b) for b in boxes) == 0:
            return features[0].new_zeros((0, self.config.feature_dim))
        pooled = torch.cat([self.d2_pooler([feature.float()], [Boxes(b.float())])
                            for feature, b in zip(features, boxes) if len(b)])
        return self.roi_heads.res5(pooled).mean(dim=(2, 3))


def build_detectron2_detector(config: DetectorConfig, weights: Optional[str], device: str = "cpu",
                              seed: int = RANDOM_INIT_SEED, channels_last: bool = True) -> BottomUpDetector:
    """extractor.detector.build_detector with this backend's module (strict loading, loud random init)."""
    return build_detector(config, weights, device, seed, channels_last, model_class=Detectron2BottomUpDetector)
