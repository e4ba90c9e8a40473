"""Shard writing: atomic completion, sizes.json, errors.jsonl, resume, rank-disjoint names."""
from __future__ import annotations

import json

import pytest

from common.shard_writer import ShardWriter

from extract_helpers import read_shards


def _write(writer, keys):
    for key in keys:
        writer.write(key, {"json": json.dumps({"image_id": key}).encode(), "txt": key.encode()})


def test_shards_sizes_and_atomic_names(tmp_path):
    writer = ShardWriter(str(tmp_path), prefix="cc", shard_size=2)
    _write(writer, ["a", "b", "c"])
    assert sorted(p.name for p in tmp_path.glob("cc-*.tar")) == ["cc-000000.tar"]
    assert (tmp_path / ".cc-000001.tar.partial").exists()  # in progress: not a complete name
    writer.close()
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"cc-000000.tar": 2, "cc-000001.tar": 1}
    assert not list(tmp_path.glob(".*.partial"))
    assert sorted(read_shards(tmp_path)) == ["a", "b", "c"]


def test_resume_skips_done_removes_partials_and_repairs_sizes(tmp_path):
    with ShardWriter(str(tmp_path), shard_size=2) as writer:
        _write(writer, ["a", "b"])
    (tmp_path / ".shard-000001.tar.partial").write_bytes(b"half a shard")  # a killed run
    (tmp_path / "sizes.json").write_text("{}")  # killed between rename and sizes update
    writer = ShardWriter(str(tmp_path), shard_size=2)
    assert writer.done_keys == {"a", "b"}
    assert not (tmp_path / ".shard-000001.tar.partial").exists()
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"shard-000000.tar": 2}
    _write(writer, ["c"])
    writer.close()
    assert (tmp_path / "shard-000001.tar").exists()


def test_errors_jsonl_survives_a_torn_line(tmp_path):
    writer = ShardWriter(str(tmp_path))
    writer.log_error("k1", "/data/k1.jpg", "empty file (0 bytes)")
    with open(tmp_path / "errors.jsonl", "a") as handle:
        handle.write('{"key": "k2", "pa')  # killed mid-line
    writer.close()  # (a killed run's lock is gone with its process)
    writer = ShardWriter(str(tmp_path))
    assert writer.error_sources == {"/data/k1.jpg"}
    writer.log_error("k3", "/data/k3.jpg", "not an image")
    lines = (tmp_path / "errors.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"key": "k1", "path": "/data/k1.jpg", "reason": "empty file (0 bytes)"}
    assert json.loads(lines[-1])["path"] == "/data/k3.jpg"


def test_ranks_use_disjoint_shard_indices(tmp_path):
    writers = [ShardWriter(str(tmp_path), shard_size=1, rank=r, world_size=2) for r in range(2)]
    _write(writers[0], ["a", "b"])
    _write(writers[1], ["c"])
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert read_shards(tmp_path).keys() == {"a", "b", "c"}
    writers[1].close()
    again = ShardWriter(str(tmp_path), shard_size=1, rank=1, world_size=2)
    _write(again, ["d"])
    assert (tmp_path / "shard-000003.tar").exists()  # rank 1 continues at 3, never 2 or 4
    assert json.loads((tmp_path / "sizes.json").read_text()) == {f"shard-00000{i}.tar": 1 for i in range(4)}


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        ShardWriter(str(tmp_path)).write("a.b", {"txt": b""})


def test_a_second_run_of_the_same_rank_is_refused_naming_the_holder(tmp_path):
    import os

    from common.shard_writer import OutputBusy

    first = ShardWriter(str(tmp_path), shard_size=10)
    _write(first, ["a"])  # a live partial shard
    with pytest.raises(OutputBusy, match=rf"pid {os.getpid()} on .* is writing these shards"):
        ShardWriter(str(tmp_path), shard_size=10)
    assert (tmp_path / ".shard-000000.tar.partial").exists()  # not deleted by the refused run
    other_rank = ShardWriter(str(tmp_path), shard_size=10, rank=1, world_size=2)  # ranks share OUT
    other_rank.close()
    first.close()
    again = ShardWriter(str(tmp_path), shard_size=10)  # the lock went with the first run
    assert again.done_keys == {"a"}
    again.close()


def test_a_damaged_complete_shard_is_set_aside_and_its_images_redone(tmp_path):
    with ShardWriter(str(tmp_path), shard_size=2) as writer:
        _write(writer, ["a", "b", "c", "d"])
    damaged = tmp_path / "shard-000000.tar"
    damaged.write_bytes(damaged.read_bytes()[:700])  # cut inside its first member
    writer = ShardWriter(str(tmp_path), shard_size=2)
    assert writer.done_keys == {"c", "d"} and writer.damaged and "shard-000000.tar" in writer.damaged[0]
    assert (tmp_path / "shard-000000.tar.damaged").exists() and not damaged.exists()
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"shard-000001.tar": 2}
    _write(writer, ["a", "b"])
    writer.close()
    assert sorted(read_shards(tmp_path)) == ["a", "b", "c", "d"]


def test_a_forked_child_that_closes_the_inherited_lock_does_not_hold_out(tmp_path):
    """A DataLoader worker forked from the extraction closes its copy of the lock (pipeline._WorkerInit):
    once the writing process lets go, OUT is free although the child still lives."""
    import os
    import signal

    from common.shard_writer import OutputBusy, ShardWriter, close_inherited_lock

    for closes in (True, False):
        out = tmp_path / f"out-{closes}"
        writer = ShardWriter(str(out))
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the worker: drop the lock (or not), then live on
            if closes:
                close_inherited_lock(writer.lock_identity())
            os.write(write, b"x")
            signal.pause()
        os.read(read, 1)
        writer.close()
        try:
            if closes:
                ShardWriter(str(out)).close()
            else:
                with pytest.raises(OutputBusy):
                    ShardWriter(str(out))
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
