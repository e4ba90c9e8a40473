"""Small feature sources written exactly as their producers write them, for the import tests and
benchmarks/import_benchmark.py (the producers' code is not used; their conventions are):

* BUTD `generate_tsv.py` and LXMERT `extract_*_image.py`: `csv.DictWriter(delimiter="\\t")`, no
  header, base64 of the arrays' raw bytes (float32; LXMERT's ids int64);
* vilbert-multi-task `convert_to_lmdb.py`: `txn.put(str(image_id).encode(), pickle.dumps(dict))`
  plus `b"keys"`; volta's `h5_to_lmdb.py` the same with its HDF5 group's fields;
* bottom-up-attention.pytorch: `np.savez_compressed(x=, bbox=, num_bbox=, image_h=, image_w=, info=dict)`;
* volta: `h5py` groups per image with features / obj_id / obj_conf / attr_id / attr_conf / boxes / img_w / img_h.
"""
from __future__ import annotations

import base64
import csv
import os
import pickle
from pathlib import Path

import numpy as np

BUTD_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
LXMERT_FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features"]


def make_images(count: int = 4, dim: int = 32, seed: int = 0, numeric_ids: bool = False,
                min_boxes: int = 3, max_boxes: int = 7) -> list[dict]:
    """Detector outputs of `count` images: ids, sizes, boxes inside the image, ReLU-like features,
    softmax class / attribute distributions (column 0 = background / none) and their argmax ids."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        n = int(rng.integers(min_boxes, max_boxes + 1))
        width, height = int(rng.integers(200, 640)), int(rng.integers(200, 480))
        x1, y1 = rng.uniform(0, width * 0.6, n), rng.uniform(0, height * 0.6, n)
        x2 = np.minimum(width - 1, x1 + rng.uniform(8, width * 0.4, n))
        y2 = np.minimum(height - 1, y1 + rng.uniform(8, height * 0.4, n))
        cls_prob = rng.dirichlet(np.full(1601, 0.05), size=n).astype(np.float32)  # (N, 1601) bg first
        attr_prob = rng.dirichlet(np.full(401, 0.05), size=n).astype(np.float32)  # (N, 401)
        images.append(dict(
            image_id=str(100 + 7 * i) if numeric_ids else f"COCO_val2014_{100 + 7 * i:012d}",
            width=width, height=height, num_boxes=n,
            boxes=np.stack([x1, y1, x2, y2], 1).astype(np.float32),  # (N, 4)
            features=(rng.gamma(1.0, 2.0, (n, dim)) * (rng.random((n, dim)) > 0.3)).astype(np.float32),  # (N, D)
            cls_prob=cls_prob, attr_prob=attr_prob,
            objects_id=cls_prob[:, 1:].argmax(1).astype(np.int64), objects_conf=cls_prob[:, 1:].max(1),
            attrs_id=attr_prob[:, 1:].argmax(1).astype(np.int64), attrs_conf=attr_prob[:, 1:].max(1)))
    return images


def b64(array: np.ndarray) -> str:
    """What Python 2's base64.b64encode(ndarray) wrote: the raw bytes, as text."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def butd_row(image: dict) -> dict:
    return {"image_id": int(image["image_id"]), "image_w": image["width"], "image_h": image["height"],
            "num_boxes": image["num_boxes"], "boxes": b64(image["boxes"]), "features": b64(image["features"])}


def lxmert_row(image: dict) -> dict:
    return {"img_id": image["image_id"], "img_h": image["height"], "img_w": image["width"],
            "objects_id": b64(image["objects_id"]), "objects_conf": b64(image["objects_conf"]),
            "attrs_id": b64(image["attrs_id"]), "attrs_conf": b64(image["attrs_conf"]),
            "num_boxes": image["num_boxes"], "boxes": b64(image["boxes"]), "features": b64(image["features"])}


def write_tsv(path: Path, rows: list[dict], fieldnames: list[str], mode: str = "w") -> Path:
    """csv.DictWriter with a tab delimiter and no header, as generate_tsv.py (which appends: mode 'a')."""
    with open(path, mode, newline="") as handle:
        writer = csv.DictWriter(handle, delimiter="\t", fieldnames=fieldnames)
        for row in rows:
            writer.writerow(row)
    return Path(path)


def write_butd_tsv(path: Path, images: list[dict], mode: str = "w") -> Path:
    return write_tsv(path, [butd_row(i) for i in images], BUTD_FIELDS, mode)


def write_lxmert_tsv(path: Path, images: list[dict]) -> Path:
    return write_tsv(path, [lxmert_row(i) for i in images], LXMERT_FIELDS)


