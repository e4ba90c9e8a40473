"""PNG pictures of referring-expression predictions: the expression, predicted and ground-truth boxes.

Memory stays bounded whatever size the data claims: a picture is a figure of at most 6 x 24.6 inches
at 80 dpi; the image is decoded only when its header says it has at most MAX_DECODE_PIXELS pixels
(JPEGs first reduced by their decoder to near the drawn size) and then shrunk to MAX_SIDE pixels
a side; a bigger image is not decoded (one logged line) and its boxes are drawn on a grey canvas,
which never holds more than one pixel, however large the width and height in instances.json.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

from common.names import inside, safe_name

from .base import log

MAX_DECODE_PIXELS = 25_000_000  # an image file above this many pixels is not decoded (e.g. 5000 x 5000)
MAX_SIDE = 1024  # pixels a side of the image drawn (the picture itself is 480 pixels wide)
MAX_ASPECT = 4.0  # height / width of the figure between 1 / MAX_ASPECT and MAX_ASPECT
MAX_TITLE = 200  # characters of the expression in the title


def _size(image_info: dict) -> tuple[float, float]:
    """The image's width and height from instances.json (640 x 480 when absent): finite and positive."""
    w, h = float(image_info.get("width", 640)), float(image_info.get("height", 480))
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"image size {w} x {h} in instances.json is not a positive size")
    return w, h


def _open_image(path: Path, image):
    """-> (RGB image of at most MAX_SIDE pixels a side, original width, original height), or None
    with one logged line when the file claims more than MAX_DECODE_PIXELS pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow warns above its own limit; ours is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as error:  # above twice Pillow's limit (Image.MAX_IMAGE_PIXELS)
        log.warning("picture of image %s: %s not decoded (%s); drawn on a grey canvas", image, path, error)
        return None
    with img:
        width, height = img.size
        scale = min(1.0, MAX_SIDE / max(1, width, height))
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        img.draft("RGB", target)  # JPEG: decoded at 1/2, 1/4 or 1/8 of the size when that is still >= target
        if img.width * img.height > MAX_DECODE_PIXELS:
            log.warning("picture of image %s: %s is %d x %d pixels, over the %d-pixel limit of --visualize; "
                        "not decoded, drawn on a grey canvas", image, path, width, height, MAX_DECODE_PIXELS)
            return None
        rgb = img.convert("RGB")
    rgb.thumbnail(target)
    return rgb, width, height


def draw_referring(pred: dict, image_info: dict, images_dir, folder: Path) -> Path:
    """Draw on the COCO image if `images_dir/file_name` exists, else on a grey canvas of the image size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = _size(image_info)
    path = inside(images_dir, image_info["file_name"]) if images_dir and image_info.get("file_name") else None
    if path is None and images_dir and image_info.get("file_name"):
        warnings.warn(f"{image_info['file_name']!r}: file_name leads outside --images {images_dir}; "
                      "drawing on a grey canvas", stacklevel=2)
    opened = _open_image(path, pred["image_id"]) if path is not None and path.is_file() else None
    if opened is not None:
        pixels, w, h = opened  # boxes are in the file's pixels, as the features were extracted from it
    else:
        pixels = np.full((1, 1, 3), 128, np.uint8)  # one grey pixel stretched over the image's extent
    aspect = min(max(h / w, 1 / MAX_ASPECT), MAX_ASPECT)
    fig, ax = plt.subplots(figsize=(6, 6 * aspect + 0.6))
    ax.imshow(pixels, extent=(-0.5, w - 0.5, h - 0.5, -0.5))  # pixel centres at integers, as imshow puts them
    for box, colour, label in ((pred["gt_box"], "lime", "ground truth"), (pred["pred_box"], "red", "prediction")):
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.5, label=label))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    verdict = "hit" if pred["hit"] else "miss"
    expression = str(pred["expression"])
    if len(expression) > MAX_TITLE:
        expression = expression[:MAX_TITLE - 3] + "..."
    ax.set_title(f"\"{expression}\"\nIoU {pred['iou']:.2f} ({verdict})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    out = folder / f"{safe_name(pred['image_id'])}_{safe_name(pred['sent_id'])}.png"  # ids are data
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
