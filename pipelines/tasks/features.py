"""Region features for downstream tasks, read from `vilbert-extract` shards by image id.

Shards are indexed once (member offsets inside each tar), then a sample's `.npy` members are read
with a seek + `np.load(allow_pickle=False)`; nothing in a shard is unpickled. Dataset image ids
(COCO's integer ids, Flickr30k's file stems) are matched to shard keys by exact key, or a COCO id by
the number of a COCO file name (`COCO_train2014_000000123456` -> 123456), see `FeatureStore.key_for`.

`regions()` returns what the model eats: position 0 is the [IMG] token (mean feature, location
[0, 0, 1, 1, 1]) followed by the regions, with 5-d locations x1/W, y1/H, x2/W, y2/H, area/(WH).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.names import coco_number, hashed_key, image_key
from common.shard_format import FINETUNING_MEMBERS
from pipelines.data.tario import npy_shape


@dataclass
class Regions:
    features: np.ndarray  # (N, F) float32, detector regions (no [IMG])
    boxes: np.ndarray  # (N, 4) float32 pixels x1, y1, x2, y2
    width: int
    height: int
    key: str
    mode: str = "detected"


def locations(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) pixel boxes -> (N, 5) normalised x1, y1, x2, y2, area fraction."""
    w, h = float(width), float(height)
    loc = np.zeros((len(boxes), 5), np.float32)
    loc[:, 0], loc[:, 2] = boxes[:, 0] / w, boxes[:, 2] / w
    loc[:, 1], loc[:, 3] = boxes[:, 1] / h, boxes[:, 3] / h
    loc[:, 4] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (w * h)
    return loc


def with_img_token(features: np.ndarray, boxes: np.ndarray, width: int, height: int):
    """-> features (N+1, F), locations (N+1, 5): [IMG] first (mean feature, whole image)."""
    feats = np.concatenate([features.mean(0, keepdims=True), features], axis=0).astype(np.float32)
    loc = np.concatenate([np.array([[0, 0, 1, 1, 1]], np.float32), locations(boxes, width, height)], axis=0)
    return feats, loc


def pad_regions(items: list[tuple[np.ndarray, np.ndarray]], max_regions: int | None = None):
    """[(feats (Ni, F), loc (Ni, 5))] -> image_feat (B, R, F), image_loc (B, R, 5), image_mask (B, R)."""
    R = max(len(f) for f, _ in items)
    if max_regions:
        R = min(R, max_regions)
    F = items[0][0].shape[1]
    feat = torch.zeros(len(items), R, F)
    loc = torch.zeros(len(items), R, 5)
    mask = torch.zeros(len(items), R, dtype=torch.long)
    for i, (f, l) in enumerate(items):
        n = min(len(f), R)
        feat[i, :n] = torch.from_numpy(np.ascontiguousarray(f[:n]))
        loc[i, :n] = torch.from_numpy(np.ascontiguousarray(l[:n]))
        mask[i, :n] = 1
    return feat, loc, mask


