"""Shard sources (a directory, a brace pattern, a `pipe:` URL or a list of them), their sample
counts (sizes.json), the feature recipe, and the counter of skipped shards and samples."""
from __future__ import annotations

import json
import multiprocessing
import warnings
from pathlib import Path

import webdataset as wds

from common.shard_format import RECIPE_FIELDS, RECIPE_FILE, SIZES_FILE, read_sizes

from .tario import iter_tar, load_npy, open_shard

ERROR_KINDS = ("corrupt_shards", "bad_samples", "uncaptioned", "unreadable_text_files")


class RecipeMismatch(ValueError):
    """Shards made with different feature recipes were mixed without allow_mixed_recipes=True."""


class DataWarning(UserWarning):
    """A shard or sample was skipped."""


def _is_url(source: str) -> bool:
    return source.startswith("pipe:") or "://" in source


def expand_shards(source) -> list[str]:
    """Shard URLs from a directory (its `*.tar`, sorted; never hidden in-progress files), a brace
    pattern, a `pipe:` / remote URL, a single .tar, or a list of any of these."""
    if isinstance(source, (list, tuple)):
        return [url for item in source for url in expand_shards(item)]
    source = str(source)
    if not _is_url(source) and Path(source).is_dir():
        urls = sorted(str(p) for p in Path(source).glob("*.tar")
                      if p.is_file() and not p.name.startswith("."))  # never a FIFO: it would block
        if not urls:
            raise FileNotFoundError(f"{source}: directory holds no .tar shards")
        return urls
    urls = wds.shardlists.expand_urls(source)
    special = [u for u in urls if not _is_url(u) and Path(u).exists() and not Path(u).is_file()]
    if special:  # a FIFO or device would block the reader forever
        raise ValueError(f"{special[0]}: not a regular file (a FIFO, device or folder), not a shard")
    missing = [u for u in urls if not _is_url(u) and not Path(u).is_file()]
    if missing and any(c in missing[0] for c in "*?["):
        raise FileNotFoundError(
            f"{missing[0]}: no such shard; glob patterns (*, ?, [...]) are not expanded (a quoted glob reaches "
            "the program as it is): give the folder of the shards, or a brace pattern such as "
            "shard-{000000..000009}.tar")
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]} (from {source!r})")
    return urls


def local_dirs(urls: list[str]) -> dict[Path, list[str]]:
    """Folder -> shard file names, for the local shards among urls."""
    folders: dict[Path, list[str]] = {}
    for url in urls:
        if not _is_url(url):
            folders.setdefault(Path(url).parent, []).append(Path(url).name)
    return folders


def count_samples(urls: list[str]) -> int | None:
    """Total samples from the shards' sizes.json files, or None if any shard is not listed there."""
    if any(_is_url(u) for u in urls):
        return None
    total = 0
    for folder, names in local_dirs(urls).items():
        path = folder / SIZES_FILE
        if not path.is_file():
            return None
        sizes = read_sizes(path)  # ValueError naming the file: not JSON, or a count not a whole number >= 0
        if any(name not in sizes for name in names):
            return None
        total += sum(sizes[name] for name in names)
    return total


def uncounted(urls: list[str]) -> str:
    """Why count_samples gives no count for `urls` (for the error that asks for --samples-per-epoch):
    remote shards, folders without sizes.json, the shards no sizes.json lists, or counts that are all 0."""
    if any(_is_url(u) for u in urls):
        return "remote shards have no sizes.json"
    unlisted, listed = [], 0
    for folder, names in local_dirs(urls).items():
        path = folder / SIZES_FILE
        if not path.is_file():
            return f"{folder} has no {SIZES_FILE}"
        sizes = read_sizes(path)
        unlisted += [str(folder / name) for name in names if name not in sizes]
        listed += sum(sizes.get(name, 0) for name in names)
    if unlisted:
        more = f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""
        return f"{SIZES_FILE} does not list {unlisted[0]}{more}"
    return f"{SIZES_FILE} gives every one of these {len(urls)} shard(s) 0 samples" if not listed else ""


def recipe_of(meta) -> dict:
    """The feature-recipe fields of a sample's JSON (unknown fields ignored); ValueError for one that is
    not a JSON object, so that such a sample is malformed."""
    if not isinstance(meta, dict):
        raise ValueError(f"the sample's json is a JSON {json_kind(meta)}, expected an object")
    return {k: meta[k] for k in RECIPE_FIELDS if k in meta}


def json_kind(value) -> str:
    """JSON's name for the type of a decoded value (null, string, array, ...)."""
    names = {type(None): "null", bool: "boolean", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "number")


def _recipe_file(path: Path) -> dict:
    """The recipe fields of a folder's recipe.json; ValueError naming the file unless it is a JSON
    object holding at least `detector` and `weights_hash` (what every writer records)."""
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a JSON {json_kind(recipe)}, expected an object of the feature recipe's "
                         "fields (detector, weights_hash, ...)")
    lacking = [name for name in ("detector", "weights_hash") if name not in recipe]
    if lacking:
        raise ValueError(f"{path}: no {' or '.join(lacking)}; a recipe.json is the object of the feature "
                         "recipe's fields (detector, weights_hash, ...) that vilbert-extract writes")
    return recipe_of(recipe)


