"""The stages of `vilbert-demo`: each command runs as its own process, its exact command line
printed and its output copied to OUT/demo.log, with its result lines and its progress shown."""
from __future__ import annotations

import codecs
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
ENTRY = {"vilbert-extract": "extractor.cli", "vilbert-train": "pipelines.train_cli",
         "vilbert-eval": "pipelines.eval_cli"}


class Stages:
    def __init__(self, log: Path, threads: int | None):
        self.log = log
        self.env = dict(os.environ)
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.timings: dict[str, float] = {}

    def run(self, title: str, command: str, args: list, quiet: bool = False) -> None:
        args = [str(a) for a in args]
        click.secho(f"\n== {title}", bold=True)
        click.echo("$ " + shlex.join([command, *args]))
        code = f"import sys; from {ENTRY[command]} import main; sys.argv[0] = {command!r}; main()"
        t0 = time.perf_counter()
        with open(self.log, "a") as log:
            log.write(f"\n$ {shlex.join([command, *args])}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, "-c", code, *args], env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            tail = self._show(proc, log, quiet)
            proc.wait()
        self.timings[title] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            click.echo("".join(tail), err=True)
            raise click.ClickException(f"{command} failed (exit {proc.returncode}); full output in {self.log}")

    @staticmethod
    def _show(proc, log, quiet: bool) -> list[str]:
        """Copy the stage's output to the log; echo its result lines, and its progress bar (one line
        kept up to date on a terminal, a line every 30 s otherwise). Returns the last lines."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tty = sys.stdout.isatty()
        buffer, tail, shown, last_progress = "", [], False, 0.0
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            text = decoder.decode(chunk, final=not chunk)
            log.write(text)
            buffer += text
            *segments, buffer = re.split(r"(?<=[\r\n])", buffer) if buffer else [""]
            for seg in segments:
                line = seg.rstrip("\r\n")
                if not line.strip():
                    continue
                tail = (tail + [line])[-40:]
                progress = seg.endswith("\r") or "step/s" in line or "it/s" in line
                if quiet:
                    continue
                if progress:
                    now = time.monotonic()
                    if tty and now - last_progress > 0.3:
                        width = shutil.get_terminal_size().columns - 1
                        click.echo("\r" + line.strip()[-width:].ljust(width), nl=False)
                        shown, last_progress = True, now
                    elif not tty and now - last_progress > 30:
                        click.echo("  " + line.strip()[-120:])
                        last_progress = now
                else:
                    if shown:
                        click.echo()
                        shown = False
                    click.echo(line)
            if not chunk:
                break
        if shown:
            click.echo()
        return [t + "\n" for t in tail]
