"""Reading weight, state and pickle files without executing what they hold, and only when they are regular files."""
from __future__ import annotations

import _codecs
import builtins
import collections
import importlib
import io
import os
import pickle
import re
import stat
from pathlib import Path

import numpy as np

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path, what: str = "file") -> Path:
    """`path` as a Path if it names a regular file (a symlink to one counts), checked before anything
    opens it: opening a FIFO blocks until a writer comes, and a device or socket is no data file.
    FileNotFoundError "PATH: WHAT not found" if nothing is there; ValueError "PATH: not a regular file
    (a FIFO): expected WHAT" for anything else."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as error:  # a symlink loop, a name too long, a folder this user may not enter
        raise ValueError(f"{path}: {what} cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise ValueError(f"{path}: not a regular file ({kind}): expected {what}")
    return path


def refusal(path, error: Exception) -> str:
    """One line for a file torch.load(weights_only=True) refused: torch's reason (the Python global
    the file would import and call, or the pickle instruction it would need) and that nothing ran.
    Torch's own advice to retry with weights_only=False is not repeated: that would run the file."""
    text = str(error)
    if "Weights only load failed" in text:
        named = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", text)))
        reason = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+", text)
        detail = f"it names {', '.join(named)}" if named else (reason.group(0) if reason else "see torch.load")
        return (f"{path}: refused: the file holds pickled data beyond tensors and plain containers ({detail}), "
                "which only a code-running unpickler reads; nothing from it was run")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"{path}: not a readable weights-only PyTorch file ({first})"


# ----- pickles of plain data ---------------------------------------------------------------------
# A pickle can name any importable callable and have it called while loading. These admit only
# inert builtin types (and, where asked, numpy arrays); anything else is refused before it is called.
_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str", "bytes",
             "bytearray", "unicode", "long"}
_PY2_NAMES = {"unicode": "str", "long": "int"}
_INERT = {("collections", "OrderedDict"), ("_codecs", "encode")}  # OrderedDict; bytes of a Python 2 pickle
# numpy moved its internals from numpy.core to numpy._core in 2.0; pickles name either
_NUMPY_GLOBALS = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}


class UnsafePickle(ValueError):
    """A pickle that names a global beyond plain data (or numpy arrays, where they are admitted)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Builtin containers, numbers and strings; with numpy=True also numpy arrays, dtypes and scalars.
    Subclasses may override `refuse` to raise their own error."""

    def __init__(self, file, source: str, numpy: bool = True, encoding: str = "latin1", errors: str = "strict"):
        super().__init__(file, encoding=encoding, errors=errors)
        self.source, self.numpy = str(source), numpy

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(builtins, _PY2_NAMES.get(name, name))
        if (module, name) in _INERT:
            return {"OrderedDict": collections.OrderedDict, "encode": _codecs.encode}[name]
        if self.numpy and module in ("numpy", "numpy.core", "numpy._core") and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if self.numpy and module.startswith(("numpy.core.", "numpy._core.")) and \
                (module.rsplit(".", 1)[1], name) in _NUMPY_GLOBALS:
            core = "numpy._core." if hasattr(np, "_core") else "numpy.core."
            return getattr(importlib.import_module(core + module.rsplit(".", 1)[1]), name)
        self.refuse(module, name)

    def refuse(self, module: str, name: str):
        kinds = "dicts, lists, numbers, strings" + (" and numpy arrays" if self.numpy else "")
        raise UnsafePickle(f"{self.source}: refusing to unpickle global {module}.{name}; only {kinds} are allowed, "
                           "so nothing in it was run")

    def persistent_load(self, pid):
        raise UnsafePickle(f"{self.source}: refusing a pickle with persistent ids; nothing in it was run")


def restricted_loads(data: bytes, source: str, numpy: bool = True):
    """Unpickle `data` with RestrictedUnpickler: UnsafePickle for a forbidden global, ValueError for
    bytes that are not a (complete) pickle."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source, numpy).load()
    except UnsafePickle:
        raise
    except Exception as error:  # truncated or corrupt data
        raise ValueError(f"{source}: not a readable pickle ({type(error).__name__}: {error})") from error