def _first_member(url: str, suffix: str) -> bytes:
    """The bytes of the first member named *suffix in a shard; ValueError if the shard is corrupt
    or has none."""
    stream = open_shard(url)
    try:
        for name, data in iter_tar(stream):
            if name.endswith(suffix):
                return bytes(data)
    finally:
        try:
            stream.close()
        except OSError:
            pass  # a pipe: stopped early reports a broken pipe
    raise ValueError(f"no sample with a {suffix.lstrip('.')} member")


def from_first_readable_shard(urls: list[str], read, failure: str, tries: int = 10):
    """(read(url), url) for the first of `urls` that `read` succeeds on (a corrupt shard is passed
    over); ValueError(`failure`: why each of the first `tries` failed) if none does."""
    problems = []
    for url in urls[:tries]:
        try:
            return read(url), url
        except (OSError, ValueError, EOFError) as error:
            problems.append(f"{url}: {type(error).__name__}: {error}")
    raise ValueError(f"{failure}: " + "; ".join(problems))


def region_widths(urls: list[str]) -> tuple[tuple[int, int], str]:
    """((feature width F, class-distribution width C), the shard they were read from): the first
    sample of the first readable shard. Every sample a run trains on must have these widths."""

    def read(url: str) -> tuple[int, int]:
        widths = []
        for name in ("features.npy", "cls_prob.npy"):
            array = load_npy(_first_member(url, "." + name))
            if array.ndim != 2:
                raise ValueError(f"{name} of shape {array.shape}, expected (N, D)")
            widths.append(int(array.shape[1]))
        return widths[0], widths[1]

    return from_first_readable_shard(urls, read, "cannot read the region feature width")


def read_recipe(urls: list[str], allow_mixed: bool = False) -> dict:
    """The feature recipe of the shards: from each folder's recipe.json, else from the first
    sample of the first readable shard. Differing recipes raise RecipeMismatch unless allow_mixed, in
    which case the result is {"mixed": [recipe, ...]}."""
    found: dict[str, dict] = {}
    for folder in local_dirs(urls):
        path = folder / RECIPE_FILE
        if path.is_file():
            found[str(path)] = _recipe_file(path)
    if not found:  # no recipe.json: the first shard that can tell
        recipe, url = from_first_readable_shard(
            urls, lambda url: recipe_of(json.loads(_first_member(url, ".json"))),
            "no shard tells the feature recipe (and no recipe.json beside them)")
        found[url] = recipe
    distinct = []
    for recipe in found.values():
        if recipe not in distinct:
            distinct.append(recipe)
    if len(distinct) == 1:
        return distinct[0]
    if not allow_mixed:
        where = "; ".join(f"{src}: {recipe}" for src, recipe in found.items())
        raise RecipeMismatch(f"shards of different feature recipes ({where}); "
                             "pass allow_mixed_recipes=True to train on them together")
    return {"mixed": distinct}


def refuse_without_class_targets(urls: list[str]) -> None:
    """ValueError (one line) when a folder's recipe.json says its samples have no class distributions
    (features imported from a source without them, vilbert-import): the masked-region targets of
    pretraining are those distributions, so such shards serve fine-tuning and evaluation only."""
    for folder in local_dirs(urls):
        path = folder / RECIPE_FILE
        try:
            recipe = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            continue  # read_recipe names the broken file
        if isinstance(recipe, dict) and recipe.get("cls_prob") == "missing":
            raise ValueError(
                f"{folder}: imported from {recipe.get('source_format', 'another format')} without class "
                "distributions (recipe.json: cls_prob missing), and pretraining's masked-region targets are "
                "those; these shards serve fine-tuning and evaluation (vilbert-eval). To pretrain, import "
                "features that carry object ids (lxmert-tsv, h5, ...) or extract them with vilbert-extract")


def check_recipe(meta: dict, expected: dict | None, url: str, key: str) -> None:
    """Raise RecipeMismatch if a sample's recipe differs from `expected` (None: no check)."""
    if expected is None:
        return
    for field in RECIPE_FIELDS:
        if meta.get(field) != expected.get(field):
            raise RecipeMismatch(
                f"{url}: sample {key!r} has {field}={meta.get(field)!r}, but the shards' recipe has "
                f"{expected.get(field)!r}; pass allow_mixed_recipes=True to mix feature recipes")


class ErrorCounter:
    """Counts skipped shards and samples across DataLoader worker processes (shared memory) and
    warns about each. `handler` is the webdataset exception handler for shard-level errors."""

    def __init__(self):
        self._counts = multiprocessing.get_context().Array("q", len(ERROR_KINDS))

    def add(self, kind: str, message: str | None) -> None:
        with self._counts.get_lock():
            self._counts[ERROR_KINDS.index(kind)] += 1
        if message:
            warnings.warn(message, DataWarning, stacklevel=2)

    def handler(self, exn: Exception) -> bool:
        """Skip the rest of a shard that cannot be opened or read (corrupt, truncated, missing)."""
        self.add("corrupt_shards", f"skipping the rest of shard {exn}")
        return True

    def counts(self) -> dict[str, int]:
        return dict(zip(ERROR_KINDS, self._counts[:]))
