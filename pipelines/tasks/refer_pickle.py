"""Read `refs(unc).p` (and other plain-data pickles such as an answer list) without executing code.

The refer toolkit stores its annotations as a Python 2 pickle (protocol 2) of lists, dicts,
strings and numbers. A pickle can name any importable callable and have it called while loading,
so this unpickler admits no global except a few inert builtin container and number types, and
refuses everything else (os.system, eval, subprocess, ...) before anything is called.
"""
from __future__ import annotations

import io
from pathlib import Path

from common.safe_load import RestrictedUnpickler, UnsafePickle, regular_file


class UnsafePickleError(UnsafePickle):
    pass


class _PlainDataUnpickler(RestrictedUnpickler):
    """common.safe_load's unpickler without numpy: builtin containers, strings and numbers only."""

    def __init__(self, file, source: str):
        super().__init__(file, source, numpy=False, encoding="utf-8", errors="replace")

    def refuse(self, module, name):
        raise UnsafePickleError(
            f"{self.source}: refused to load: the pickle references {module}.{name}; only plain data "
            f"(lists, dicts, strings, numbers) is accepted, so nothing in it is executed")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused to load: the pickle uses persistent ids")


def load_plain_pickle(path: str | Path):
    """Unpickle `path`, admitting only builtin containers, strings and numbers."""
    path = regular_file(path, "pickle")  # "PATH: pickle not found"; a FIFO would block the read
    data = path.read_bytes()
    try:
        return _PlainDataUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or corrupt data
        raise ValueError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from e


REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def load_refs(path: str | Path) -> list[dict]:
    """The refer toolkit's `refs(unc).p`: a list of dicts, one per referred object, each with
    ref_id, ann_id, image_id, split and sentences ([{"raw": ..., "sent_id": ...}, ...])."""
    refs = load_plain_pickle(path)
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    seen: dict = {}
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict) or any(k not in ref for k in REF_KEYS):
            raise ValueError(f"{path}: ref #{i} is not a dict with keys {list(REF_KEYS)}")
        if (not isinstance(ref["sentences"], list)
                or not all(isinstance(s, dict) and "raw" in s for s in ref["sentences"])):
            raise ValueError(f"{path}: ref #{i} (ref_id {ref['ref_id']}): sentences must be dicts with 'raw'")
        for key in ("ref_id", "ann_id", "image_id"):  # the toolkit's ids are ints; '12' would match nothing
            if not isinstance(ref[key], int) or isinstance(ref[key], bool):
                raise ValueError(f"{path}: ref #{i} (ref_id {ref['ref_id']!r}): {key!r} is {ref[key]!r} "
                                 f"({type(ref[key]).__name__}), expected an int as in the refer toolkit")
        if ref["ref_id"] in seen:  # the toolkit indexes refs by ref_id: a second one would be counted twice
            raise ValueError(f"{path}: ref #{i}: ref_id {ref['ref_id']} appears twice (first as ref "
                             f"#{seen[ref['ref_id']]})")
        seen[ref["ref_id"]] = i
    return refs
