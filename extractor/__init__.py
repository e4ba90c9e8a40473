"""Region-feature extraction: the Visual Genome bottom-up-attention Faster R-CNN (ResNet-101 C4)
rebuilt on torch + torchvision ops with detectron2 parameter names, region selection, robust image
decoding and resumable WebDataset shard writing. See docs/extractor.md and docs/shard-format.md."""
from extractor.config import DetectorConfig

__all__ = ["DetectorConfig"]
