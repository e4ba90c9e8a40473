"""Detector configuration: the real bottom-up-attention ResNet-101 C4 and a tiny test variant."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Tuple

from extractor.recipes import DEFAULT_RECIPE, Recipe, get_recipe

CAFFE_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that fixes the network's shape and its test-time behaviour.

    Channel widths follow detectron2's ResNet conventions: res2 has `res2_out_channels` outputs and
    `width_per_group` bottleneck channels, and each later stage doubles both. res5 lives in the ROI
    head (C4 design), so `feature_dim` = res2_out_channels * 8 (2048 for ResNet-101).
    """

    name: str = "bottom-up-attention-R101-C4-VG"
    blocks_per_stage: Tuple[int, int, int, int] = (3, 4, 23, 3)  # res2, res3, res4, res5
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    width_per_group: int = 64
    res5_dilation: int = 2  # bottom-up: res5 first block stride 1, every res5 conv2 dilation 2
    caffe_maxpool: bool = True  # stem max-pool with padding 0 and ceil_mode (Caffe)
    rpn_hidden_channels: int = 512
    anchor_sizes: Tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    anchor_aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_nms_iou: float = 0.7
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    pooler_resolution: int = 14  # ROIPool on res4 (stride 16)
    num_classes: int = 1600  # foreground classes; the classifier has num_classes + 1 outputs
    num_attributes: int = 400  # attribute head (optional) has num_attributes + 1 outputs
    use_attributes: bool = False
    cls_agnostic_bbox_reg: bool = False
    bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    pixel_mean_bgr: Tuple[float, float, float] = CAFFE_PIXEL_MEAN_BGR
    test_min_size: int = 600
    test_max_size: int = 1000
    recipe_name: str = DEFAULT_RECIPE  # extractor/recipes.py: the test-time conventions (caffe, detectron2)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def feature_dim(self) -> int:
        return self.res2_out_channels * 8

    @property
    def res4_channels(self) -> int:
        return self.res2_out_channels * 4

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_aspect_ratios)

    @property
    def attr_embed_dim(self) -> int:
        return self.feature_dim // 8

    @property
    def attr_hidden_dim(self) -> int:
        return self.feature_dim // 4

    @property
    def recipe(self) -> Recipe:
        return get_recipe(self.recipe_name)

    def replace(self, **changes) -> "DetectorConfig":
        return dataclasses.replace(self, **changes)


def r101_config(use_attributes: bool = False) -> DetectorConfig:
    """The py-bottom-up-attention / unc-nlp frcnn-vg-finetuned network (Visual Genome, 1600 classes)."""
    return DetectorConfig(use_attributes=use_attributes)


def tiny_config(use_attributes: bool = True) -> DetectorConfig:
    """Same topology with 1 block per stage and width 8 (feature_dim 256): fast on CPU, for tests."""
    return DetectorConfig(
        name="bottom-up-attention-tiny",
        blocks_per_stage=(1, 1, 1, 1),
        stem_out_channels=8,
        res2_out_channels=32,
        width_per_group=8,
        rpn_hidden_channels=16,
        anchor_sizes=(16.0, 32.0, 64.0, 128.0),
        rpn_pre_nms_topk=600,
        rpn_post_nms_topk=60,
        use_attributes=use_attributes,
        test_min_size=96,
        test_max_size=160,
    )


CONFIGS = {"r101": r101_config, "tiny": tiny_config}


def get_config(name: str, use_attributes: bool = False, recipe: str = DEFAULT_RECIPE) -> DetectorConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown detector config {name!r}; choose one of {sorted(CONFIGS)}")
    get_recipe(recipe)  # a clear error for an unknown name
    return CONFIGS[name](use_attributes=use_attributes).replace(recipe_name=recipe)
