"""`--preview N`: PNGs with the selected boxes and class names, for a person to look at."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

MIN_PREVIEW_SIDE = 400


def load_class_names(path: Optional[str], num_classes: int) -> List[str]:
    """One name per line (e.g. Visual Genome objects_vocab.txt, first synonym used);
    without a file, 'class 17' style names."""
    if not path:
        return [f"class {index}" for index in range(num_classes)]
    try:
        lines = [line.strip().split(",")[0] for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a text file of class names ({error})") from None
    if len(lines) != num_classes:
        raise ValueError(f"{path}: {len(lines)} class names, the detector has {num_classes} classes")
    return lines


def draw_preview(pixels: np.ndarray, boxes: np.ndarray, cls_prob: np.ndarray,
                 class_names: Sequence[str], out_path: Path) -> None:
    """pixels (H, W, 3) uint8; boxes (N, 4) pixels; cls_prob (N, C+1) column 0 = background."""
    image = Image.fromarray(pixels).convert("RGB")
    zoom = max(1.0, MIN_PREVIEW_SIDE / min(image.size))  # small images: enlarge to be readable
    if zoom > 1.0:
        image = image.resize((round(image.width * zoom), round(image.height * zoom)), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    foreground = cls_prob[:, 1:].astype(np.float32)  # (N, C)
    for box, probs in zip(boxes, foreground):
        label = int(probs.argmax())
        x1, y1, x2, y2 = (float(v) * zoom for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=2)
        text = f"{class_names[label]} {probs[label]:.2f}"
        draw.rectangle(draw.textbbox((x1 + 2, y1 + 1), text), fill=(0, 0, 0))
        draw.text((x1 + 2, y1 + 1), text, fill=(255, 255, 0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
