"""What every importer shares: a source record -> checked arrays -> shard members (the loop that
writes them is `loop`), and the one-line reasons of a bad record or of a source file that cannot be read.

A reader module (`butd_tsv`, `lxmert_tsv`, `vilbert_lmdb`, `npz`, `h5`) yields `Entry`s: the image id
and where the record sits, cheap to list, and `decode()` -> `Record`, which does the costly part
(base64, unpickling, decompression) only for records not imported yet; a file of the source that
cannot be read is one `unreadable_file` Entry (`per_file`), not the end of the import. The first
record that decodes decides what the whole import carries (`Carries`: feature width, where cls_prob
and attr_prob come from); it is the same record on every re-run, so the recipe is too.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional

import numpy as np

from common.names import coco_number
from common.shard_format import npy_bytes

VG_CLASSES, VG_ATTRIBUTES = 1600, 400  # Visual Genome vocabularies; the shards add column 0 (background / none)
FLOAT16_MAX = float(np.finfo(np.float16).max)


class BadRecord(ValueError):
    """A source record that cannot be imported; its one-line reason goes to errors.jsonl."""


@dataclass
class Record:
    """One image's regions as its source holds them (any dtypes; `check` converts)."""

    width: int
    height: int
    features: np.ndarray  # (N, F)
    boxes: np.ndarray  # (N, 4) original-image pixels x1, y1, x2, y2
    cls_prob: Optional[np.ndarray] = None  # (N, 1601) background first, or (N, 1600) without it
    objects_id: Optional[np.ndarray] = None  # (N,) 0-based over the 1600 VG classes (the detector's argmax)
    attr_prob: Optional[np.ndarray] = None  # (N, 401) "no attribute" first, or (N, 400)
    attrs_id: Optional[np.ndarray] = None  # (N,) 0-based over the 400 VG attributes
    notes: tuple = ()  # what was left out of this record and why (counted in the summary)


@dataclass
class Entry:
    image_id: str  # the source's id of the image; the sample key is safe_name(image_id)
    where: str  # "file:line", "lmdb:key", "file.npz": errors.jsonl's `path`, KEY.json's `source`
    decode: Callable[[], Record]
    file_error: Optional[str] = None  # set: the file `where` could not be read (no records from it), and why


def one_line_reason(error: Exception) -> str:
    """errors.jsonl's `reason`: a BadRecord's text, "cannot be read (Permission denied)" for an OSError
    of the system (the line names the file), or any other error's type and first line."""
    if isinstance(error, OSError) and error.strerror:
        return f"cannot be read ({error.strerror})"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, BadRecord) else f"{type(error).__name__}: {text}"[:500]


def unreadable_file(path, error: Exception) -> Entry:
    """The Entry that stands for a whole file of the source that cannot be read (its first bytes, its
    header, or part way through): one line in errors.jsonl, and the source's other files go on."""
    reason = one_line_reason(error)

    def refuse() -> Record:
        raise BadRecord(reason)

    return Entry(Path(path).stem, str(path), refuse, file_error=reason)


def per_file(paths: Iterable[Path], read: Callable[[Path], Iterator[Entry]]) -> Iterator[Entry]:
    """The entries of every file in `paths`, `read(path)` giving one file's; a file that fails (at its
    start or part way: OSError, or a ValueError such as BadRecord) ends in an `unreadable_file` entry,
    after the entries it gave, and the next file is read."""
    for path in paths:
        try:
            yield from read(path)
        except (OSError, ValueError) as error:
            yield unreadable_file(path, error)


@dataclass(frozen=True)
class Carries:
    feature_dim: int
    cls_prob: str  # "source" (the distributions), "one-hot" (from objects_id) or "missing"
    attr_prob: str  # the same, from attr_prob / attrs_id


def carries_of(record: Record) -> Carries:
    def mode(prob, ids):
        return "source" if prob is not None else "one-hot" if ids is not None else "missing"

    features = np.asarray(record.features)
    dim = int(features.shape[1]) if features.ndim == 2 else -1
    return Carries(dim, mode(record.cls_prob, record.objects_id), mode(record.attr_prob, record.attrs_id))


# ----- decoding helpers the readers share ---------------------------------------------------------
def pick(item: Dict, *names: str):
    """item[name] for the first of `names` present (producers spell fields differently), else BadRecord."""
    for name in names:
        if name in item:
            return item[name]
    raise BadRecord(f"no {' / '.join(names)} field (fields: {', '.join(map(str, list(item)[:12]))})")


def optional(item: Dict, *names: str):
    return next((item[name] for name in names if name in item and item[name] is not None), None)


