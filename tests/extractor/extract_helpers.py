"""Generated test images for the extractor tests (imported as `extract_helpers`)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def make_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic picture with a few coloured rectangles (something for the RPN to see)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 200, dtype=np.uint8)
    for _ in range(4):
        x1, y1 = rng.integers(0, max(1, width // 2)), rng.integers(0, max(1, height // 2))
        x2, y2 = x1 + rng.integers(1, max(2, width // 2)), y1 + rng.integers(1, max(2, height // 2))
        pixels[y1:y2, x1:x2] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels).convert(mode)


def write_images(folder, count: int, size=(64, 48), captions: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        make_image(*size, seed=index).save(folder / f"img{index:03d}.jpg")
        if captions:
            (folder / f"img{index:03d}.txt").write_text(f"caption number {index}")
    return folder
