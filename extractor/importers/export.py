"""`vilbert-export SHARDS OUT`: shards -> volta's HDF5 or a BUTD TSV, for code that reads those.

* `h5`: a group per image (named by its image id), as volta's `*_h5-proposal.py` writes: float32
  `features` and `boxes`, int64 `img_w` / `img_h`, and when the shards have class distributions
  the hard labels LXMERT and volta store: `obj_id` / `obj_conf` (argmax and max over the 1600
  classes, background column left out, 0-based), `attr_id` / `attr_conf` likewise. `--distributions`
  adds the float16 `cls_prob` / `attr_prob` themselves (column 0 first; volta's readers ignore them).
* `butd-tsv`: `generate_tsv.py`'s lines (csv, tab-delimited, no header): image_id, image_w,
  image_h, num_boxes, base64 float32 boxes, base64 float32 features.

Only the complete `*.tar` shards are read; `.npy` members with allow_pickle=False. OUT is written
under a temporary name and renamed when complete.
"""
from __future__ import annotations

import base64
import csv
import functools
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from common.shard_format import read_sizes

from .butd_tsv import FIELDNAMES as BUTD_FIELDNAMES
from .driver import BadRecord, as_int
from .h5 import require_h5py

FORMATS = ("h5", "butd-tsv")
NEEDED = ("json", "features.npy", "boxes.npy")


def shard_files(shards) -> List[Path]:
    shards = Path(shards)
    if shards.is_file():
        return [shards]
    found = sorted(p for p in shards.glob("*.tar") if p.is_file() and not p.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"{shards}: no *.tar shards (expected vilbert-extract or vilbert-import output)")
    return found


def _decode(name: str, data: bytes):
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    return json.loads(data) if name == "json" else None


def samples(shards, problems: List[str]) -> Iterator[Tuple[Path, str, Dict]]:
    """(shard, key, {member: decoded}) of every sample in the shards, in order; a member that does not
    decode is `sample["bad"]` (its name); a damaged shard keeps the samples before the damage and goes
    to `problems`."""
    for path in shard_files(shards):
        key, sample = None, {}
        try:
            with tarfile.open(path, "r:") as archive:
                for info in archive:
                    if not info.isfile():
                        continue
                    name_key, _, member = info.name.rpartition("/")[2].partition(".")
                    if member not in NEEDED + ("cls_prob.npy", "attr_prob.npy"):
                        continue
                    if name_key != key and sample:
                        yield path, key, sample
                        sample = {}
                    key = name_key
                    try:
                        sample[member] = _decode(member, archive.extractfile(info).read())
                    except ValueError:  # a member that is not a plain .npy / valid JSON: the sample is skipped
                        sample.setdefault("bad", member)
        except (tarfile.TarError, OSError, EOFError) as error:
            problems.append(f"{path}: {type(error).__name__}: {error}")
            sample = {}  # the one being read when the damage came is not complete
        if sample:
            yield path, key, sample


def _member_problem(sample: Dict) -> Optional[str]:
    """Why the sample's members cannot be exported (a damaged or missing one), or None."""
    if "bad" in sample:
        return f"{sample['bad']} is not a plain .npy / valid JSON"
    missing = [member for member in NEEDED if member not in sample]
    if missing:
        return f"no {', '.join(missing)} member"
    if not isinstance(sample["json"], dict):
        return f"its json member is a JSON {type(sample['json']).__name__}, expected an object"
    return None


def _rows_problem(sample: Dict) -> Optional[str]:
    """Why the sample's arrays do not fit together (features (N, F), boxes (N, 4), probs (N, C)), or None."""
    features, boxes = sample["features.npy"], sample["boxes.npy"]
    if features.ndim != 2 or len(features) == 0:
        return f"features of shape {features.shape}, expected (N, F) with N > 0"
    n = len(features)
    if boxes.shape != (n, 4):
        return f"boxes of shape {boxes.shape}, expected ({n}, 4) for its {n} feature rows"
    for kind in ("cls_prob.npy", "attr_prob.npy"):
        if kind in sample and (sample[kind].ndim != 2 or len(sample[kind]) != n or sample[kind].shape[1] < 2):
            return f"{kind[:-4]} of shape {sample[kind].shape}, expected ({n}, C) for its {n} feature rows"
    return None


def _image_size(meta: Dict) -> Tuple[int, int]:
    """(width, height) of KEY.json as positive integers, else BadRecord."""
    width, height = (as_int(meta[field], field) if field in meta else None for field in ("width", "height"))
    if width is None or height is None:
        raise BadRecord(f"its json has no {'width' if width is None else 'height'}")
    if width <= 0 or height <= 0:
        raise BadRecord(f"image size {width}x{height} is not positive")
    return width, height


def checked(sample: Dict) -> Tuple[int, int]:
    """The sample's image (width, height) when it can be exported, else BadRecord with the reason."""
    problem = _member_problem(sample) or _rows_problem(sample)
    if problem:
        raise BadRecord(problem)
    return _image_size(sample["json"])


def _name(key: str, meta: Dict, forbidden: str) -> str:
    """The sample's own image id when it is usable as a name in OUT, else its shard key."""
    image_id = str(meta.get("image_id", key))
    return key if not image_id or image_id in (".", "..") or any(c in image_id for c in forbidden) else image_id


