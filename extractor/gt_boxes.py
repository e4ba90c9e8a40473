"""Ground-truth boxes for `--gt-boxes` (e.g. RefCOCO+): features for exactly the given boxes.

Accepted files:
* plain JSON `{"<image key or file name>": [[x1, y1, x2, y2], ...], ...}` (pixels);
* COCO JSON with `images` (`id`, `file_name`, `width`, `height`) and `annotations` (`image_id`,
  `bbox` = x, y, w, h).

A name is matched to an image by the key the image gets (its path under IMAGES, without the
extension), or by its path under IMAGES; else by its file name alone, only when exactly one image
has that file name (two images `sub1/dup.jpg`, `sub2/dup.jpg` and a name `dup.jpg` is an error,
not a guess). A COCO image's
`width`/`height` must equal the size of the image as decoded (EXIF rotation applied), else the image
is rejected with the reason: boxes drawn on another orientation are silently wrong features. A COCO
annotation whose `bbox` has a zero or negative width or height, or a coordinate that is not finite (COCO
has a few), rejects its image the same way, with the annotation and the bbox as the file gives them: the
other images are extracted (dropping the box would shift the index of every box after it). An image id
given twice, an annotation `image_id` that names no image, and any entry that is not of the shape above
(a box of strings, ragged boxes, COCO `annotations` without `images`) refuse the whole file with one line
naming the entry.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

from common.safe_load import regular_file
from extractor.sources import InputRecord, safe_key


class GroundTruthBoxes:
    def __init__(self, boxes_by_name: Dict[str, np.ndarray], sizes_by_name: Optional[Dict[str, tuple]] = None,
                 path: str = "--gt-boxes", rejected_by_name: Optional[Dict[str, str]] = None):
        self.boxes_by_name = boxes_by_name
        self.sizes_by_name = sizes_by_name or {}  # COCO: name -> (width, height) as annotated
        self.rejected_by_name = rejected_by_name or {}  # COCO: name -> why its image is not extracted
        self.path = path
        self.name_of: Optional[Dict[str, str]] = None  # record key -> box name, once bound

    @classmethod
    def from_file(cls, path: str) -> "GroundTruthBoxes":
        """Read a plain or COCO file; ValueError, one line naming the file and the entry, if it is neither."""
        regular_file(path, "a ground-truth boxes JSON")  # a FIFO would block the open forever
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError, RecursionError) as error:
            raise ValueError(f"{path}: cannot read ground-truth boxes ({error})") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object (name -> boxes) or COCO annotations")
        if _looks_like_coco(data, path):
            boxes, sizes, rejected = cls._from_coco(data, path)
            return cls(boxes, sizes, path=path, rejected_by_name=rejected)
        boxes = {name: cls._checked(_plain_boxes(value, name, path), name, path) for name, value in data.items()}
        return cls(boxes, path=path)

    def digest(self) -> str:
        """sha256 (hex) of the boxes by name, as read (not of the file's formatting): a re-run into an
        OUT made with other boxes would keep the old boxes of the images already done."""
        content = {name: np.asarray(b, np.float32).round(3).tolist() for name, b in self.boxes_by_name.items()}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _checked(boxes: np.ndarray, name: str, path: str) -> np.ndarray:
        """(N, 4) x1, y1, x2, y2 with finite coordinates and x2 > x1, y2 > y1, else ValueError."""
        bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            raise ValueError(f"{path}: box {boxes[bad][0].tolist()} of {name!r} is not [x1, y1, x2, y2] "
                             "with x2 > x1 and y2 > y1")
        return boxes

    @staticmethod
    def _from_coco(data: Dict, path: str):
        """-> (boxes by file name, (width, height) by file name, why an image is rejected by file name);
        one-line errors naming the record."""
        names, sizes = _coco_images(data["images"], path)
        collected: Dict[str, list] = {name: [] for name in names.values()}
        rejected: Dict[str, str] = {}
        for k, annotation in enumerate(data["annotations"]):
            if not isinstance(annotation, dict) or "image_id" not in annotation:
                raise ValueError(f"{path}: annotations[{k}] has no 'image_id'")
            _check_image_id(annotation, k, names, path)
            bbox = annotation.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise ValueError(f"{path}: annotations[{k}] (id {annotation.get('id')}): 'bbox' is {bbox!r}, "
                                 "expected [x, y, w, h]")
            name, problem = names[annotation["image_id"]], _coco_bbox_problem(bbox)
            if problem:
                rejected.setdefault(name, f"{path}: annotations[{k}] (id {annotation.get('id')}) of {name!r} has "
                                          f"'bbox' {bbox} (x, y, w, h): {problem}")
                continue
            x, y, w, h = bbox
            collected[name].append([x, y, x + w, y + h])
        boxes = {name: GroundTruthBoxes._checked(np.asarray(b, dtype=np.float32).reshape(-1, 4), name, path)
                 for name, b in collected.items()}
        return boxes, sizes, rejected

    def bind(self, records: List[InputRecord]) -> None:
        """Match every box name to the one image it means, by key or path, a bare file name only
        when one image has it; ValueError naming the file and the images if a name is ambiguous."""
        by_key = {record.key: record for record in records}
        by_name = {record.name: record for record in records if record.name}  # its path, without the extension
        by_base: Dict[str, list] = {}
        for record in records:
            by_base.setdefault(os.path.basename(_member(record)), []).append(record)
        self.name_of = {}
        for name in self.boxes_by_name:
            stem = os.path.splitext(name)[0]
            record = (by_key.get(name) or by_name.get(stem) or by_key.get(safe_key(stem))
                      or by_key.get(safe_key(name)))
            if record is None:  # by file name alone ('train2014/x.jpg' for an image x.jpg), if only one has it
                base = os.path.basename(name)
                candidates = by_base.get(base, []) or by_base.get(base + ".jpg", [])
                if len(candidates) > 1:
                    raise ValueError(f"{self.path}: {name!r} matches {len(candidates)} images ("
                                     + ", ".join(sorted(_member(r) for r in candidates)[:4])
                                     + "); name them by their path under IMAGES")
                record = candidates[0] if candidates else None
            if record is not None:
                self.name_of.setdefault(record.key, name)

    def lookup(self, record: InputRecord) -> Optional[np.ndarray]:
        """Boxes for a record (after `bind`), or None when it has none."""
        name = self.name_of.get(record.key) if self.name_of is not None else None
        return None if name is None else self.boxes_by_name[name]

    def rejection(self, record: InputRecord) -> Optional[str]:
        """Why the file's boxes of a record's image cannot be used (a COCO bbox of no area), or None."""
        name = self.name_of.get(record.key) if self.name_of is not None else None
        return None if name is None else self.rejected_by_name.get(name)

    def size_mismatch(self, record: InputRecord, width: int, height: int) -> Optional[str]:
        """Why the annotated size of the record's image differs from the decoded one, or None."""
        name = self.name_of.get(record.key) if self.name_of is not None else None
        annotated = self.sizes_by_name.get(name) if name is not None else None
        if annotated is None or annotated == (width, height):
            return None
        return (f"{self.path} gives {name!r} as {annotated[0]}x{annotated[1]}, the image decodes (EXIF "
                f"rotation applied) to {width}x{height}: its boxes would fall on other pixels")


def _is_number(value) -> bool:
    """A JSON number: an int or a float, never a bool nor a string of digits ("3")."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    """A number that is not NaN nor infinite (an int always is)."""
    return isinstance(value, int) or math.isfinite(value)


def _kind(value) -> str:
    """'a str', 'a list', ... for an error line ('null' for None)."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _looks_like_coco(data: Dict, path: str) -> bool:
    """A COCO file: 'images' and 'annotations' lists. ValueError for a file with one of them but not the
    other (it would be read as plain boxes of an image named 'annotations'), or one that is no list. (A
    plain file's image named 'images', given a list of boxes, is no COCO field.)"""
    present = [field for field in ("images", "annotations") if field in data and not _box_lists(data[field])]
    if not present:
        return False
    for field in present:
        if not isinstance(data[field], list):
            raise ValueError(f"{path}: '{field}' is {_kind(data[field])}, expected a list (COCO annotations)")
    if len(present) == 1:
        raise ValueError(f"{path}: has '{present[0]}' but no "
                         f"'{'annotations' if present[0] == 'images' else 'images'}': COCO annotations need both")
    return True


def _box_lists(value) -> bool:
    """A non-empty list of lists: the plain format's boxes of one name, not a COCO field."""
    return isinstance(value, list) and bool(value) and all(isinstance(box, list) for box in value)


def _plain_boxes(value, name: str, path: str) -> np.ndarray:
    """The plain format's boxes of one name: a non-empty list of [x1, y1, x2, y2] numbers, as (N, 4)
    float32; else ValueError naming the file, the name and the box."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: boxes for {name!r} must be a list of [x1, y1, x2, y2], got {_kind(value)}"
                         + (" (empty)" if isinstance(value, list) else ""))
    for j, box in enumerate(value):
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(f"{path}: boxes for {name!r}: [{j}] is {box!r}, expected [x1, y1, x2, y2] (4 numbers)")
    try:
        return np.asarray(value, dtype=np.float32)
    except OverflowError:  # an integer beyond any float
        raise ValueError(f"{path}: boxes for {name!r}: a coordinate is too large") from None


def _coco_images(images: list, path: str):
    """COCO `images` -> (file name by id, (width, height) by file name); ValueError naming
    the record for one without an int or string 'id' and a 'file_name' string, or with an id given twice."""
    names, sizes, first = {}, {}, {}
    for k, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{path}: images[{k}] needs an 'id' and a 'file_name' string")
        image_id = image["id"]
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise ValueError(f"{path}: images[{k}]: 'id' is {image_id!r} ({_kind(image_id)}), expected an int "
                             "or a string")
        if image_id in first:  # the later image would get the earlier one's boxes
            raise ValueError(f"{path}: images[{k}]: duplicate id {image_id!r} (also images[{first[image_id]}])")
        first[image_id] = k
        names[image_id] = image["file_name"]
        width, height = image.get("width"), image.get("height")
        if _is_number(width) and _is_number(height):
            if not (_finite(width) and _finite(height)):  # (another size rejects its image: size_mismatch)
                raise ValueError(f"{path}: images[{k}] (id {image_id!r}): width {width!r}, height {height!r}; "
                                 "expected finite numbers")
            sizes[image["file_name"]] = (int(width), int(height))
    return names, sizes


def _check_image_id(annotation: Dict, k: int, names: Dict, path: str) -> None:
    """An annotation's `image_id` is one of the images' ids; ValueError naming the annotation, with the
    id's repr and type when it has another type than theirs ('0' for 0)."""
    image_id = annotation["image_id"]
    if isinstance(image_id, (int, str)) and not isinstance(image_id, bool) and image_id in names:
        return
    kinds = sorted({type(i).__name__ for i in names})
    if kinds and type(image_id).__name__ not in kinds:
        raise ValueError(f"{path}: annotations[{k}] (id {annotation.get('id')}): image_id {image_id!r} "
                         f"({_kind(image_id)}; the images' ids are {' and '.join(kinds)})")
    raise ValueError(f"{path}: annotation {annotation.get('id')} refers to unknown image_id {image_id!r}")


def _coco_bbox_problem(bbox: list) -> Optional[str]:
    """Why a COCO [x, y, w, h] (numbers) is no box, or None."""
    try:
        values = np.asarray(bbox, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        return "a coordinate is not finite"
    if not np.isfinite(values).all():
        return "a coordinate is not finite"
    if values[2] <= 0 or values[3] <= 0:
        return "its width or height is not > 0 (a box of no area has no feature)"
    return None


def _member(record: InputRecord) -> str:
    """The image's path (or its name inside a tar shard)."""
    return record.source.rsplit(":", 1)[-1] if record.offset >= 0 else record.source
