"""MILVLG bottom-up-attention.pytorch `.npz` files: one per image, named by the image file's stem,
from `extract_features.py` (`utils/extract_utils.py: save_roi_features`, and
`utils/extract_d2features.py` for `--mode d2`).

`np.savez_compressed(x=features (N, 2048) float32, bbox=boxes (N, 4) float32 in original pixels
x1, y1, x2, y2, num_bbox=N, image_h, image_w, info=dict)`. `info` is a Python dict saved as an
object array, i.e. a pickle: everything else is read with `np.load(allow_pickle=False)`, and `info`
with common.safe_load's restricted unpickler (containers and numpy arrays only; a file whose info
names anything else keeps its features and boxes, and the summary counts it). Caffe mode's info:
`image_id, image_h, image_w, num_boxes, objects_id, objects_conf[, attrs_id, attrs_conf]`, ids
0-based over the 1600 classes / 400 attributes without background (since 2020-09-19; files made
before counted background as id 0, and an id of 1600 shows it). d2 mode's info: `objects`
(detectron2's pred_classes) and `cls_prob` (N, 1600), softmax without its background column,
which the shards get back as 1 - the rest.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from common.safe_load import UnsafePickle, restricted_loads

from .driver import BadRecord, Entry, Record, as_int, optional

NAME = "npz"
ID_HINT = (" (bottom-up-attention.pytorch files made before 2020-09-19 count background as class 0: "
           "their objects_id do not follow this convention)")
_INFO_NOTE = "info not read (it pickles more than containers and numpy arrays): features and boxes only"


def files(src) -> List[Path]:
    src = Path(src)
    if src.is_file():
        return [src] if src.suffix == ".npz" else []
    return sorted(p for p in src.rglob("*.npz") if p.is_file()) if src.is_dir() else []


def matches(src) -> bool:
    return bool(files(src))


def count(src) -> Optional[int]:
    return len(files(src))


def _header_dtype(handle) -> Optional[np.dtype]:
    """The dtype in the .npy header at the start of `handle` (None: a format version numpy does not write)."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)[2]
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)[2]
    return None


def _holds_objects(archive: zipfile.ZipFile, name: str) -> bool:
    with archive.open(f"{name}.npy") as handle:
        dtype = _header_dtype(handle)
    return dtype is not None and dtype.hasobject


def _read_info(archive: zipfile.ZipFile, where: str) -> Optional[dict]:
    """The `info` member's dict via the restricted unpickler, None when it names anything else."""
    with archive.open("info.npy") as handle:
        dtype = _header_dtype(handle)
        if dtype is None or not dtype.hasobject:
            return None
        try:
            info = restricted_loads(handle.read(), f"{where}:info")
        except UnsafePickle:
            return None
    info = info.item() if isinstance(info, np.ndarray) and info.shape == () else info
    return info if isinstance(info, dict) else None


def _array(arrays, name: str) -> np.ndarray:
    """Member `name` with allow_pickle=False; an object array (a pickle) is refused unread, saying so."""
    if _holds_objects(arrays.zip, name):
        raise BadRecord(f"{name} holds pickled Python objects (an object array): refused, never unpickled "
                        "(only `info` is read, through the restricted unpickler)")
    return arrays[name]


def _read(path: Path) -> tuple:
    """(features, boxes, width, height, info) of one file; info None when it names more than plain data."""
    with np.load(path, allow_pickle=False) as arrays:
        names = set(arrays.files)
        missing = [n for n in ("x", "bbox", "image_h", "image_w") if n not in names]
        if missing:
            raise BadRecord(f"no {', '.join(missing)} in the file (it holds {', '.join(sorted(names))}); "
                            "made by an extract mode that saves no features or no image size")
        features, boxes = _array(arrays, "x"), _array(arrays, "bbox")
        height, width = as_int(_array(arrays, "image_h"), "image_h"), as_int(_array(arrays, "image_w"), "image_w")
        if "num_bbox" in names and as_int(_array(arrays, "num_bbox"), "num_bbox") != len(features):
            raise BadRecord(f"num_bbox {as_int(arrays['num_bbox'], 'num_bbox')} but {len(features)} feature rows")
        info = _read_info(arrays.zip, str(path)) if "info" in names else {}
    return features, boxes, width, height, info


def decode(path: Path) -> Record:
    try:
        features, boxes, width, height, info = _read(path)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise BadRecord(f"not a readable .npz ({type(error).__name__}: {error})") from None
    notes = (_INFO_NOTE,) if info is None else ()
    info = info or {}
    return Record(width=width, height=height, features=features, boxes=boxes,
                  cls_prob=optional(info, "cls_prob"), objects_id=optional(info, "objects_id", "objects"),
                  attrs_id=optional(info, "attrs_id"), notes=notes)


def entries(src) -> Iterator[Entry]:
    src = Path(src)
    root = src if src.is_dir() else src.parent
    for path in files(src):
        image_id = path.relative_to(root).with_suffix("").as_posix()
        yield Entry(image_id, str(path), lambda path=path: decode(path))