def as_int(value, name: str) -> int:
    """A whole number (64, "64", 64.0, np.int64(64)); BadRecord for 64.7, "64px", inf or an array."""
    try:
        number = value if isinstance(value, (str, bytes)) else np.asarray(value).item()
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(number)  # 64.7 is no pixel count: never truncated to 64
        number = int(number)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        shown = value.item() if isinstance(value, np.generic) else value  # 640.7, not np.float64(640.7)
        raise BadRecord(f"{name} {shown!r:.40} is not an integer") from None
    return number


def b64_array(text, dtype, shape: tuple, name: str) -> np.ndarray:
    """A base64 field (numpy's raw bytes of `dtype`) as an array of `shape` (one -1 allowed). A field
    written by Python 3 through str() (b'...') is accepted too."""
    if isinstance(text, str):
        if text.startswith(("b'", 'b"')) and text[-1:] == text[1]:
            text = text[2:-1]
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise BadRecord(f"{name}: not base64 (non-ASCII characters)") from None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as error:
        raise BadRecord(f"{name}: not valid base64 ({error})") from None
    dtype = np.dtype(dtype)
    if len(raw) % dtype.itemsize:
        raise BadRecord(f"{name}: {len(raw)} bytes are not whole {dtype.name} values (a cut field?)")
    try:
        return np.frombuffer(raw, dtype).reshape(shape)
    except ValueError:
        raise BadRecord(f"{name}: {len(raw) // dtype.itemsize} {dtype.name} values do not make shape {shape} "
                        "(num_boxes does not match the data, or the field was cut)") from None


# ----- checks and the shard members ---------------------------------------------------------------
def _ids(values, n: int, limit: int, name: str, hint: str = "") -> np.ndarray:
    ids = np.asarray(values)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise BadRecord(f"{name} of shape {ids.shape} ({ids.dtype}), expected ({n},) integers")
    bad = (ids < 0) | (ids >= limit)
    if bad.any():
        raise BadRecord(f"{name} {int(ids[bad][0])} is outside 0..{limit - 1}{hint}")
    return ids.astype(np.int64)


def one_hot(ids: np.ndarray, columns: int) -> np.ndarray:
    """(N,) 0-based ids -> (N, columns + 1) float16 with 1 at column id + 1 (column 0: background / none)."""
    out = np.zeros((len(ids), columns + 1), np.float16)
    out[np.arange(len(ids)), ids + 1] = 1
    return out


def _distribution(values, n: int, columns: int, name: str) -> np.ndarray:
    """(N, columns + 1) with column 0 first, or (N, columns) whose column 0 (the softmax's background)
    the producer dropped: it is what the other columns leave of 1."""
    prob = np.asarray(values, dtype=np.float32)
    if prob.ndim != 2 or len(prob) != n or prob.shape[1] not in (columns, columns + 1):
        raise BadRecord(f"{name} of shape {prob.shape}, expected ({n}, {columns + 1}) or ({n}, {columns})")
    if not np.isfinite(prob).all() or (prob < 0).any():
        raise BadRecord(f"{name} holds NaN, infinite or negative values")
    if prob.shape[1] == columns:
        prob = np.concatenate([np.clip(1 - prob.sum(1, keepdims=True), 0, 1), prob], axis=1)
    return prob


def _float64_hint(features: np.ndarray) -> str:
    """For float32 features that make no sense: whether their bytes read as float64 do (a file written
    with float64 arrays where its format has float32, as BUTD's TSV)."""
    if features.dtype != np.float32 or features.size % 2:
        return ""
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(features) <= FLOAT16_MAX)  # NaN, inf or beyond float16
    if bad.mean() < 0.1:  # float64 data read as float32: the low halves are noise, many of them huge
        return ""  # a few bad values in float32 data: no hint
    wide = np.ascontiguousarray(features).view(np.float64)
    sound = np.isfinite(wide).all() and np.abs(wide).max(initial=0) <= FLOAT16_MAX
    return "; read as float64 its bytes are sound values: float64 data in a format of float32?" if sound else ""


