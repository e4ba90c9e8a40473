"""The bottom-up-attention Faster R-CNN: preprocessing, backbone, RPN and the res5 ROI head."""
from __future__ import annotations

import math
import warnings
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractor.config import DetectorConfig
from extractor.images import pixel_tensor
from extractor.resnet import ResNetC4Backbone
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
        self.random_seed = RANDOM_INIT_SEED
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
        """Deterministic random weights (used when no weight file is given, and in tests). Each
        module draws from its own generator, seeded by `seed` and its name, and is recognised by
        what it holds, so any backend with these parameter names (extractor/backend_detectron2.py)
        gets the same weights for a seed, and an optional head leaves the others' weights alone."""

        def draw(name: str, tensor: torch.Tensor, std: float) -> None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)

        with torch.no_grad():
            for name, module in self.named_modules():
                if hasattr(module, "running_mean") and hasattr(module, "running_var"):  # a frozen BatchNorm
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                    module.running_mean.zero_()
                    module.running_var.fill_(1.0 - module.eps)
                elif isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    weight = module.weight
                    fan_in = weight[0].numel() if weight.dim() > 1 else 1
                    draw(name, weight, 0.1 if isinstance(module, nn.Embedding) else math.sqrt(2.0 / fan_in))
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            # keep activations O(1): pixels are ~100 after mean subtraction, residual stacks grow
            self.backbone.stem.conv1.weight.mul_(0.01)
            for name, module in self.named_modules():  # after the norms above (a conv3's norm is its child)
                if name.endswith("conv3") and hasattr(module, "norm"):
                    module.norm.weight.fill_(0.2)
            # detectron2's own head initialisation
            rpn = self.proposal_generator.rpn_head
            for name in ("conv", "objectness_logits", "anchor_deltas"):
                draw(f"proposal_generator.rpn_head.{name}", getattr(rpn, name).weight, 0.01)
            predictor = self.roi_heads.box_predictor
            draw("roi_heads.box_predictor.cls_score", predictor.cls_score.weight, 0.01)
            draw("roi_heads.box_predictor.bbox_pred", predictor.bbox_pred.weight, 0.001)
        self.weights_hash = "random-init"
        self.random_seed = seed

    # ----- preprocessing -------------------------------------------------------------------
    def prepare(self, image: np.ndarray | torch.Tensor) -> Tuple[torch.Tensor, float]:
        """One uint8 RGB (H, W, 3) array or tensor -> the network input (3, h, w) on the device,
        BGR minus the pixel mean, resized by the recipe's rule; and its scale (resized / original)."""
        cfg = self.config
        height, width = image.shape[:2]
        scale = resize_scale(height, width, cfg.test_min_size, cfg.test_max_size)
        if cfg.recipe.resize == "opencv-scale":
            return resize_like_caffe(image, scale, cfg.pixel_mean_bgr).to(self.device), scale
        new_h, new_w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
        # the uint8 pixels go to the device as they are (the fewest bytes); channel order, float
        # and resize happen there
        tensor = (image if isinstance(image, torch.Tensor) else pixel_tensor(image)).to(self.device)
        tensor = tensor.permute(2, 0, 1).flip(0).float().unsqueeze(0)  # (1, 3, H, W) BGR
        tensor = F.interpolate(tensor, size=(new_h, new_w), mode="bilinear", align_corners=False)
        return tensor[0] - self.pixel_mean, scale

    def backbone_by_size(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        """res4 features of each input [(3, h_i, w_i)] -> [(1, C4, h_i/16, w_i/16)]. Inputs of the
        same size run as one batch and nothing is ever padded, so an image's features do not
        depend on the other images of its batch."""
        groups: Dict[Tuple[int, int], List[int]] = {}
        for index, tensor in enumerate(inputs):
            groups.setdefault(tuple(tensor.shape[1:]), []).append(index)
        features: List[Optional[torch.Tensor]] = [None] * len(inputs)
        for members in groups.values():
            batch = torch.stack([inputs[i] for i in members])  # (G, 3, h, w)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            output = self.backbone(batch)  # (G, C4, h/16, w/16)
            for position, index in enumerate(members):
                features[index] = output[position: position + 1]
        return features

    # ----- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images_rgb: Sequence[np.ndarray | torch.Tensor],
                given_boxes: Optional[Sequence[Optional[np.ndarray]]] = None
                ) -> Tuple[List[RegionOutputs], List[float]]:
        """Run on a batch of RGB images. Without `given_boxes`, boxes are the RPN proposals;
        with them (original-image pixels, (K_i, 4) each), features are computed for those boxes.
        Backbone and RPN see each image alone (or with images of its size), the res5 head takes
        every image's regions at once. Returns per-image outputs in RESIZED pixels and the scales."""
        prepared = [self.prepare(image) for image in images_rgb]
        inputs, scales = [p[0] for p in prepared], [p[1] for p in prepared]
        autocast_dtype = getattr(self, "autocast_dtype", None)
        with torch.autocast(device_type=self.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            features = self.backbone_by_size(inputs)  # [(1, C4, h, w)]
            if given_boxes is None:
                boxes = [self.proposal_generator(f, [tuple(x.shape[1:])], [s])[0]
                         for f, x, s in zip(features, inputs, scales)]
            else:
                boxes = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4),
                                         device=self.device) * scale
                         for b, scale in zip(given_boxes, scales)]
            outputs = self.roi_heads(features, boxes)
        return outputs, scales


def resize_like_caffe(image: np.ndarray | torch.Tensor, scale: float,
                      pixel_mean_bgr: Tuple[float, float, float]) -> torch.Tensor:
    """Caffe's _get_image_blob: the BGR image as float32 minus the (float64) pixel mean, in place,
    then cv2.resize(fx=fy=scale, INTER_LINEAR), whose output side is round(side * scale) and whose
    sampling grid follows `scale` itself (not the rounded size's ratio).  (H, W, 3) uint8 RGB -> (3, h, w)"""
    pixels = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    bgr = pixels[:, :, ::-1].astype(np.float32)
    bgr -= np.asarray(pixel_mean_bgr, dtype=np.float64)
    height, width = pixels.shape[:2]
    if round(height * scale) < 1 or round(width * scale) < 1:
        raise RuntimeError(f"a {width}x{height} image resizes to nothing at scale {scale:.4g}")
    resized = cv2.resize(bgr, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def build_detector(config: DetectorConfig, weights: Optional[str] = None, device: str = "cpu",
                   seed: int = RANDOM_INIT_SEED, channels_last: bool = True,
                   model_class: type = BottomUpDetector) -> BottomUpDetector:
    """Build, load weights (strict) or warn loudly and random-init, move to device, eval mode.
    channels_last: NHWC convolutions, 1.2-1.3x faster on this project's CPU (extract_benchmark.py)
    and the tensor cores' layout on a GPU. model_class: another backend's module with these
    parameter names (extractor/backend_detectron2.py)."""
    from extractor.weights import load_detector_weights

    model = model_class(config)
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
