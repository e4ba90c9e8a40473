"""volta's HDF5 files: e-bug/volta `features_extraction/` (`*_boxes36_h5-proposal.py` through
py-bottom-up-attention's detectron2 port, and `tsv_to_h5.py` / `large_tsv_to_h5.py` from LXMERT's TSVs).

One group per image, named by its id (the image file's stem), holding the datasets `features`
(float32 (36, 2048)), `boxes` (float32 (36, 4), original pixels x1, y1, x2, y2), `obj_id` (int64,
0-based over the 1600 classes: detectron2's background-last scores without it), `obj_conf`,
`attr_id`, `attr_conf` and the scalars `img_w`, `img_h`. The shards get one-hot targets from
obj_id / attr_id. Files written by `vilbert-export --format h5 --distributions` add `cls_prob` /
`attr_prob` (float16, column 0 first), which are imported as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from .driver import BadRecord, Entry, Record, pick

NAME = "h5"
SIGNATURE = b"\x89HDF\r\n\x1a\n"


def require_h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading HDF5 needs the h5py package: pip install h5py "
                          "(or pip install 'vilbert-pipeline[import]')") from None
    return h5py


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == SIGNATURE
    except OSError:
        return False


def files(src) -> List[Path]:
    src = Path(src)
    if src.is_file():
        return [src] if _is_hdf5(src) else []
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".h5", ".hdf5") and _is_hdf5(p))
    return []


def matches(src) -> bool:
    return bool(files(src))


def count(src) -> Optional[int]:
    total = 0
    for path in files(src):
        with require_h5py().File(path, "r") as handle:
            total += len(handle)
    return total


def decode(group) -> Record:
    h5py = require_h5py()
    if not isinstance(group, h5py.Group):
        raise BadRecord("a dataset where an image's group was expected")
    item = {name: group[name][()] for name in group if isinstance(group[name], h5py.Dataset)}
    return Record(width=pick(item, "img_w", "image_w"), height=pick(item, "img_h", "image_h"),
                  features=np.asarray(pick(item, "features")), boxes=np.asarray(pick(item, "boxes")),
                  cls_prob=item.get("cls_prob"), objects_id=item.get("obj_id"),
                  attr_prob=item.get("attr_prob"), attrs_id=item.get("attr_id"))


def entries(src) -> Iterator[Entry]:
    h5py = require_h5py()
    for path in files(src):
        with h5py.File(path, "r") as handle:
            if isinstance(handle.get("features"), h5py.Dataset):
                raise ValueError(f"{path}: one `features` array for all images (the layout of bottom-up-attention-vqa "
                                 "and vilbert-multi-task's H5 reader), not volta's group per image; not supported")
            for name in handle:
                where = f"{path}:{name}"
                yield Entry(name, where, lambda name=name: decode(handle[name]))
