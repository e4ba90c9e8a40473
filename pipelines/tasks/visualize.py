"""PNG pictures of referring-expression predictions: the expression, predicted and ground-truth boxes."""
from __future__ import annotations

import warnings
from pathlib import Path

from common.names import inside, safe_name


def draw_referring(pred: dict, image_info: dict, images_dir, folder: Path) -> Path:
    """Draw on the COCO image if `images_dir/file_name` exists, else on a grey canvas of the image size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = image_info.get("width", 640), image_info.get("height", 480)
    path = inside(images_dir, image_info["file_name"]) if images_dir and image_info.get("file_name") else None
    if path is None and images_dir and image_info.get("file_name"):
        warnings.warn(f"{image_info['file_name']!r}: file_name leads outside --images {images_dir}; "
                      "drawing on a grey canvas", stacklevel=2)
    if path is not None and path.is_file():
        img = Image.open(path).convert("RGB")
    else:
        img = Image.new("RGB", (int(w), int(h)), (128, 128, 128))
    fig, ax = plt.subplots(figsize=(6, 6 * img.height / max(1, img.width) + 0.6))
    ax.imshow(img)
    for box, colour, label in ((pred["gt_box"], "lime", "ground truth"), (pred["pred_box"], "red", "prediction")):
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.5, label=label))
    verdict = "hit" if pred["hit"] else "miss"
    ax.set_title(f"\"{pred['expression']}\"\nIoU {pred['iou']:.2f} ({verdict})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    out = folder / f"{safe_name(pred['image_id'])}_{safe_name(pred['sent_id'])}.png"  # ids are data
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
