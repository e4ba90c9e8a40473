"""Ground-truth boxes for `--gt-boxes` (e.g. RefCOCO+): features for exactly the given boxes.

Accepted files:
* plain JSON `{"<image key or file name>": [[x1, y1, x2, y2], ...], ...}` (pixels);
* COCO JSON with `images` (`id`, `file_name`) and `annotations` (`image_id`, `bbox` = x, y, w, h).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

from extractor.sources import InputRecord, safe_key


class GroundTruthBoxes:
    def __init__(self, boxes_by_name: Dict[str, np.ndarray]):
        self.boxes_by_name = boxes_by_name

    @classmethod
    def from_file(cls, path: str) -> "GroundTruthBoxes":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read ground-truth boxes ({error})") from error
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return cls(cls._from_coco(data, path))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object (name -> boxes) or COCO annotations")
        boxes = {}
        for name, value in data.items():
            array = np.asarray(value, dtype=np.float32)
            if array.ndim != 2 or array.shape[1] != 4:
                raise ValueError(f"{path}: boxes for {name!r} must be a list of [x1, y1, x2, y2]")
            boxes[name] = cls._checked(array, name, path)
        return cls(boxes)

    @staticmethod
    def _checked(boxes: np.ndarray, name: str, path: str) -> np.ndarray:
        """(N, 4) x1, y1, x2, y2 with finite coordinates and x2 > x1, y2 > y1, else ValueError."""
        bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            raise ValueError(f"{path}: box {boxes[bad][0].tolist()} of {name!r} is not [x1, y1, x2, y2] "
                             "with x2 > x1 and y2 > y1")
        return boxes

    @staticmethod
    def _from_coco(data: Dict, path: str) -> Dict[str, np.ndarray]:
        names = {image["id"]: image["file_name"] for image in data["images"]}
        collected: Dict[str, list] = {name: [] for name in names.values()}
        for annotation in data["annotations"]:
            if annotation["image_id"] not in names:
                raise ValueError(f"{path}: annotation {annotation.get('id')} refers to unknown "
                                 f"image_id {annotation['image_id']}")
            x, y, w, h = annotation["bbox"]
            collected[names[annotation["image_id"]]].append([x, y, x + w, y + h])
        return {name: GroundTruthBoxes._checked(np.asarray(b, dtype=np.float32).reshape(-1, 4), name, path)
                for name, b in collected.items()}

    def lookup(self, record: InputRecord) -> Optional[np.ndarray]:
        """Boxes for a record, matched by key, file name, or file name without extension."""
        member = record.source.rsplit(":", 1)[-1] if record.offset >= 0 else record.source
        base = os.path.basename(member)
        for name in (record.key, base, os.path.splitext(base)[0]):
            if name in self.boxes_by_name:
                return self.boxes_by_name[name]
        for name, boxes in self.boxes_by_name.items():  # e.g. COCO "train2014/xyz.jpg"
            if safe_key(os.path.splitext(name)[0]) == record.key or os.path.basename(name) == base:
                return boxes
        return None
