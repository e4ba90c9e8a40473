"""The import loop every reader shares: each `driver.Entry` of a source imported, skipped (already
in OUT's complete shards, or logged in errors.jsonl) or logged with its reason, through
`common.shard_writer.ShardWriter` (resume, errors.jsonl, progress bar, recipe.json)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

from tqdm import tqdm

from common.names import safe_name
from common.shard_writer import ShardWriter

from .driver import Captions, Carries, Entry, carries_of, check, encode, one_line_reason, recipe_header


@dataclass
class ImportSettings:
    fmt: str
    source: str
    captions: Optional[Captions] = None
    progress: bool = True
    total: Optional[int] = None  # records in the source, for the progress bar (None: unknown)
    id_hint: str = ""  # appended to an out-of-range objects_id error (the format's id convention)
    notes: Dict[str, int] = field(default_factory=dict)


def probe(entries: Iterable[Entry], id_hint: str = "") -> Optional[Carries]:
    """What the source carries, from its first record that decodes and checks; None if none does."""
    iterator = iter(entries)
    try:
        for entry in iterator:
            try:
                record = entry.decode()
                carries = carries_of(record)
                check(record, carries, id_hint)
                return carries
            except (ValueError, KeyError, TypeError, OSError):
                continue
        return None
    finally:
        getattr(iterator, "close", lambda: None)()  # its file or LMDB closes before the import opens it again


class _Import:
    """One import's state: what the source carries, its recipe, what became of each entry."""

    def __init__(self, writer: ShardWriter, settings: ImportSettings, carries: Optional[Carries],
                 check_recipe: Callable[[Path, Dict], None]):
        self.writer, self.settings, self.check_recipe = writer, settings, check_recipe
        self.carries = carries
        self.header = None if carries is None else self._recipe(carries)
        self.counts = dict(done=0, skipped=0, failed=0, captioned=0, in_shards=0)
        self.unreadable_files: List[str] = []  # "path: reason" of the source's files that could not be read
        self.written: set = set()

    def _recipe(self, carries: Carries) -> Dict:
        header = recipe_header(self.settings.fmt, self.settings.source, carries)
        self.check_recipe(self.writer.out_dir, header)  # RecipeMismatch when OUT was made from another source
        return header

    def take(self, entry: Entry) -> None:
        """Import, skip or log one entry."""
        if entry.file_error is not None:
            return self._unreadable(entry)
        key = safe_name(entry.image_id) if entry.image_id else ""
        if entry.where in self.writer.error_sources:
            self.counts["skipped"] += 1
        elif key in self.writer.done_keys and key not in self.written:
            self.counts["skipped"] += 1
            self.counts["in_shards"] += 1
        elif not entry.image_id:
            self._failed(key, entry, "no image id (the record's id field is empty)")
        elif key in self.written:
            self._failed(key, entry, f"duplicate image id {entry.image_id!r}: its first record is imported")
        else:
            self._import(key, entry)

    def _import(self, key: str, entry: Entry) -> None:
        try:
            record = entry.decode()
            arrays = check(record, self.carries or carries_of(record), self.settings.id_hint)
        except (ValueError, KeyError, TypeError, OSError) as error:  # OSError: a damaged HDF5 chunk, a lost file
            return self._failed(key, entry, one_line_reason(error))
        for note in record.notes:
            self.settings.notes[note] = self.settings.notes.get(note, 0) + 1
        if self.header is None:  # the probe read no record (a read error that passed): this first good one decides
            self.carries = carries_of(record)
            self.header = self._recipe(self.carries)
        caption = self.settings.captions.get(entry.image_id) if self.settings.captions else None
        self.writer.write(key, encode(entry.image_id, entry.where, arrays, self.header, caption))
        self.written.add(key)
        self.counts["done"] += 1
        self.counts["in_shards"] += 1
        self.counts["captioned"] += bool(caption)

    def _failed(self, key: str, entry: Entry, reason: str) -> None:
        self.writer.log_error(key, entry.where, reason)
        self.counts["failed"] += 1

    def _unreadable(self, entry: Entry) -> None:
        """A file that could not be read is tried again by every run (it may have been mended), and
        logged once, also over resumed runs."""
        self.unreadable_files.append(f"{entry.where}: {entry.file_error}")
        if entry.where not in self.writer.error_sources:
            self.writer.log_error(safe_name(entry.image_id), entry.where, entry.file_error)


def run_import(entries: Callable[[], Iterator[Entry]], writer: ShardWriter, settings: ImportSettings,
               check_recipe: Callable[[Path, Dict], None]) -> Dict:
    """Import every record not already in OUT's complete shards (nor in errors.jsonl); the summary counts
    (`in_shards`: the source's records now in OUT's shards; `unreadable_files`: "path: reason" lines).
    `check_recipe(out_dir, header)` records the recipe or refuses OUT (vilbert-extract's rule, given by the CLI)."""
    run = _Import(writer, settings, probe(entries(), settings.id_hint), check_recipe)
    started = time.time()
    bar = tqdm(entries(), total=settings.total, unit="rec", disable=not settings.progress,
               desc=f"import {settings.fmt}")
    for entry in bar:
        run.take(entry)
    bar.close()
    writer.close()
    elapsed, carries = time.time() - started, run.carries
    return dict(format=settings.fmt, **run.counts, unreadable_files=run.unreadable_files,
                shards_written=writer.shards_written, seconds=round(elapsed, 3),
                records_per_second=round(run.counts["done"] / elapsed, 1) if elapsed else 0.0,
                cls_prob=carries.cls_prob if carries else None, attr_prob=carries.attr_prob if carries else None,
                feature_dim=carries.feature_dim if carries else None, notes=dict(settings.notes))
