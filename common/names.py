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
    return f"{name}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


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
