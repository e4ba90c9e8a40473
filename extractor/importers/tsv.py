"""The TSV reading that `butd_tsv` and `lxmert_tsv` share: both producers write one image per line
with `csv.DictWriter(delimiter="\\t")` and no header, numeric fields as text and arrays as base64
of their raw bytes. No field needs quoting, so a line is split at its tabs and nothing else (a `"`
is a character like any other, never the start of a field spanning lines); blank lines and `#`
comment lines are passed by. Each file's format is told from its own first line: in a folder that
mixes BUTD and LXMERT files, a file of the other format is one line in errors.jsonl, not a bad
record per line."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from .driver import BadRecord, Entry, Record, per_file

# the fields of each TSV format's lines, in order (its module's docstring says what they hold)
FIELDS = {"butd-tsv": ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features"),
          "lxmert-tsv": ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                         "num_boxes", "boxes", "features")}
_FORMAT_OF_FIELD_COUNT = {len(fields): name for name, fields in FIELDS.items()}
# BUTD's generate_tsv.py writes one file per GPU: OUT.tsv.0, OUT.tsv.1, ...
_TSV_NAME = re.compile(r".*\.tsv(\.\d+)?$")
_HEAD_BYTES = 1 << 16  # enough for the tabs of a first line: every format's one long field is its last


def tsv_files(src) -> List[Path]:
    """SRC itself (a file), or the *.tsv (and *.tsv.N) files directly inside the folder SRC, sorted."""
    src = Path(src)
    if src.is_file():
        return [src]
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.is_file() and _TSV_NAME.match(p.name))
    return []


def _is_record_line(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def first_line_fields(path) -> Optional[int]:
    """Tab-separated fields on the first line of the TSV `path` that is neither blank nor a `#` comment;
    0 when it has no tab, None when the file cannot be read, is binary or has no such line."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return None
    if b"\0" in head:
        return None
    for line in head.decode("utf-8", "replace").split("\n"):
        if _is_record_line(line):
            return line.count("\t") + 1 if "\t" in line else 0
    return None


def matches(src, fieldnames: tuple) -> bool:
    """Whether some TSV of SRC has lines of `fieldnames`' length (each file's first line decides)."""
    return any(first_line_fields(path) == len(fieldnames) for path in tsv_files(src))


def _refuse_other_format(path: Path, fmt: str, fieldnames: tuple) -> None:
    """BadRecord when the file's first line has the field count of another TSV format than `fmt`."""
    fields = first_line_fields(path)
    other = _FORMAT_OF_FIELD_COUNT.get(fields)
    if other is not None and other != fmt:
        raise BadRecord(f"a file of the {other} format (its first line has {fields} fields, {fmt} lines "
                        f"{len(fieldnames)}): import it with --format {other} into another OUT")


def entries(src, fmt: str, fieldnames: tuple, decode: Callable[[Dict[str, str]], Record]) -> Iterator[Entry]:
    """One Entry per record line of every TSV of SRC; a line with too few or too many fields decodes to
    BadRecord; a file that cannot be read, or is of another format, is one unreadable-file Entry."""
    return per_file(tsv_files(src), lambda path: _file_entries(path, fmt, fieldnames, decode))


def _file_entries(path: Path, fmt: str, fieldnames: tuple, decode) -> Iterator[Entry]:
    _refuse_other_format(path, fmt, fieldnames)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not _is_record_line(line):
                continue
            row = line.split("\t")
            yield Entry(row[0].strip(), f"{path}:{number}", _decoder(row, fieldnames, decode))


def _decoder(row: List[str], fieldnames: tuple, decode) -> Callable[[], Record]:
    def run() -> Record:
        if len(row) != len(fieldnames):
            raise BadRecord(f"{len(row)} tab-separated fields, expected {len(fieldnames)} "
                            f"({', '.join(fieldnames)}); a line cut short?")
        return decode(dict(zip(fieldnames, row)))

    return run
