"""The output folder of every command, checked before any work: a folder this process can write,
or one it can create. Nothing is created by the check, so a refused run leaves no trace; and a run
that fails before it made anything takes back what it created (`undo_failed_start`). An OUT inside an
input folder is refused (`check_out_outside`), and one run at a time writes into an OUT (`out_lock`)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
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


def check_out_outside(out: Path, inputs: dict) -> None:
    """ValueError unless `out` lies outside every input folder (inputs: option name -> folder, None
    for one not given): a run must never write its results into the user's dataset."""
    here = Path(out).resolve()
    for option, folder in inputs.items():
        if folder is None:
            continue
        there = Path(folder).resolve()
        if here == there or there in here.parents:
            raise ValueError(f"--out {out} lies inside {option} {folder}; write results elsewhere")


LOCK_NAME = ".run.lock"


def _lock_holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "another process"


@contextlib.contextmanager
def out_lock(out: Path, command: str):
    """Held for a run that writes into `out`: an exclusive flock on OUT/.run.lock (the kernel drops it
    when the process dies, kill -9 included). A second run in the same folder, of this command or
    another that takes it, is refused at once with ValueError naming the holder's pid. On exit the
    lock file is removed, and `out` too when this run created it and left it empty."""
    import fcntl
    import socket
    import time

    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        try:  # never through a symlink, never a FIFO or device put there
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ValueError(f"{path}: cannot open the run lock ({e.strerror or e}); remove it if it is not a "
                             "plain file") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{path}: the run lock is not a plain file; remove it")
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            handle.close()
            raise ValueError(f"{out}: {holder} is running in this folder ({LOCK_NAME}); wait for it to finish, "
                             "or choose another --out") from None
        try:  # the file may have been removed by a holder that finished meanwhile: lock the one in place
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{command} (pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # still holding the lock: a run that opened it meanwhile retries on the new file
        handle.close()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: a run that failed at start leaves no trace
