"""The TSV reading that `butd_tsv` and `lxmert_tsv` share: both producers write one image per line
with `csv.DictWriter(delimiter="\\t")` and no header, numeric fields as text and arrays as base64
of their raw bytes; a field can be megabytes, so csv's field size limit is raised."""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List

from .driver import BadRecord, Entry, Record

# BUTD's generate_tsv.py writes one file per GPU: OUT.tsv.0, OUT.tsv.1, ...
_TSV_NAME = re.compile(r".*\.tsv(\.\d+)?$")


def _raise_field_limit() -> None:
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # a C long of 32 bits
        csv.field_size_limit(2**31 - 1)


def tsv_files(src) -> List[Path]:
    """SRC itself (a file), or the *.tsv (and *.tsv.N) files directly inside the folder SRC, sorted."""
    src = Path(src)
    if src.is_file():
        return [src]
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.is_file() and _TSV_NAME.match(p.name))
    return []


def first_line_fields(src) -> int:
    """Tab-separated fields on the first line of SRC's first TSV (0 when there is none or it is binary)."""
    files = tsv_files(src)
    if not files:
        return 0
    with open(files[0], "rb") as handle:
        head = handle.read(1 << 16)
    if b"\0" in head or not head:
        return 0
    line = head.split(b"\n", 1)[0]
    return line.count(b"\t") + 1 if b"\t" in line else 0


def entries(src, fieldnames: tuple, decode: Callable[[Dict[str, str]], Record]) -> Iterator[Entry]:
    """One Entry per line of every TSV of SRC; a line with too few or too many fields decodes to BadRecord."""
    _raise_field_limit()
    for path in tsv_files(src):
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.reader(handle, delimiter="\t")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row:
                    continue
                yield Entry(row[0].strip() or f"line-{reader.line_num}", where, _decoder(row, fieldnames, decode))


def _decoder(row: List[str], fieldnames: tuple, decode) -> Callable[[], Record]:
    def run() -> Record:
        if len(row) != len(fieldnames):
            raise BadRecord(f"{len(row)} tab-separated fields, expected {len(fieldnames)} "
                            f"({', '.join(fieldnames)}); a line cut short?")
        return decode(dict(zip(fieldnames, row)))

    return run
