"""Crash-safe WebDataset shard writing.

A shard is written as `.PREFIX-000007.tar.partial`, fsynced and atomically renamed to
`PREFIX-000007.tar` when it holds `shard_size` samples (or at the end of the run), so a complete
name always means a complete, readable shard. A re-run lists the complete shards, skips their keys
(and inputs already rejected in errors.jsonl), deletes its own stale partial files, repairs sizes.json
and continues numbering. Rank r of W uses shard indices r, r+W, r+2W, ... so ranks never collide;
sizes.json and errors.jsonl are updated under an advisory file lock. Each rank holds an exclusive
lock on `.PREFIX-rankR.lock` while it writes, so a second run of the same rank into OUT is refused
(naming the holder) instead of deleting the first one's live partial shard; a complete shard that
no longer reads is set aside as `NAME.damaged` and its images are redone.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import re
import socket
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Set

from .shard_format import ERRORS_FILE, SIZES_FILE, read_sizes

SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*-\d{6}\.tar$")  # a complete shard of any prefix


@contextmanager
def _locked(out_dir: Path):
    with open(out_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def shard_keys(path: Path) -> Set[str]:
    """Sample keys in a shard (member name up to the first dot)."""
    return shard_contents(path)[0]


def shard_contents(path: Path) -> tuple[Set[str], Set[str]]:
    """(sample keys, keys of the samples with a caption member KEY.txt) in a shard."""
    with tarfile.open(path, "r:") as archive:
        names = archive.getnames()
    return {n.split(".", 1)[0] for n in names}, {n[:-4] for n in names if n.endswith(".txt") and "." not in n[:-4]}


def read_error_sources(errors_path: Path) -> Set[str]:
    """The `path` of every input already rejected (so a re-run does not log it twice)."""
    keys: Set[str] = set()
    if errors_path.is_file():
        for line in errors_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                keys.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill, or written by hand
    return keys


class OutputBusy(RuntimeError):
    """Another process is writing the same rank of the same shards in OUT."""


def _claim(path: Path):
    """An exclusive, non-blocking lock on `path` for this process's lifetime (the kernel drops it
    when the process dies, kill -9 included); OutputBusy naming the holder if another has it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputBusy(f"{path.parent}: {holder} is writing these shards ({path.name}); wait for it to "
                         "finish, or write into another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def close_inherited_lock(identity: Optional[tuple]) -> None:
    """In a process forked from a ShardWriter's (a DataLoader worker): close the inherited descriptor
    of its lock, so that the lock goes with the writing process (a kill -9 of it frees OUT at once),
    not with an orphaned child. Closing, unlike unlocking, leaves the parent's lock in place; a
    descriptor that is not that same file (a spawned child) is left alone."""
    if identity is None:
        return
    fd, device, inode = identity
    try:
        info = os.fstat(fd)
    except OSError:
        return
    if (info.st_dev, info.st_ino) == (device, inode):
        os.close(fd)


class ShardWriter:
    def __init__(self, out_dir: str, prefix: str = "shard", shard_size: int = 1000,
                 rank: int = 0, world_size: int = 1):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_size = prefix, shard_size
        self.rank, self.world_size = rank, world_size
        self.pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")
        self.sizes_path = self.out_dir / SIZES_FILE
        self.errors_path = self.out_dir / ERRORS_FILE
        self._archive: Optional[tarfile.TarFile] = None
        self._count = 0
        self.shards_written = 0
        # before any partial file is touched: a second run of this rank would delete our live one
        self._claim = _claim(self.out_dir / f".{prefix}-rank{rank}.lock")
        self._remove_own_partials()
        complete = self._complete_shards()
        self.done_keys: Set[str] = set()
        self.captioned_keys: Set[str] = set()  # done samples that hold a caption (KEY.txt)
        self.damaged: list[str] = []  # complete shards that did not read, set aside as NAME.damaged
        self.sizes_repaired: Optional[str] = None  # why sizes.json was not usable (rewritten from the shards)
        sizes = {}
        for name, path in complete.items():
            try:
                keys, captioned = shard_contents(path)
            except (tarfile.TarError, OSError, EOFError) as error:
                self._set_aside(path, error)
                continue
            self.done_keys |= keys
            self.captioned_keys |= captioned
            sizes[name] = len(keys)
        for path in self._other_prefixes_shards():  # a re-run under another --prefix: no duplicates
            try:
                keys, captioned = shard_contents(path)
            except (tarfile.TarError, OSError, EOFError):
                continue  # its own writer sets it aside
            self.done_keys |= keys
            self.captioned_keys |= captioned
            sizes[path.name] = len(keys)  # every complete shard recounted: a broken sizes.json is made whole
        self._update_sizes(sizes)
        self.error_sources = read_error_sources(self.errors_path)
        own = [int(self.pattern.match(n).group(1)) for n in complete]
        own = [i for i in own if i % world_size == rank]
        self._next_index = max(own) + world_size if own else rank

    def lock_identity(self) -> Optional[tuple]:
        """(fd, device, inode) of this rank's lock file, for close_inherited_lock in a forked child."""
        if self._claim is None or self._claim.closed:
            return None
        info = os.fstat(self._claim.fileno())
        return self._claim.fileno(), info.st_dev, info.st_ino

    # ----- discovery -----------------------------------------------------------------------
    def _complete_shards(self) -> Dict[str, Path]:
        return {p.name: p for p in sorted(self.out_dir.iterdir()) if self.pattern.match(p.name)}

    def _other_prefixes_shards(self) -> list:
        """Complete shards of other prefixes in the folder (PREFIX-NNNNNN.tar): their samples are done too."""
        return [p for p in sorted(self.out_dir.iterdir())
                if SHARD_NAME.match(p.name) and not self.pattern.match(p.name) and p.is_file()]

    def _set_aside(self, path: Path, error: Exception) -> None:
        """A complete shard that cannot be read (damaged on disk, cut by a full disk elsewhere) is
        renamed NAME.damaged, out of every reader's glob, and its images are extracted again."""
        try:
            os.replace(path, path.with_name(path.name + ".damaged"))
        except FileNotFoundError:
            pass  # another rank set it aside first
        self.damaged.append(f"{path.name}: {type(error).__name__}: {error}")

    def _partial_path(self, index: int) -> Path:
        return self.out_dir / f".{self.prefix}-{index:06d}.tar.partial"

    def _remove_own_partials(self) -> None:
        for path in self.out_dir.glob(f".{self.prefix}-*.tar.partial"):
            match = re.search(r"-(\d{6})\.tar\.partial$", path.name)
            if match and int(match.group(1)) % self.world_size == self.rank:
                path.unlink()

    # ----- bookkeeping files ---------------------------------------------------------------
    def _update_sizes(self, entries: Dict[str, int]) -> None:
        with _locked(self.out_dir):
            sizes = self._listed_sizes()
            sizes.update(entries)
            sizes = {k: sizes[k] for k in sorted(sizes) if (self.out_dir / k).is_file()}
            temporary = self.sizes_path.with_name(f".{SIZES_FILE}.{os.getpid()}")
            temporary.write_text(json.dumps(sizes, indent=1) + "\n")
            os.replace(temporary, self.sizes_path)

    def _listed_sizes(self) -> Dict[str, int]:
        """sizes.json as it stands; {} when it is missing or broken (not JSON, not an object, a count
        that is not a whole number >= 0), the reason kept in `sizes_repaired`: the complete shards
        are recounted when the writer opens, so the file is rewritten whole."""
        if not self.sizes_path.is_file():
            return {}
        try:
            return read_sizes(self.sizes_path)
        except ValueError as error:
            self.sizes_repaired = str(error)
            return {}

    def log_error(self, key: str, path: str, reason: str) -> None:
        line = json.dumps({"key": key, "path": path, "reason": reason}, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8 (surrogate escapes): \u-escaped JSON
            line = json.dumps({"key": key, "path": path, "reason": reason}, ensure_ascii=True)
        with _locked(self.out_dir):
            with open(self.errors_path, "ab+") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() > 0:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":  # a previous run was killed mid-line
                        handle.write(b"\n")
                handle.write(line.encode("utf-8") + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        self.error_sources.add(path)

    # ----- samples -------------------------------------------------------------------------
    def write(self, key: str, members: Dict[str, bytes]) -> None:
        """Add one sample; `members` maps extension ('json', 'features.npy', ...) to bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._archive is None:
            self._archive = tarfile.open(self._partial_path(self._next_index), "w:")
        now = time.time()
        for extension, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(payload), now, 0o644
            self._archive.addfile(info, io.BytesIO(payload))
        self._count += 1
        self.done_keys.add(key)
        if self._count >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._archive is None:
            return
        partial = self._partial_path(self._next_index)
        self._archive.close()
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        final = self.out_dir / f"{self.prefix}-{self._next_index:06d}.tar"
        os.replace(partial, final)
        _fsync_dir(self.out_dir)
        self._update_sizes({final.name: self._count})
        self._archive, self._count = None, 0
        self._next_index += self.world_size
        self.shards_written += 1

    def close(self) -> None:
        self._finish_shard()
        if self._claim is not None:
            self._claim.close()  # releases the lock
            self._claim = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
