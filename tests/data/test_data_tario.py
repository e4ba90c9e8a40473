"""The fast tar and .npy readers (pipelines/data/tario.py) agree with tarfile / np.load and refuse
what those refuse."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from pipelines.data.tario import MappedFile, TarFormatError, iter_tar, load_npy, open_shard


def npy(array, version=None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float16).reshape(3, 4),
    np.random.default_rng(0).random((5, 7)).astype(np.float32),
    np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
    np.zeros((0, 4), np.float32),
    np.array(3.5),
])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_load_npy_matches_np_load(array, version):
    data = npy(array, version)
    expected = np.load(io.BytesIO(data), allow_pickle=False)
    for given in (data, memoryview(data)):
        loaded = load_npy(given)
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        np.testing.assert_array_equal(loaded, expected)


def test_load_npy_refuses_objects_truncation_and_garbage():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy(buffer.getvalue())
    with pytest.raises(ValueError, match="truncated"):
        load_npy(npy(np.ones((10, 10), np.float32))[:-8])
    with pytest.raises(ValueError, match="magic"):
        load_npy(b"PK\x03\x04 not numpy at all")


def make_tar(fmt, members: dict[str, bytes], directory: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_iter_tar_matches_tarfile_including_long_names(fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "sub/dir"
    members = {"a.json": b"{}", f"{long_dir}/key.features.npy": bytes(range(256)) * 3, "b.txt": b"",
               "c.txt": b"x" * 512}
    data = make_tar(fmt, members, directory="folder")
    assert list(iter_tar(io.BytesIO(data))) == list(members.items())


def test_iter_tar_reports_truncation_and_corrupt_headers_after_the_good_members(tmp_path):
    data = make_tar(tarfile.USTAR_FORMAT, {"a.txt": b"1" * 600, "b.txt": b"2" * 600})
    seen = []
    with pytest.raises(TarFormatError, match="unexpected end of data"):
        for name, _ in iter_tar(io.BytesIO(data[:2048 + 100])):
            seen.append(name)
    assert seen == ["a.txt"]
    corrupt = bytearray(data)
    corrupt[1536 + 10] ^= 0xFF  # inside b.txt's header name
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(corrupt))))
    path = tmp_path / "x.tar"
    path.write_bytes(data)
    mapped = [(name, bytes(value)) for name, value in iter_tar(open_shard(str(path)))]
    assert isinstance(open_shard(str(path)), MappedFile)
    assert mapped == [("a.txt", b"1" * 600), ("b.txt", b"2" * 600)]
    path.write_bytes(b"")
    with pytest.raises(TarFormatError, match="empty file"):
        list(iter_tar(open_shard(str(path))))
