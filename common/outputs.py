"""The output folder of every command, checked before any work: a folder this process can write."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def writable_folder(path, option: str = "OUT") -> Path:
    """Create `path` (and its parents) if needed and prove it writable with a probe file; ValueError
    naming the option and the reason if it is a file, read-only or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path}: not writable ({error.strerror or error})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: not writable")
    return path
