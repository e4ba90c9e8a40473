"""Reading shards into samples, and safe decoding and validation of each (docs/shard-format.md).

Only `.npy` (numpy, never pickled objects), `.json` and `.txt` members are ever decoded; any other
member (`.pyd`, `.pickle`, ...) is dropped unread, so a shard can never run pickled code."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from common.shard_format import PRETRAINING_MEMBERS

from .shards import ErrorCounter, check_recipe, json_kind
from .tario import iter_tar, load_npy, open_shard


class SampleError(ValueError):
    """A sample that breaks the shard format; it is skipped and counted."""


class ShardError(OSError):
    """A shard that cannot be opened or read to its end; the rest of it is skipped and counted."""


def _group_members(members: Iterable[tuple[str, bytes]], url: str, errors: ErrorCounter) -> Iterator[dict]:
    """Consecutive KEY.EXT members -> {"__key__", "__url__", EXT: bytes}; the key is the path up
    to the first dot of the file name, as webdataset groups them. A sample is yielded once the
    next key starts (or the stream ends cleanly), so one cut off by a read error never is."""
    sample = None
    for name, data in members:
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        key, ext = (name[:dot], name[dot + 1:].lower()) if dot >= 0 else (name, "")
        if sample is not None and key != sample["__key__"]:
            if "__bad__" not in sample:
                yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        if ext in sample and "__bad__" not in sample:
            errors.add("bad_samples", f"{url}: skipping sample {key!r}: duplicate member {name!r}")
            sample["__bad__"] = True
        sample[ext] = data
    if sample is not None and "__bad__" not in sample:
        yield sample


def read_shards(errors: ErrorCounter, max_failures_in_a_row: int = 100):
    """A webdataset stage: dict(url=...) -> raw samples. A shard that cannot be opened, is corrupt
    or ends early goes to `errors.handler` (the webdataset handler protocol): its complete samples
    before the damage are kept, the rest is skipped. Local paths, pipe: and remote URLs are
    read by `tario.open_shard`. So that resampling cannot spin forever on broken data,
    `max_failures_in_a_row` failed shards without a sample between them raise RuntimeError."""

    def stage(sources: Iterable[dict]) -> Iterator[dict]:
        failures = 0
        for source in sources:
            url, stream = source["url"], None
            try:
                stream = open_shard(url)
                for sample in _group_members(iter_tar(stream), url, errors):
                    failures = 0
                    yield sample
                stream.close()  # a pipe: reports its exit status here
            except (OSError, ValueError, EOFError) as exn:
                _close_quietly(stream)
                failures += 1
                if not errors.handler(ShardError(f"{url}: {type(exn).__name__}: {exn}")):
                    raise
                if failures >= max_failures_in_a_row:
                    raise RuntimeError(f"{failures} shards in a row failed, the last {url}: {exn}") from exn

    return stage


def _close_quietly(stream) -> None:
    try:
        if stream is not None:
            stream.close()
    except (OSError, ValueError):
        pass


def decode_member(name: str, data: bytes):
    """Decode a member by its extension: .npy -> ndarray, .json -> object, .txt -> str; else None."""
    if name.endswith(".npy"):
        return load_npy(data)
    if name.endswith("json"):
        return json.loads(bytes(data))
    if name.endswith("txt"):
        return bytes(data).decode("utf-8", errors="replace")
    return None


@dataclass
class RegionSample:
    """One decoded sample; arrays keep their stored dtypes (float16 features and classes)."""

    key: str
    url: str
    caption: str
    features: np.ndarray  # (N, F) float16
    boxes: np.ndarray  # (N, 4) float32, pixels x1, y1, x2, y2
    cls_prob: np.ndarray  # (N, C) float16
    size: tuple[float, float]  # (width, height)


def _array(raw: dict, name: str, columns: int | None = None) -> np.ndarray:
    try:
        array = decode_member(name, raw[name])
    except ValueError as error:
        raise SampleError(f"{name}: not a valid .npy ({error})") from None
    if array.ndim != 2 or (columns is not None and array.shape[1] != columns):
        want = f"(N, {columns})" if columns else "(N, D)"
        raise SampleError(f"{name}: shape {array.shape}, expected {want}")
    return array


def _dotted_key_hint(raw: dict, missing: list[str]) -> str:
    """When the members a sample lacks are there under longer extensions (`v1.synthetic001.json` read
    as key `v1`, extension `synthetic001.json`), the reason: a key holding a dot; else ""."""
    found = [ext for ext in raw if not ext.startswith("__") and any(ext.endswith("." + m) for m in missing)]
    if not found:
        return ""
    return (f" (members such as {raw['__key__']}.{found[0]} are there: sample keys may not contain dots, "
            "as WebDataset splits a member name at its first dot into key and extension; rename the members "
            "so that their keys have no dot)")


def parse_sample(raw: dict, max_regions: int, expected_recipe: dict | None,
                 widths: tuple[int, int] | None = None) -> RegionSample | None:
    """raw webdataset sample (member -> bytes) -> RegionSample; None when its caption is absent or empty.
    Raises SampleError for malformed samples, or ones whose feature / class widths are not `widths`
    (those of the run's first sample), and RecipeMismatch for a foreign recipe."""
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
    missing = [name for name in PRETRAINING_MEMBERS if name not in raw]
    if missing:
        raise SampleError(f"missing member(s) {', '.join(missing)}{_dotted_key_hint(raw, missing)}")
    try:
        meta = decode_member("json", raw["json"])
    except ValueError as error:
        raise SampleError(f"json: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"json: a JSON {json_kind(meta)}, expected an object")
    try:
        width, height = float(meta["width"]), float(meta["height"])
    except (ValueError, KeyError, TypeError) as error:
        raise SampleError(f"json: no valid width/height ({type(error).__name__}: {error})") from None
    if not (width > 0 and height > 0):
        raise SampleError(f"json: image size {width}x{height} is not positive")
    check_recipe(meta, expected_recipe, url, key)
    caption = decode_member("txt", raw["txt"]).strip() if "txt" in raw else ""
    if not caption:
        return None
    features = _array(raw, "features.npy")
    boxes = _array(raw, "boxes.npy", 4)
    cls_prob = _array(raw, "cls_prob.npy")
    n = len(features)
    if n == 0 or len(boxes) != n or len(cls_prob) != n:
        raise SampleError(f"region counts differ or are 0: features {n}, boxes {len(boxes)}, "
                          f"cls_prob {len(cls_prob)}")
    if widths is not None and (features.shape[1], cls_prob.shape[1]) != tuple(widths):
        raise SampleError(f"features {features.shape[1]} / classes {cls_prob.shape[1]} wide, the run's first "
                          f"sample {widths[0]} / {widths[1]}")
    return RegionSample(key, url, caption, features[:max_regions], boxes[:max_regions],
                        cls_prob[:max_regions], (width, height))


def decode_samples(errors: ErrorCounter, max_regions: int, expected_recipe: dict | None,
                   widths: tuple[int, int] | None = None):
    """A webdataset stage: raw samples -> RegionSample, skipping (and counting) bad ones."""

    def stage(source: Iterable[dict]) -> Iterator[RegionSample]:
        for raw in source:
            try:
                sample = parse_sample(raw, max_regions, expected_recipe, widths)
            except SampleError as error:
                errors.add("bad_samples", f"{raw.get('__url__', '?')}: skipping sample "
                                          f"{raw.get('__key__', '?')!r}: {error}")
                continue
            if sample is None:
                errors.add("uncaptioned", None)
                continue
            yield sample

    return stage