def _hard_labels(prob: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, C+1) column 0 first -> 0-based argmax over the C real columns (int64), and its value (float32)."""
    real = prob.astype(np.float32)[:, 1:]
    return real.argmax(1).astype(np.int64), real.max(1).astype(np.float32)


def _write_h5(handle, name: str, sample: Dict, size: Tuple[int, int], distributions: bool) -> None:
    group = handle.create_group(name)
    group["features"] = sample["features.npy"].astype(np.float32)  # (N, F)
    group["boxes"] = sample["boxes.npy"].astype(np.float32)  # (N, 4)
    for prefix, kind in (("obj", "cls_prob.npy"), ("attr", "attr_prob.npy")):
        if kind in sample:
            group[f"{prefix}_id"], group[f"{prefix}_conf"] = _hard_labels(sample[kind])
            if distributions:
                group[kind[:-4]] = sample[kind].astype(np.float16)
    group["img_w"], group["img_h"] = np.int64(size[0]), np.int64(size[1])


def _write_tsv_row(tsv: csv.DictWriter, name: str, sample: Dict, size: Tuple[int, int]) -> None:
    tsv.writerow(_tsv_row(name, sample, size))


def _tsv_row(name: str, sample: Dict, size: Tuple[int, int]) -> Dict:
    boxes, features = sample["boxes.npy"].astype(np.float32), sample["features.npy"].astype(np.float32)
    return {"image_id": name, "image_w": size[0], "image_h": size[1],
            "num_boxes": len(boxes), "boxes": base64.b64encode(boxes.tobytes()).decode("ascii"),
            "features": base64.b64encode(features.tobytes()).decode("ascii")}


def export(shards, out, fmt: str, distributions: bool = False, progress: bool = True) -> Dict:
    """Write every complete sample of SHARDS to OUT (a new file) in `fmt`; returns the summary counts
    (`skipped_samples`: "shard: key: reason" of each sample left out; `warnings`: other lines to show)."""
    if fmt not in FORMATS:
        raise ValueError(f"{fmt!r}: export formats are {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; remove it or choose another name")
    _check_out(shards, out)
    shard_files(shards)  # FileNotFoundError before anything is written
    warnings: List[str] = []
    total = _total(shards, warnings)
    temporary = out.with_name(f".{out.name}.partial")
    problems: List[str] = []
    skipped: List[str] = []
    started = time.time()
    bar = tqdm(samples(shards, problems), total=total, unit="sample", disable=not progress, desc=f"export {fmt}")
    h5py = require_h5py() if fmt == "h5" else None
    try:
        with (h5py.File(temporary, "w") if h5py else open(temporary, "w", newline="")) as handle:
            if h5py:
                write = functools.partial(_write_h5, handle, distributions=distributions)
            else:
                write = functools.partial(_write_tsv_row, csv.DictWriter(handle, delimiter="\t",
                                                                          fieldnames=BUTD_FIELDNAMES))
            exported = _write_all(bar, write, "/" if h5py else "\t\r\n", skipped)
        if not exported:  # an empty file would pass for an export
            why = f"all {len(skipped)} skipped, the first as {skipped[0]}" if skipped else "no complete sample"
            why += f"; unreadable: {problems[0]}" if problems else ""
            raise ValueError(f"{shards}: no sample could be exported ({why}); {out} was not written")
        os.replace(temporary, out)
    finally:
        bar.close()
        if temporary.exists():
            temporary.unlink()
    elapsed = time.time() - started
    return dict(format=fmt, out=str(out), exported=exported, skipped=len(skipped), skipped_samples=skipped,
                unreadable_shards=problems, warnings=warnings, seconds=round(elapsed, 3),
                samples_per_second=round(exported / elapsed, 1) if elapsed else 0.0)


def _check_out(shards, out: Path) -> None:
    """OUT's folder exists (else FileNotFoundError, one line: the export writes a hidden `.OUT.partial`
    there first), and OUT is no `*.tar` in the SHARDS folder: a later run would take it for a damaged
    shard and set it aside (ValueError)."""
    folder = out.parent
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"{out}: OUT's folder {folder} {why}")
    if out.suffix == ".tar" and Path(shards).is_dir() and folder.resolve() == Path(shards).resolve():
        raise ValueError(f"{out}: an export named *.tar inside SHARDS {shards} would be read as one of its shards "
                         "(and set aside as damaged by a later run); name it otherwise or write it elsewhere")


def _write_all(samples_in: Iterable, write: Callable, forbidden: str, skipped: List[str]) -> int:
    """write(name, sample, (width, height)) for each sample that can be exported, once per image;
    each other one goes to `skipped` as "shard: key: reason". -> how many were written."""
    names: set = set()
    for shard, key, sample in samples_in:
        try:
            size = checked(sample)
        except BadRecord as error:
            skipped.append(f"{shard}: {key}: {error}")
            continue
        name = _name(key, sample["json"], forbidden)
        if name in names:
            skipped.append(f"{shard}: {key}: a second sample of image {name!r} (the first one is exported)")
            continue
        names.add(name)
        write(name, sample, size)
    return len(names)


def _total(shards, warnings: List[str]) -> Optional[int]:
    """Samples listed in SHARDS/sizes.json, for the progress bar; a sizes.json that is no object of
    sample counts is one warning (the export goes on without a total)."""
    path = Path(shards) / "sizes.json"
    if not path.is_file():
        return None
    try:
        return sum(read_sizes(path).values()) or None
    except ValueError as error:
        warnings.append(f"{error}; the progress bar has no total")
        return None
