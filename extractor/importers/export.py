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
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
from tqdm import tqdm

from .butd_tsv import FIELDNAMES as BUTD_FIELDNAMES
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


def samples(shards, problems: List[str]) -> Iterator[Tuple[str, Dict]]:
    """(key, {member: decoded}) of every sample in the shards, in order; a damaged shard keeps the
    samples before the damage and goes to `problems`."""
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
                        yield key, sample
                        sample = {}
                    key = name_key
                    try:
                        sample[member] = _decode(member, archive.extractfile(info).read())
                    except ValueError:  # a member that is not a plain .npy / valid JSON: the sample is skipped
                        sample["bad"] = True
        except (tarfile.TarError, OSError, EOFError) as error:
            problems.append(f"{path}: {type(error).__name__}: {error}")
            sample = {}  # the one being read when the damage came is not complete
        if sample:
            yield key, sample


def _name(key: str, meta: Dict, forbidden: str) -> str:
    """The sample's own image id when it is usable as a name in OUT, else its shard key."""
    image_id = str(meta.get("image_id", key))
    return key if not image_id or image_id in (".", "..") or any(c in image_id for c in forbidden) else image_id


def _hard_labels(prob: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, C+1) column 0 first -> 0-based argmax over the C real columns (int64), and its value (float32)."""
    real = prob.astype(np.float32)[:, 1:]
    return real.argmax(1).astype(np.int64), real.max(1).astype(np.float32)


def _write_h5(handle, name: str, sample: Dict, distributions: bool) -> None:
    meta = sample["json"]
    group = handle.create_group(name)
    group["features"] = sample["features.npy"].astype(np.float32)  # (N, F)
    group["boxes"] = sample["boxes.npy"].astype(np.float32)  # (N, 4)
    for prefix, kind in (("obj", "cls_prob.npy"), ("attr", "attr_prob.npy")):
        if kind in sample:
            group[f"{prefix}_id"], group[f"{prefix}_conf"] = _hard_labels(sample[kind])
            if distributions:
                group[kind[:-4]] = sample[kind].astype(np.float16)
    group["img_w"], group["img_h"] = np.int64(meta["width"]), np.int64(meta["height"])


def _tsv_row(name: str, sample: Dict) -> Dict:
    boxes, features = sample["boxes.npy"].astype(np.float32), sample["features.npy"].astype(np.float32)
    return {"image_id": name, "image_w": int(sample["json"]["width"]), "image_h": int(sample["json"]["height"]),
            "num_boxes": len(boxes), "boxes": base64.b64encode(boxes.tobytes()).decode("ascii"),
            "features": base64.b64encode(features.tobytes()).decode("ascii")}


def export(shards, out, fmt: str, distributions: bool = False, progress: bool = True) -> Dict:
    """Write every complete sample of SHARDS to OUT (a new file) in `fmt`; returns the summary counts."""
    if fmt not in FORMATS:
        raise ValueError(f"{fmt!r}: export formats are {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; remove it or choose another name")
    shard_files(shards)  # FileNotFoundError before anything is written
    total = sum(int(v) for v in _sizes(shards).values()) or None
    temporary = out.with_name(f".{out.name}.partial")
    problems: List[str] = []
    names: set = set()
    exported = skipped = 0
    started = time.time()
    bar = tqdm(samples(shards, problems), total=total, unit="sample", disable=not progress, desc=f"export {fmt}")
    h5py = require_h5py() if fmt == "h5" else None
    try:
        with (h5py.File(temporary, "w") if h5py else open(temporary, "w", newline="")) as handle:
            writer = None if h5py else csv.DictWriter(handle, delimiter="\t", fieldnames=BUTD_FIELDNAMES)
            for key, sample in bar:
                meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
                name = _name(key, meta, "/" if h5py else "\t\r\n")
                usable = "bad" not in sample and all(m in sample for m in NEEDED) and {"width", "height"} <= set(meta)
                if not usable or name in names:
                    skipped += 1  # damaged or incomplete, or a second sample of the same image
                    continue
                names.add(name)
                if h5py:
                    _write_h5(handle, name, sample, distributions)
                else:
                    writer.writerow(_tsv_row(name, sample))
                exported += 1
        os.replace(temporary, out)
    finally:
        bar.close()
        if temporary.exists():
            temporary.unlink()
    elapsed = time.time() - started
    return dict(format=fmt, out=str(out), exported=exported, skipped=skipped, unreadable_shards=problems,
                seconds=round(elapsed, 3), samples_per_second=round(exported / elapsed, 1) if elapsed else 0.0)


def _sizes(shards) -> Dict[str, int]:
    path = Path(shards) / "sizes.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
