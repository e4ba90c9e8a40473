"""Fast, strict readers for what the shards hold: tar members (ustar / pax / GNU long names) and
.npy arrays (never pickled objects).

Python's `tarfile` in streaming mode and `np.load` on a BytesIO cost about 0.3 ms and 0.08 ms per
sample here; these read each member with three `read` calls and parse each distinct .npy header
once, so decoding is bounded by memory copies. Both raise `ValueError` on anything malformed."""
from __future__ import annotations

import io
import mmap
import os
import tokenize
from typing import BinaryIO, Iterator

import numpy as np
import numpy.lib.format as npy_format

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_HEADER_CACHE: dict[bytes, tuple[tuple, bool, np.dtype]] = {}
_HEADER_CACHE_LIMIT = 4096


class TarFormatError(ValueError):
    """A tar stream that is corrupt or ends early."""


class MappedFile:
    """A local file, memory-mapped: `read(n)` returns zero-copy memoryview slices, so member data
    goes straight from the page cache into the batch (no per-member allocation)."""

    def __init__(self, path: str):
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if size:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
        self.view, self.position = memoryview(mapped), 0

    def read(self, size: int) -> memoryview:
        chunk = self.view[self.position:self.position + size]
        self.position += len(chunk)
        return chunk

    def close(self) -> None:  # the mapping lives as long as arrays viewing it
        pass


def open_shard(url: str):
    """A local shard memory-mapped; anything else (pipe:, http://, ...) through webdataset's gopen."""
    if url.startswith("file:"):
        url = url[5:]
    if "://" not in url and not url.startswith("pipe:"):
        return MappedFile(url)
    import webdataset as wds

    return wds.gopen(url)


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"invalid tar header ({what} field {field!r})") from None


def _check_header(header: bytes) -> None:
    stored = _octal(header[148:156], "checksum")
    if sum(header[:148]) + 8 * 32 + sum(header[156:]) != stored:
        raise TarFormatError("invalid tar header (checksum mismatch)")


def _read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarFormatError(f"unexpected end of data in {what} ({len(data)} of {size} bytes)")
    return data


def _pax_path(data: bytes) -> str | None:
    """The 'path' record of a pax extended header ("LEN path=VALUE\\n" records)."""
    while data:
        length = int(data.split(b" ", 1)[0])
        record, data = data[:length], data[length:]
        key, _, value = record.split(b" ", 1)[1].partition(b"=")
        if key == b"path":
            return value[:-1].decode("utf-8")
    return None


def iter_tar(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes or memoryview) for each regular file in a tar stream; raises TarFormatError when the
    stream is corrupt or truncated (members before the damage are yielded)."""
    long_name, first = None, True
    while True:
        header = bytes(stream.read(BLOCK))
        if not header and first:
            raise TarFormatError("empty file, not a tar archive")
        if not header or header == b"\0" * BLOCK:  # end of archive
            return
        first = False
        if len(header) < BLOCK:
            raise TarFormatError(f"unexpected end of data in a tar header ({len(header)} bytes)")
        _check_header(header)
        size, kind = _octal(header[124:136], "size"), header[156:157]
        data = _read_exact(stream, size, "a tar member")
        _read_exact(stream, -size % BLOCK, "tar padding")
        if kind == b"x":
            long_name = _pax_path(bytes(data)) or long_name
        elif kind == b"L":
            long_name = bytes(data).split(b"\0", 1)[0].decode("utf-8")
        elif kind in _REGULAR:
            name = long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8") + "/" + name
            long_name = None
            yield name, data
        else:  # directories, links, global pax headers: nothing to read
            long_name = None if kind != b"g" else long_name


def _npy_header(data: bytes) -> tuple[int, tuple[tuple, bool, np.dtype]]:
    if len(data) < 10 or bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy file (bad magic)")
    major = data[6]
    if major == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        start = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy format version {major}")
    key = bytes(data[:start])
    parsed = _HEADER_CACHE.get(key)
    if parsed is None:
        reader = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
        try:
            parsed = reader(io.BytesIO(key[8:]))  # (shape, fortran_order, dtype), literal_eval only
        except (SyntaxError, ValueError, TypeError, EOFError, tokenize.TokenError) as error:  # a cut header
            raise ValueError(f"unreadable .npy header ({type(error).__name__}: {error})") from None
        if parsed[2].hasobject:
            raise ValueError("object arrays cannot be loaded when allow_pickle=False")
        if len(_HEADER_CACHE) < _HEADER_CACHE_LIMIT:
            _HEADER_CACHE[key] = parsed
    return start, parsed


def npy_shape(data: bytes | memoryview) -> tuple:
    """The array shape a .npy's header gives: its first bytes (the header) are enough; ValueError for
    a header that does not read (cut, not .npy, an object array)."""
    return _npy_header(data)[1][0]


def load_npy(data: bytes | memoryview) -> np.ndarray:
    """np.load(BytesIO(data), allow_pickle=False) without the copy: a read-only view of `data`."""
    start, (shape, fortran, dtype) = _npy_header(data)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - start < count * dtype.itemsize:
        raise ValueError(f"truncated .npy data ({len(data) - start} bytes for shape {shape} {dtype})")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
