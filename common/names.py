"""File names made from data (image ids, sentence ids, keys): never a path, never outside the folder."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_name(text, max_length: int = 80) -> str:
    """`text` as one path component of [A-Za-z0-9_-]: unchanged when it already is one, else its
    safe characters (others become "_") plus a short hash of the original, so that different names
    never collide ('../../x' -> '______x-8ae5…'; '猫' and '犬' differ)."""
    text = str(text)
    name = _UNSAFE.sub("_", text)[:max_length]
    if name == text and name:
        return name
    return hashed_key(name, text)


def image_key(name: str) -> str:
    """A sample key made from an image's name (its path under IMAGES without the extension):
    'photos/a b.v2' -> 'photos_a_b_v2' (WebDataset splits keys at the first dot). A name with
    characters outside ASCII also gets a short hash of itself ('猫' -> '_-4f1e…'), so that two such
    names of the same length never share a key; ASCII names keep their keys of earlier runs."""
    key = _UNSAFE.sub("_", name)
    return key if name.isascii() else hashed_key(key, name)


def hashed_key(key: str, name: str) -> str:
    """`key` told apart from the other names it stands for: key-<10 hex digits of sha1(name)>."""
    return f"{key}-{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


_COCO_FILE = re.compile(r"(?:^|_)COCO_[A-Za-z]+\d{4}_(\d+)$")


def coco_number(key: str) -> int | None:
    """The image id a key or name stands for when it is one: a number ('42', '000042') or a COCO
    file name, in a folder or not ('COCO_val2014_000000000042', 'val2014_COCO_val2014_000000000042'
    -> 42); None for any other name, so that 'img_42' of another dataset never stands for COCO's 42."""
    if not key.isascii():
        return None
    if key.isdigit():
        return int(key)
    m = _COCO_FILE.search(key)
    return int(m.group(1)) if m else None


def inside(folder, relative: str):
    """folder / relative when that stays inside folder (no absolute path, no '..' out of it), else None."""
    base = Path(folder).resolve()
    path = (base / str(relative)).resolve()
    return path if path == base or base in path.parents else None


def plain_name(text) -> bool:
    """Whether `text` (a split name, say) can be part of a file name in an output folder as it is: not
    empty, no path separator or NUL, no '..', no leading '.'."""
    return isinstance(text, str) and bool(text) and not any(c in text for c in "/\\\0") and ".." not in text \
        and not text.startswith(".")
