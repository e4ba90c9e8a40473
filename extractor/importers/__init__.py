"""`vilbert-import`: region features made elsewhere -> shards in exactly vilbert-extract's format.

One module per source format, each with `NAME`, `matches(src)` (cheap, for auto-detection),
`count(src)` (records, or None) and `entries(src)` (`driver.Entry`s, decoded lazily; a file that
cannot be read is one Entry saying why); `driver` checks and encodes them, `loop` writes them;
`export` goes the other way (shards -> h5 / butd-tsv)."""
from __future__ import annotations

from pathlib import Path

from . import butd_tsv, h5, lxmert_tsv, npz, vilbert_lmdb

FORMATS = {module.NAME: module for module in (butd_tsv, lxmert_tsv, vilbert_lmdb, npz, h5)}


def detect_format(src) -> str:
    """The one format SRC is in; ValueError naming the candidates when none or several fit."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    found = [name for name, module in FORMATS.items() if module.matches(src)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{src}: holds features in several formats ({', '.join(found)}); pass --format")
    raise ValueError(f"{src}: not a format vilbert-import recognises ({', '.join(FORMATS)}: a 6- or 10-field TSV, "
                     "an LMDB folder with data.mdb, .npz files, an HDF5 file); pass --format")