def vilbert_item(image: dict, style: str = "multitask") -> dict:
    """One LMDB value: vilbert-multi-task's dict (numpy arrays; `base64`: vilbert_beta's base64 fields) or
    volta's (its HDF5 group's datasets, scalars as numpy integers)."""
    if style == "volta":
        return {"features": image["features"], "obj_id": image["objects_id"], "obj_conf": image["objects_conf"],
                "attr_id": image["attrs_id"], "attr_conf": image["attrs_conf"], "boxes": image["boxes"],
                "img_w": np.int64(image["width"]), "img_h": np.int64(image["height"]), "img_id": image["image_id"]}
    encode = (lambda a: base64.b64encode(a.tobytes())) if style == "base64" else (lambda a: a)
    return {"image_id": image["image_id"], "image_h": image["height"], "image_w": image["width"],
            "num_boxes": image["num_boxes"], "boxes": encode(image["boxes"]), "features": encode(image["features"])}


def write_lmdb(path: Path, values: dict[str, bytes]) -> Path:
    """convert_to_lmdb.py's layout: each value under its id, and the pickled id list under b'keys'."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for image_id, value in values.items():
            txn.put(image_id.encode(), value)
        txn.put(b"keys", pickle.dumps([image_id.encode() for image_id in values]))
    env.close()
    return Path(path)


def write_vilbert_lmdb(path: Path, images: list[dict], style: str = "multitask") -> Path:
    return write_lmdb(path, {i["image_id"]: pickle.dumps(vilbert_item(i, style)) for i in images})


class RunsCode:
    """A value whose pickle calls os.system when loaded by an unrestricted unpickler."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def npz_info(image: dict, mode: str) -> dict:
    if mode == "d2":  # extract_d2features.py: detectron2's classes and the softmax without background
        return {"objects": image["objects_id"], "cls_prob": image["cls_prob"][:, 1:]}
    return {"image_id": image["image_id"], "image_h": image["height"], "image_w": image["width"],
            "num_boxes": image["num_boxes"], "objects_id": image["objects_id"], "objects_conf": image["objects_conf"],
            "attrs_id": image["attrs_id"], "attrs_conf": image["attrs_conf"]}


def write_npz(folder: Path, images: list[dict], mode: str = "caffe") -> Path:
    """save_roi_features: one IMAGE_ID.npz per image (`mode` caffe or d2: which info dict)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        np.savez_compressed(folder / image["image_id"], x=image["features"], bbox=image["boxes"],
                            num_bbox=image["num_boxes"], image_h=image["height"], image_w=image["width"],
                            info=npz_info(image, mode))
    return folder


def write_volta_h5(path: Path, images: list[dict], userblock: int = 0) -> Path:
    """volta's layout; `userblock` bytes (0, or a power of two >= 512) of text before the HDF5 data."""
    import h5py

    with h5py.File(path, "w", **({"userblock_size": userblock} if userblock else {})) as handle:
        for image in images:
            group = handle.create_group(image["image_id"])
            group["features"] = image["features"]
            group["obj_id"], group["obj_conf"] = image["objects_id"], image["objects_conf"]
            group["attr_id"], group["attr_conf"] = image["attrs_id"], image["attrs_conf"]
            group["boxes"] = image["boxes"]
            group["img_w"], group["img_h"] = image["width"], image["height"]
    if userblock:
        with open(path, "r+b") as handle:  # what a tool may keep there: its own header
            handle.write(b"made by a feature tool\n" * 4)
    return Path(path)


def read_shards(folder: Path) -> dict[str, dict]:
    """key -> {member: decoded} of every complete shard in folder (np.load allow_pickle=False)."""
    import io
    import json
    import tarfile

    samples: dict[str, dict] = {}
    for path in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(path) as archive:
            for info in archive:
                key, _, member = info.name.partition(".")
                data = archive.extractfile(info).read()
                value = (np.load(io.BytesIO(data), allow_pickle=False) if member.endswith(".npy")
                         else json.loads(data) if member == "json" else data.decode())
                assert member not in samples.setdefault(key, {}), f"{key}.{member} twice"
                samples[key][member] = value
    return samples


def deny_reading(monkeypatch, module, *paths) -> None:
    """`module`'s open() of `paths` fails with EACCES, as for a file this user may not read (chmod 000
    does not stop root, whom the tests may run as)."""
    import builtins
    import errno

    denied = {os.path.realpath(path) for path in paths}

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", guarded_open, raising=False)


def rewrite_sample(shard: Path, key: str, members: dict) -> None:
    """Replace members (name -> bytes) of sample `key` in the shard, keeping every other member as it is."""
    import io
    import tarfile

    with tarfile.open(shard) as archive:
        kept = [(info, archive.extractfile(info).read()) for info in archive]
    with tarfile.open(shard, "w") as archive:
        for info, data in kept:
            data = members.get(info.name[len(key) + 1:], data) if info.name.startswith(f"{key}.") else data
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
