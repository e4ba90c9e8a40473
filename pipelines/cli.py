"""Console-script entry points. Each delegates to the `main(argv)` of the stage it names, so
tests can call those `main` functions directly and `--help` stays fast."""
from __future__ import annotations

import sys


def _not_built(name: str) -> int:
    print(f"{name}: not built yet (see the project's open issues)", file=sys.stderr)
    return 2


def extract_main(argv=None):
    try:
        from extractor.cli import main
    except ImportError:
        sys.exit(_not_built("vilbert-extract"))
    return main(argv)


def train_main(argv=None):
    try:
        from pipelines.train_cli import main
    except ImportError:
        sys.exit(_not_built("vilbert-train"))
    return main(argv)


def eval_main(argv=None):
    try:
        from pipelines.eval_cli import main
    except ImportError:
        sys.exit(_not_built("vilbert-eval"))
    return main(argv)


def demo_main(argv=None):
    from pipelines.demo import main

    return main(argv)
