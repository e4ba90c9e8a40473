"""The bottom-up-attention Faster R-CNN: preprocessing, backbone, RPN and the res5 ROI head."""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractor.config import DetectorConfig
from extractor.images import pixel_tensor
from extractor.resnet import ConvNorm, FrozenBatchNorm2d, ResNetC4Backbone
from extractor.roi_heads import RegionOutputs, Res5ROIHeads
from extractor.rpn import RPN

RANDOM_INIT_SEED = 20240601


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Caffe/bottom-up rule: shortest edge to min_size unless the longest would exceed max_size."""
    scale = min_size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


class BottomUpDetector(nn.Module):
    """Module tree and parameter names match detectron2 / py-bottom-up-attention:
    `backbone.*`, `proposal_generator.rpn_head.*`, `roi_heads.res5.*`, `roi_heads.box_predictor.*`."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNetC4Backbone(config)
        self.proposal_generator = RPN(config, stride=ResNetC4Backbone.stride)
        self.roi_heads = Res5ROIHeads(config, stride=ResNetC4Backbone.stride)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean_bgr).view(3, 1, 1),
                             persistent=False)
        self.weights_hash = "random-init"
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> "BottomUpDetector":
        """NHWC convolutions, which tensor cores prefer (above all under bf16/fp16 autocast): the
        conv weights and the image batch in channels_last; the ROI head follows the feature map."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def random_init(self, seed: int = RANDOM_INIT_SEED) -> None:
        """Deterministic random weights (used when no weight file is given, and in tests)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, FrozenBatchNorm2d):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                    module.running_mean.zero_()
                    module.running_var.fill_(1.0 - module.eps)
                if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    weight = module.weight
                    fan_in = weight[0].numel() if weight.dim() > 1 else 1
                    std = math.sqrt(2.0 / fan_in) if not isinstance(module, nn.Embedding) else 0.1
                    weight.copy_(torch.randn(weight.shape, generator=generator) * std)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            # keep activations O(1): pixels are ~100 after mean subtraction, residual stacks grow
            self.backbone.stem.conv1.weight.mul_(0.01)
            for name, module in self.named_modules():
                if isinstance(module, ConvNorm) and name.endswith("conv3"):
                    module.norm.weight.fill_(0.2)
            # detectron2's own head initialisation
            rpn = self.proposal_generator.rpn_head
            for layer in (rpn.conv, rpn.objectness_logits, rpn.anchor_deltas):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
            predictor = self.roi_heads.box_predictor
            predictor.cls_score.weight.copy_(
                torch.randn(predictor.cls_score.weight.shape, generator=generator) * 0.01)
            predictor.bbox_pred.weight.copy_(
                torch.randn(predictor.bbox_pred.weight.shape, generator=generator) * 0.001)
        self.weights_hash = "random-init"

    # ----- preprocessing -------------------------------------------------------------------
    def preprocess(self, images_rgb: Sequence[np.ndarray | torch.Tensor]
                   ) -> Tuple[torch.Tensor, List[Tuple[int, int]], List[float]]:
        """uint8 RGB (H, W, 3) arrays or tensors -> padded BGR mean-subtracted batch (B, 3, Hmax, Wmax),
        resized sizes [(h, w)] and scales (resized / original). The uint8 pixels go to the device as
        they are (the fewest bytes, no host copy); channel order, float and resize happen there."""
        cfg = self.config
        resized, sizes, scales = [], [], []
        for image in images_rgb:
            height, width = image.shape[:2]
            scale = resize_scale(height, width, cfg.test_min_size, cfg.test_max_size)
            new_h, new_w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
            tensor = (image if isinstance(image, torch.Tensor) else pixel_tensor(image)).to(self.device)
            tensor = tensor.permute(2, 0, 1).flip(0).float().unsqueeze(0)  # (1, 3, H, W) BGR
            tensor = F.interpolate(tensor, size=(new_h, new_w), mode="bilinear", align_corners=False)
            resized.append(tensor[0] - self.pixel_mean)
            sizes.append((new_h, new_w))
            scales.append(scale)
        max_h = max(s[0] for s in sizes)
        max_w = max(s[1] for s in sizes)
        batch = torch.zeros((len(resized), 3, max_h, max_w), device=self.device)
        for index, tensor in enumerate(resized):
            batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, sizes, scales

    # ----- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images_rgb: Sequence[np.ndarray | torch.Tensor],
                given_boxes: Optional[Sequence[Optional[np.ndarray]]] = None
                ) -> Tuple[List[RegionOutputs], List[float]]:
        """Run on a batch of RGB images. Without `given_boxes`, boxes are the RPN proposals;
        with them (original-image pixels, (K_i, 4) each), features are computed for those boxes.
        Returns per-image outputs in RESIZED pixels and the per-image scales."""
        batch, sizes, scales = self.preprocess(images_rgb)
        autocast_dtype = getattr(self, "autocast_dtype", None)
        with torch.autocast(device_type=self.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            features = self.backbone(batch)  # (B, C4, h, w)
            if given_boxes is None:
                boxes = self.proposal_generator(features, sizes)
            else:
                boxes = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4),
                                         device=self.device) * scale
                         for b, scale in zip(given_boxes, scales)]
            outputs = self.roi_heads(features, boxes)
        return outputs, scales


def build_detector(config: DetectorConfig, weights: Optional[str] = None, device: str = "cpu",
                   seed: int = RANDOM_INIT_SEED, channels_last: bool = True) -> BottomUpDetector:
    """Build, load weights (strict) or warn loudly and random-init, move to device, eval mode.
    channels_last: NHWC convolutions, 1.2-1.3x faster on this project's CPU (extract_benchmark.py)
    and the tensor cores' layout on a GPU."""
    from extractor.weights import load_detector_weights

    model = BottomUpDetector(config)
    if weights:
        load_detector_weights(model, weights)
    else:
        warnings.warn(
            "\n" + "!" * 78 + "\n!! vilbert-extract: NO DETECTOR WEIGHTS GIVEN (--weights). Using a seeded RANDOM\n"
            "!! initialisation: boxes, classes and features are meaningless. Pass the\n"
            "!! bottom-up-attention weights for real features.\n" + "!" * 78,
            stacklevel=2)
        model.random_init(seed)
    return model.to(device).use_channels_last(channels_last).eval()
