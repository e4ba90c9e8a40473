"""Calling code that might block on a FIFO, without letting a test hang: the shared helper of the
loader and task tests on special files."""
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def returns_without_blocking(call, fifos, seconds=5):
    """What `call()` returns, or the exception it raises; fails the test if it blocked on one of `fifos`.
    A watchdog process (not a thread: a reader blocked inside a C extension can hold the GIL) gives
    each FIFO, after `seconds` and then every second, a writer that closes at once, so that a blocked
    reader sees the end of the file and the call ends; it leaves a mark when it met a reader."""
    mark = Path(tempfile.mkdtemp()) / "blocked"
    script = ("import os, sys, time\n"
              "mark, seconds, fifos = sys.argv[1], float(sys.argv[2]), sys.argv[3:]\n"
              "time.sleep(seconds)\n"
              "for _ in range(60):\n"
              "    for f in fifos:\n"
              "        try:\n"
              "            os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))\n"
              "            open(mark, 'w').close()\n"
              "        except OSError:\n"
              "            pass\n"
              "    time.sleep(1)\n")
    watchdog = subprocess.Popen([sys.executable, "-c", script, str(mark), str(seconds), *map(str, fifos)])
    try:
        try:
            result = call()
        except Exception as error:  # handed to the test
            result = error
    finally:
        watchdog.kill()
        watchdog.wait()
    if mark.exists():
        pytest.fail(f"blocked on a FIFO for {seconds} s: {[str(f) for f in fifos]}")
    return result
