"""vilbert-multi-task LMDBs (`COCO_trainval_resnext152_faster_rcnn_genome.lmdb`, ...), and volta's.

facebookresearch/vilbert-multi-task `script/convert_to_lmdb.py` puts one pickled dict per image
under the key `str(image_id).encode()` (the image file's stem, from `script/extract_features.py`)
and a record `b"keys"` holding the pickled list of keys. The dict: `image_id`, `image_h`,
`image_w`, `num_boxes`, `boxes` (float32 (N, 4), original pixels x1, y1, x2, y2) and `features`
(float32 (N, 2048)) as numpy arrays, read by `vilbert/datasets/_image_features_reader.py` with
`reshape(-1, 2048)`: every row counts, and `num_boxes` (the boxes of nonzero confidence) may be
smaller. Older LMDBs (vilbert_beta) hold `boxes` / `features` as base64 of float32 sized by
`num_boxes`; both are read. e-bug/volta `features_extraction/h5_to_lmdb.py` writes its HDF5 groups
the same way (`img_id`, `img_h`, `img_w`, `features`, `boxes`, `obj_id`, `obj_conf`, `attr_id`,
`attr_conf`): its `obj_id` / `attr_id` (0-based over 1600 / 400) give one-hot targets.

The values are pickles: they are read with common.safe_load's restricted unpickler, which admits
builtin containers and numpy arrays only; a record that names anything else (os.system, ...) is
refused before it can run and logged, and the others are imported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from common.safe_load import restricted_loads

from .driver import BadRecord, Entry, Record, as_int, b64_array, optional, pick, unreadable_file

NAME = "vilbert-lmdb"
KEYS_RECORD = b"keys"


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise ImportError("reading LMDB needs the lmdb package: pip install lmdb "
                          "(or pip install 'vilbert-pipeline[import]')") from None
    return lmdb


def _is_lmdb(src: Path) -> bool:
    return (src.is_dir() and (src / "data.mdb").is_file()) or (src.is_file() and src.suffix == ".mdb")


def matches(src) -> bool:
    return _is_lmdb(Path(src))


def _data_file(src: Path) -> Path:
    return src / "data.mdb" if src.is_dir() else src


def _open(src: Path):
    """The LMDB read-only; ValueError naming its data file and the reason when it is none."""
    if not _is_lmdb(src):
        raise ValueError(f"{src}: not an LMDB (a folder with data.mdb, or a .mdb file)")
    lmdb, data = _lmdb(), _data_file(src)
    try:
        if data.stat().st_size == 0:
            raise ValueError(f"{data}: empty (0 bytes), not an LMDB")
        env = lmdb.open(str(src), readonly=True, lock=False, readahead=False, meminit=False,
                        subdir=src.is_dir(), max_readers=4)
    except (lmdb.Error, OSError) as error:  # lmdb.InvalidError: "File is not an LMDB file", ...
        raise ValueError(f"{data}: not a readable LMDB ({_lmdb_reason(error, src)})") from None
    _refuse_cut_short(env, data)
    return env


def _refuse_cut_short(env, data: Path) -> None:
    """ValueError for a data file shorter than the pages its header counts (a copy or download cut
    short): lmdb would read past its end through the memory map, and the process would die of SIGBUS."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = data.stat().st_size
    if size < needed:
        env.close()
        raise ValueError(f"{data}: cut short ({size} bytes of the {needed} its LMDB header counts)")


def _lmdb_reason(error: Exception, src: Path) -> str:
    """lmdb's message without the path it starts with ("SRC: MDB_INVALID: ..."), or an OSError's strerror."""
    text = getattr(error, "strerror", None) or str(error)
    return text[len(f"{src}: "):] if text.startswith(f"{src}: ") else text


def count(src) -> Optional[int]:
    lmdb, env = _lmdb(), _open(Path(src))
    try:
        with env.begin() as txn:
            return env.stat()["entries"] - (txn.get(KEYS_RECORD) is not None)
    except lmdb.Error as error:
        raise ValueError(f"{_data_file(Path(src))}: not a readable LMDB ({_lmdb_reason(error, src)})") from None
    finally:
        env.close()


def _get(txn, key: bytes) -> Optional[bytes]:
    try:
        return txn.get(key)
    except _lmdb().Error as error:  # a damaged page
        raise BadRecord(f"the LMDB record does not read ({type(error).__name__}: {error})") from None


def decode(data: Optional[bytes], where: str) -> Record:
    if data is None:
        raise BadRecord("the record vanished from the LMDB")
    item = restricted_loads(bytes(data), where)  # UnsafePickle (a ValueError) for anything beyond plain data
    if not isinstance(item, dict):
        raise BadRecord(f"the pickle holds a {type(item).__name__}, expected a dict")
    features, boxes = pick(item, "features"), pick(item, "boxes")
    n = None if optional(item, "num_boxes") is None else as_int(item["num_boxes"], "num_boxes")
    if isinstance(features, (str, bytes)):  # the older base64 records: num_boxes sizes both
        if n is None:
            raise BadRecord("base64 features without num_boxes")
        features = b64_array(features, np.float32, (n, -1), "features")  # (N, F)
        boxes = b64_array(boxes, np.float32, (n, 4), "boxes")  # (N, 4)
    else:  # numpy arrays: every row counts, as `reshape(-1, 2048)` in the official reader
        features, boxes = np.asarray(features), np.asarray(boxes).reshape(-1, 4)  # (N, F), (N, 4)
        if features.ndim == 1 and n:
            features = features.reshape(n, -1)
        if n is not None and features.ndim == 2 and n > len(features):
            raise BadRecord(f"num_boxes {n} but only {len(features)} feature rows")
    return Record(width=pick(item, "image_w", "img_w"), height=pick(item, "image_h", "img_h"),
                  features=features, boxes=boxes, cls_prob=optional(item, "cls_prob"),
                  objects_id=optional(item, "objects_id", "obj_id"), attr_prob=optional(item, "attr_prob"),
                  attrs_id=optional(item, "attrs_id", "attr_id"))


def entries(src) -> Iterator[Entry]:
    src = Path(src)
    lmdb, env = _lmdb(), _open(src)
    try:
        with env.begin(buffers=False) as txn:
            if txn.get(b"__keys__") is not None:
                raise ValueError(f"{src}: a tensorpack LMDBSerializer file (volta's h5_to_td-lmdb.py), whose "
                                 "records tensorpack serialized; import the .h5 it was made from (--format h5)")
            try:
                yield from _records(src, txn)
            except lmdb.Error as error:  # a damaged B-tree part way: the records listed so far are imported
                reason = f"not a readable LMDB past this point ({_lmdb_reason(error, src)})"
                yield unreadable_file(_data_file(src), BadRecord(reason))
    finally:
        env.close()


def _records(src: Path, txn) -> Iterator[Entry]:
    for key in txn.cursor().iternext(keys=True, values=False):
        if key == KEYS_RECORD:
            continue
        image_id = key.decode("utf-8", "backslashreplace")
        where = f"{src}:{image_id}"
        yield Entry(image_id, where, lambda key=key, where=where: decode(_get(txn, key), where))
