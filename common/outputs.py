"""The output folder of every command, checked before any work: a folder this process can write,
or one it can create. Nothing is created by the check, so a refused run leaves no trace; and a run
that fails before it made anything takes back what it created (`undo_failed_start`)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Set


def writable_folder(path, option: str = "OUT") -> Path:
    """ValueError naming the option and the reason unless `path` is a folder this process can write
    into, or does not exist yet below a folder it can write into."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{option} {path}: a symlink to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a folder")
    existing = path
    while not existing.exists():  # the nearest folder that exists decides whether path can be made
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: not writable ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: not writable ({existing} is read-only for this user)")
    return path


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(path, error: OSError, kept: str) -> str:
    """The one line for a full disk (or quota): what stays intact and how to go on."""
    return (f"{path}: the disk is full ({error.strerror or error}); {kept}; free some space and re-run the "
            "same command to resume")


def folder_entries(path) -> Optional[Set[str]]:
    """The names in folder `path`, or None when it does not exist (see undo_failed_start)."""
    path = Path(path)
    return set(os.listdir(path)) if path.is_dir() else None


def undo_failed_start(path, before: Optional[Set[str]], made_progress: Callable[[str], bool]) -> bool:
    """After a run failed: if none of the names it added to folder `path` is progress (e.g. a
    complete shard or an error log), remove what it added (metadata, locks, partial files) and the
    folder itself if it created it, so the next run finds `path` as it was. -> whether it undid."""
    path = Path(path)
    added = (folder_entries(path) or set()) - (before or set())
    if any(made_progress(name) for name in added):
        return False
    for name in added:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    if before is None:
        with contextlib.suppress(OSError):
            path.rmdir()  # only if empty
    return True