def check(record: Record, carries: Carries, id_hint: str = "") -> Dict[str, np.ndarray]:
    """The record's arrays as the shards store them, or BadRecord with the first problem found."""
    features = np.asarray(record.features)
    if features.ndim != 2 or len(features) == 0:
        raise BadRecord(f"features of shape {features.shape}, expected (N, F) with N > 0")
    n = len(features)
    if features.shape[1] != carries.feature_dim:
        raise BadRecord(f"features {features.shape[1]} wide, the source's first record {carries.feature_dim}")
    features = features.astype(np.float32, copy=False)
    if not np.isfinite(features).all():
        raise BadRecord("NaN or infinite features" + _float64_hint(features))
    if np.abs(features).max() > FLOAT16_MAX:
        raise BadRecord(f"features beyond float16's range ({FLOAT16_MAX:.0f}), the shards' dtype"
                        + _float64_hint(features))
    boxes = np.asarray(record.boxes, dtype=np.float32)
    if boxes.shape != (n, 4):
        raise BadRecord(f"boxes of shape {boxes.shape}, expected ({n}, 4) for {n} feature rows")
    if not np.isfinite(boxes).all():
        raise BadRecord("NaN or infinite boxes")
    width, height = as_int(record.width, "image width"), as_int(record.height, "image height")
    if width <= 0 or height <= 0:
        raise BadRecord(f"image size {width}x{height} is not positive")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        raise BadRecord(f"box {boxes[inverted][0].tolist()} has x2 < x1 or y2 < y1 (expected x1, y1, x2, y2)")
    slack = 1 + 0.01 * max(width, height)
    outside = (boxes[:, :2] < -slack).any(1) | (boxes[:, 2] > width + slack) | (boxes[:, 3] > height + slack)
    if outside.any():
        raise BadRecord(f"box {np.round(boxes[outside][0], 1).tolist()} lies outside the {width}x{height} image "
                        "(image width and height swapped?)")
    arrays = {"width": width, "height": height, "features": features, "boxes": boxes}
    for kind, prob, ids, columns in (("cls_prob", record.cls_prob, record.objects_id, VG_CLASSES),
                                     ("attr_prob", record.attr_prob, record.attrs_id, VG_ATTRIBUTES)):
        mode = getattr(carries, kind)
        if mode == "source":
            if prob is None:
                raise BadRecord(f"no {kind}, which the source's first record has (recipe: {kind} source)")
            arrays[kind] = _distribution(prob, n, columns, kind)
        elif mode == "one-hot":
            name = "objects_id" if kind == "cls_prob" else "attrs_id"
            if ids is None:
                raise BadRecord(f"no {name}, which the source's first record has (recipe: {kind} one-hot)")
            arrays[kind] = one_hot(_ids(ids, n, columns, name, id_hint), columns)
    return arrays


def encode(image_id: str, where: str, arrays: Dict, header: Dict, caption: Optional[str]) -> Dict[str, bytes]:
    """Shard members of one sample, as vilbert-extract writes them (docs/shard-format.md)."""
    info = dict(image_id=image_id, width=arrays["width"], height=arrays["height"],
                num_boxes=int(len(arrays["boxes"])), source=where,
                **{k: v for k, v in header.items() if k != "source_path"})
    members = {"json": json.dumps(info).encode("utf-8")}
    if caption:
        members["txt"] = caption.encode("utf-8")
    members["features.npy"] = npy_bytes(arrays["features"].astype(np.float16))
    members["boxes.npy"] = npy_bytes(arrays["boxes"].astype(np.float32))
    for kind in ("cls_prob", "attr_prob"):
        if kind in arrays:
            members[f"{kind}.npy"] = npy_bytes(arrays[kind].astype(np.float16))
    return members


def recipe_header(fmt: str, source, carries: Carries) -> Dict:
    """recipe.json of an import (docs/shard-format.md); its first three fields are the ones training compares."""
    return {"detector": f"imported-{fmt}", "weights_hash": "unknown", "mode": "imported",
            "source_format": fmt, "source_path": str(Path(source).resolve()), "feature_dim": carries.feature_dim,
            "cls_prob": carries.cls_prob, "attr_prob": carries.attr_prob}


# ----- captions -----------------------------------------------------------------------------------
class Captions:
    """{name: caption} from a `caption<TAB>image-id-or-file-name` TSV, looked up by image id: the exact
    name, the file name without its extension, or (ids that are numbers, as BUTD's COCO ids) the
    COCO file name of that number ('COCO_val2014_000000000042.jpg' for 42), see `common.names.coco_number`."""

    def __init__(self, captions: Dict[str, str]):
        self.by_name: Dict[str, str] = {}
        by_number: Dict[int, Optional[str]] = {}
        for name, caption in captions.items():
            stem = Path(name).name.rsplit(".", 1)[0] if "." in Path(name).name else Path(name).name
            for alias in (name, Path(name).name, stem):
                self.by_name.setdefault(alias, caption)
            number = coco_number(stem)
            if number is not None:
                by_number[number] = caption if number not in by_number else None  # ambiguous: no caption
        self.by_number = {k: v for k, v in by_number.items() if v is not None}

    def get(self, image_id: str) -> Optional[str]:
        if image_id in self.by_name:
            return self.by_name[image_id]
        return self.by_number.get(int(image_id)) if image_id.isascii() and image_id.isdigit() else None
