"""Res5 ROI head: ROIPool 14x14 on res4, res5, mean-pool, class/box predictor, optional attributes.
Parameter names follow py-bottom-up-attention: `roi_heads.res5.*`, `roi_heads.box_predictor.*`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool

from extractor.config import DetectorConfig
from extractor.resnet import make_res5_head


@dataclass
class RegionOutputs:
    """Per-image head outputs for a set of boxes (all in resized-image pixels)."""

    boxes: torch.Tensor  # (R, 4)
    features: torch.Tensor  # (R, D) mean-pooled res5
    cls_probs: torch.Tensor  # (R, C + 1), background LAST (detectron2 / HF convention)
    attr_probs: Optional[torch.Tensor] = None  # (R, A + 1), "no attribute" LAST


class FastRCNNOutputLayers(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        dim = config.feature_dim
        self.cls_score = nn.Linear(dim, config.num_classes + 1)
        reg_classes = 1 if config.cls_agnostic_bbox_reg else config.num_classes
        # Box regression: loaded with the checkpoint but never run. The bottom-up rule keeps the
        # proposals' own boxes (its regressed boxes are discarded), so computing it would be
        # 300 x 2048 x 6400 multiply-adds per image for nothing.
        self.bbox_pred = nn.Linear(dim, reg_classes * 4)
        self.use_attributes = config.use_attributes
        if config.use_attributes:
            self.cls_embedding = nn.Embedding(config.num_classes + 1, config.attr_embed_dim)
            self.fc_attr = nn.Linear(dim + config.attr_embed_dim, config.attr_hidden_dim)
            self.attr_score = nn.Linear(config.attr_hidden_dim, config.num_attributes + 1)

    def forward(self, pooled: torch.Tensor):  # (R, D)
        """-> class logits (R, C + 1) in float32 whatever the autocast (the class distributions are
        the masked-region targets, and bf16 logits tie: see class_logits), attribute logits or None."""
        class_logits = self.class_logits(pooled)  # (R, C + 1)
        attr_logits = None
        if self.use_attributes:
            predicted_class = class_logits.argmax(dim=-1)  # (R,)
            joint = torch.cat([pooled, self.cls_embedding(predicted_class).to(pooled.dtype)], dim=-1)
            attr_logits = self.attr_score(F.relu(self.fc_attr(joint)))  # (R, A + 1)
        return class_logits, attr_logits

    def class_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The classifier in float32 under any autocast: 2 of the head's 1,759 GFLOP per image, and
        bf16 logits (8 bits of mantissa) make many (proposal, class) scores tie, which swells the
        selection's NMS candidates past torchvision's single-kernel size."""
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.cls_score(pooled.float())  # (R, C + 1)


class Res5ROIHeads(nn.Module):
    def __init__(self, config: DetectorConfig, stride: int = 16):
        super().__init__()
        self.config = config
        self.spatial_scale = 1.0 / stride
        self.res5 = make_res5_head(config)
        self.box_predictor = FastRCNNOutputLayers(config)

    def pooled_features(self, features: List[torch.Tensor], boxes: List[torch.Tensor]) -> torch.Tensor:
        """features [(1, C4, h_i, w_i)] per image; boxes [(R_i, 4)] -> mean-pooled res5 features
        (sum R_i, D): ROIPool image by image, then res5 over every image's regions in one batch."""
        if sum(len(b) for b in boxes) == 0:
            return features[0].new_zeros((0, self.config.feature_dim))
        size = self.config.pooler_resolution
        pooled = torch.cat([
            roi_pool(feature.float(), torch.cat([b.new_zeros((len(b), 1)), b], dim=1).float(),  # no bf16 CPU kernel
                     output_size=(size, size), spatial_scale=self.spatial_scale)
            for feature, b in zip(features, boxes) if len(b)])  # (R, C4, 14, 14)
        # one copy into what the res5 convs take: the backbone's layout and the autocast precision
        # (left to autocast, each of the first block's two convs would cast it again)
        device = pooled.device.type
        first = features[0]
        channels_last = first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
        pooled = pooled.to(dtype=torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
                           memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self.res5(pooled).mean(dim=(2, 3))  # (R, D)

    @torch.no_grad()
    def forward(self, features: List[torch.Tensor], boxes: List[torch.Tensor]) -> List[RegionOutputs]:
        pooled = self.pooled_features(features, boxes)
        class_logits, attr_logits = self.box_predictor(pooled)
        cls_probs = class_logits.softmax(dim=-1)  # float32 logits (class_logits)
        attr_probs = None if attr_logits is None else attr_logits.float().softmax(dim=-1)
        outputs, start = [], 0
        for image_boxes in boxes:
            stop = start + len(image_boxes)
            outputs.append(RegionOutputs(
                boxes=image_boxes, features=pooled[start:stop].float(),
                cls_probs=cls_probs[start:stop],
                attr_probs=None if attr_probs is None else attr_probs[start:stop]))
            start = stop
        return outputs