class FeatureStore:
    """All samples of the `PREFIX-*.tar` shards in a folder, looked up by image id."""

    def __init__(self, folder: str | Path, cache_size: int = 4096):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: feature folder not found (expected vilbert-extract shards)")
        shards = sorted(p for p in self.folder.glob("*.tar") if p.is_file() and not p.name.startswith("."))  # no FIFOs
        if not shards:
            raise FileNotFoundError(f"{self.folder}: no *.tar shards (expected vilbert-extract output)")
        self.members: dict[str, dict[str, tuple[Path, int, int]]] = {}
        self.unreadable: list[str] = []  # "shard: reason" of corrupt / truncated shards (complete samples kept)
        for shard in shards:
            found: dict[str, dict[str, tuple[Path, int, int]]] = {}
            try:
                with tarfile.open(shard, "r:") as archive:
                    for info in archive:
                        if not info.isfile():
                            continue
                        key, _, suffix = info.name.rpartition("/")[2].partition(".")
                        found.setdefault(key, {})[suffix] = (shard, info.offset_data, info.size)
            except (tarfile.TarError, OSError, EOFError) as e:  # keep what was read, as training does
                self.unreadable.append(f"{shard}: {type(e).__name__}: {e}")
                found = self._complete(found, shard.stat().st_size)
                warnings.warn(f"{shard}: not a readable tar shard ({e}); its complete samples are kept",
                              stacklevel=2)
            for key, members in found.items():
                self.members.setdefault(key, {}).update(members)
        self.by_number: dict[int, str] = {}
        clashes = set()
        for key in self.members:
            n = coco_number(key)
            if n is not None:
                if n in self.by_number:
                    clashes.add(n)
                self.by_number[n] = key
        for n in clashes:  # ambiguous numeric ids can only be looked up by exact key
            del self.by_number[n]
        self.file_names: dict[str, str] = {}  # image id -> its file name (name_images)
        self.width: int | None = None  # the features' width, from the first sample checked (_check_width)
        self.cache: OrderedDict[str, Regions] = OrderedDict()
        self.cache_size = cache_size
        self.info_checked: set[str] = set()  # keys whose JSON check_features found sound (read once)
        self._files: OrderedDict[Path, object] = OrderedDict()  # open shards of this process (at most 32)
        self._pid, self._lock = os.getpid(), threading.RLock()  # the lock: the files and the region cache

    def reopen(self, cache_size: int | None = None) -> None:
        """In a new process (a DataLoader worker): its own file handles and an empty region cache
        (of `cache_size`), nothing inherited from the process that forked it."""
        self._files, self._pid, self._lock = OrderedDict(), os.getpid(), threading.RLock()
        self.cache = OrderedDict()
        if cache_size is not None:
            self.cache_size = cache_size

    @staticmethod
    def _complete(found: dict, end: int) -> dict:
        """The samples of a damaged shard that have every member, all within its `end` bytes (a
        partial copy never hides a complete one of another shard)."""
        return {key: members for key, members in found.items()
                if all(s in members for s in FINETUNING_MEMBERS) and all(o + n <= end for _, o, n in members.values())}

    def __len__(self) -> int:
        return len(self.members)

    def name_images(self, file_names: dict) -> None:
        """The file names of image ids (COCO's instances.json `file_name`): an id is then found by the
        key `vilbert-extract` gives its file first ('scene_000007.jpg' -> scene_000007 for id 7)."""
        self.file_names.update({str(k): str(v) for k, v in file_names.items()})

    def _key_of_name(self, s: str) -> str | None:
        """The key of a name: itself, or the key `vilbert-extract` gives that name (a file name's
        extension dropped; a hash added where the name shared its key with another)."""
        if s in self.members:
            return s
        name = _without_extension(s)
        key = image_key(name)
        return next((k for k in (hashed_key(key, name), key) if k in self.members), None)

    def key_for(self, image_id) -> str | None:
        """The sample of an image id: by its key or name (`_key_of_name`), by its file name when
        `name_images` gave one, or, for a number or a COCO file name, the one sample whose key is the
        same COCO image ('COCO_train2014_000000123456' or '000000123456' for 123456)."""
        s = str(image_id)
        found = self._key_of_name(s)
        if found is None and s in self.file_names:
            found = self._key_of_name(self.file_names[s])
        if found is None:
            n = coco_number(image_key(_without_extension(s)))
            found = self.by_number.get(n) if n is not None else None
        return found

    def __contains__(self, image_id) -> bool:
        return self.key_for(image_id) is not None

    def _read(self, key: str, suffix: str, limit: int | None = None) -> bytes:
        """A member's bytes (its first `limit` bytes when given)."""
        path, offset, size = self.members[key][suffix]
        size = size if limit is None else min(size, limit)
        if self._pid != os.getpid():  # forked without reopen(): never share a file position
            self.reopen()
        with self._lock:
            handle = self._files.get(path)
            if handle is None:
                handle = self._files[path] = open(path, "rb")  # kept open, closed when evicted
                if len(self._files) > 32:
                    self._files.popitem(last=False)[1].close()
            else:
                self._files.move_to_end(path)
            return os.pread(handle.fileno(), size, offset)  # no shared file position

    def __getstate__(self) -> dict:  # open files stay behind when the store is pickled (spawned workers)
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.RLock())

    def _npy(self, key: str, suffix: str) -> np.ndarray:
        path = self.members[key][suffix][0]
        try:
            return np.load(io.BytesIO(self._read(key, suffix)), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: member {key}.{suffix} is not a plain .npy array: {e}") from e

    def _npy_shape(self, key: str, suffix: str) -> tuple:
        """A member's array shape from its .npy header alone (a few hundred bytes, not the array)."""
        path = self.members[key][suffix][0]
        try:
            return npy_shape(self._read(key, suffix, 4096))
        except ValueError as e:
            raise ValueError(f"{path}: member {key}.{suffix} has no readable .npy header: {e}") from None

    def _check_width(self, key: str, width: int) -> None:
        """Every sample's features as wide as the first one checked (the model reads one width)."""
        if self.width is None:
            self.width = width
        elif width != self.width:
            raise ValueError(f"{self._shard_of(key)}: sample {key} has features {width} wide, the other samples of "
                             f"{self.folder} {self.width}: keep the features of one extraction recipe per folder")

    def _shard_of(self, key: str) -> Path:
        return next(iter(self.members[key].values()))[0]

    def sample_info(self, key: str) -> dict:
        """A sample's JSON: an object with a positive whole `width` and `height`, else ValueError
        naming the shard and the key."""
        missing = [s for s in FINETUNING_MEMBERS if s not in self.members[key]]
        if missing:
            raise ValueError(f"{self._shard_of(key)}: sample {key} lacks {missing}")
        where = f"{self.members[key]['json'][0]}: sample {key}"
        try:
            info = json.loads(self._read(key, "json"))
        except ValueError as e:
            raise ValueError(f"{where}: its json member is not valid JSON ({e})") from None
        if not isinstance(info, dict):
            raise ValueError(f"{where}: its json member is a JSON {type(info).__name__}, expected an object")
        for field in ("width", "height"):
            value = info.get(field)
            if not _positive_whole(value):
                raise ValueError(f"{where}: image {field} {value!r}, expected a whole number > 0")
        return info

    def _checked_regions(self, key: str) -> Regions:
        """A sample read and checked once (then cached): shapes, finite features and boxes, image size."""
        info = self.sample_info(key)
        feats = self._npy(key, "features.npy").astype(np.float32)
        boxes = self._npy(key, "boxes.npy").astype(np.float32)
        where = f"{self.members[key]['json'][0]}: sample {key}"
        if feats.ndim != 2 or boxes.shape != (len(feats), 4) or len(feats) == 0:
            raise ValueError(f"{where} has features {feats.shape}, boxes {boxes.shape} "
                             "(expected (N, F) and (N, 4), N > 0)")
        self._check_width(key, feats.shape[1])
        for what, array in (("feature values", feats), ("box coordinates", boxes)):
            finite = np.isfinite(array)
            if not finite.all():
                raise ValueError(f"{where}: {int(finite.size - np.count_nonzero(finite))} of its {array.size} {what} "
                                 "are NaN or infinite (broken extraction weights, or an fp16 overflow)")
        return Regions(feats, boxes, int(info["width"]), int(info["height"]), key, info.get("mode", "detected"))

    def get(self, image_id) -> Regions:
        key = self.key_for(image_id)
        if key is None:
            raise KeyError(f"{self.folder}: no features for image id {image_id!r} in {len(self)} samples")
        with self._lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        regions = self._checked_regions(key)
        with self._lock:
            self.cache[key] = regions
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return regions

    def feature_size(self) -> int:
        """The features' width: of the samples checked so far, else of the first sample."""
        return self.width if self.width is not None else self.get(next(iter(self.members))).features.shape[1]


def _without_extension(name: str) -> str:
    """'x/COCO_val2014_000000000042.jpg' -> 'x/COCO_val2014_000000000042' (a dot in a folder is kept)."""
    return name.rsplit(".", 1)[0] if "." in name.rpartition("/")[2] else name


def _positive_whole(value) -> bool:
    """An image size: an int (or a whole float) > 0, never a bool, NaN or inf."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    return isinstance(value, float) and value.is_integer() and value > 0  # NaN and inf are not whole


def image_batch(store: FeatureStore, image_ids: list, max_regions: int) -> dict[str, torch.Tensor]:
    """Padded model inputs for a list of images: image_feat (B, R, F), image_loc (B, R, 5), image_mask (B, R)."""
    items = []
    for image_id in image_ids:
        r = store.get(image_id)
        n = max_regions - 1
        items.append(with_img_token(r.features[:n], r.boxes[:n], r.width, r.height))
    feat, loc, mask = pad_regions(items)
    return {"image_feat": feat, "image_loc": loc, "image_mask": mask}


def check_features(store: FeatureStore, image_ids: list, split: str) -> None:
    """Before any work: every image has a sample, its JSON is an object with a positive image size
    and its features (by their .npy header, not the array) are as wide as the others'; the values
    are checked when a sample is first read."""
    missing = [i for i in image_ids if i not in store]
    if missing:
        broken = f" (unreadable shards: {'; '.join(store.unreadable)})" if store.unreadable else ""
        raise KeyError(f"{store.folder}: no features for {len(missing)} {split} images, e.g. {missing[:5]}{broken}")
    for key in dict.fromkeys(store.key_for(i) for i in image_ids):
        if key not in store.info_checked:  # each split's evaluation checks again: read each JSON once
            store.sample_info(key)
            shape = store._npy_shape(key, "features.npy")
            if len(shape) == 2:  # another shape is refused, with the boxes', when the sample is read
                store._check_width(key, int(shape[1]))
            store.info_checked.add(key)
