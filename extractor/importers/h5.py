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

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from .driver import BadRecord, Entry, Record, one_line_reason, per_file, pick

NAME = "h5"
SIGNATURE = b"\x89HDF\r\n\x1a\n"


def require_h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading HDF5 needs the h5py package: pip install h5py "
                          "(or pip install 'vilbert-pipeline[import]')") from None
    return h5py


def _has_signature(handle) -> bool:
    """The HDF5 signature at byte 0, or after a user block: at 512, 1024, 2048, ... (the spec's places)."""
    end, offset = os.fstat(handle.fileno()).st_size, 0
    while offset + len(SIGNATURE) <= end:
        handle.seek(offset)
        if handle.read(len(SIGNATURE)) == SIGNATURE:
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return _has_signature(handle)
    except OSError:
        return False


def files(src) -> List[Path]:
    """SRC itself when it is an HDF5 file, or every *.h5 / *.hdf5 file directly inside the folder SRC
    (those that are no HDF5 file, or cannot be read, each become a line in errors.jsonl)."""
    src = Path(src)
    if src.is_file():
        return [src] if _is_hdf5(src) else []
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".h5", ".hdf5"))
    return []


def matches(src) -> bool:
    return any(_is_hdf5(path) for path in files(src))


def _require_signature(path: Path) -> None:
    with open(path, "rb") as handle:  # PermissionError, ... : the file's one-line reason
        empty, signed = not handle.read(1), _has_signature(handle)
    if not signed:
        raise BadRecord("empty (0 bytes)" if empty else "not an HDF5 file (no HDF5 signature at its start "
                                                         "nor after a user block)")


@contextmanager
def _opened(path: Path):
    """The open volta HDF5 file; BadRecord / OSError with the reason when it is none (or cut short)."""
    h5py = require_h5py()
    _require_signature(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as error:  # a truncated or damaged file
        raise BadRecord(f"not a readable HDF5 file ({error})") from None
    try:
        if isinstance(handle.get("features"), h5py.Dataset):
            raise BadRecord("one `features` array for all images (the layout of bottom-up-attention-vqa and "
                            "vilbert-multi-task's H5 reader), not volta's group per image; not supported")
        yield handle
    finally:
        handle.close()


def count(src) -> Optional[int]:
    """Records in the files that open; a single-file SRC that does not is refused whole (ValueError)."""
    total = 0
    for path in files(src):
        try:
            with _opened(path) as handle:
                total += len(_names(handle))
        except (OSError, ValueError) as error:
            if Path(src).is_file():
                raise ValueError(f"{path}: {one_line_reason(error)}") from None
    return total


def decode(group) -> Record:
    h5py = require_h5py()
    if not isinstance(group, h5py.Group):
        raise BadRecord("a dataset where an image's group was expected")
    item = {name: group[name][()] for name in group if isinstance(group[name], h5py.Dataset)}
    if not item and any(isinstance(group[name], h5py.Group) for name in group):
        raise BadRecord(f"a group of {len(group)} groups, not an image's datasets: volta's files hold one group "
                        "per image at their top (this one nests them, e.g. by split); not supported")
    return Record(width=pick(item, "img_w", "image_w"), height=pick(item, "img_h", "image_h"),
                  features=np.asarray(pick(item, "features")), boxes=np.asarray(pick(item, "boxes")),
                  cls_prob=item.get("cls_prob"), objects_id=item.get("obj_id"),
                  attr_prob=item.get("attr_prob"), attrs_id=item.get("attr_id"))


def _names(handle) -> List[str]:
    try:
        return list(handle)
    except RuntimeError as error:  # h5py's "Link iteration failed (bad local heap signature)": a damaged index
        raise BadRecord(f"its list of images does not read ({error})") from None


def _file_entries(path: Path) -> Iterator[Entry]:
    with _opened(path) as handle:
        for name in _names(handle):
            image_id = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name  # not UTF-8
            yield Entry(image_id, f"{path}:{image_id}", lambda name=name: _decode_damaged(handle, name))


def _decode_damaged(handle, name: str) -> Record:
    """decode(handle[name]), a damaged group's RuntimeError as BadRecord (OSError is logged as it is)."""
    try:
        return decode(handle[name])
    except RuntimeError as error:
        raise BadRecord(f"the group does not read ({error})") from None


def entries(src) -> Iterator[Entry]:
    require_h5py()  # ImportError now, not a line per file
    return per_file(files(src), _file_entries)
