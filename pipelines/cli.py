"""Console-script entry points. Each delegates to the `main(argv)` of the stage it names, so
tests can call those `main` functions directly and `--help` stays fast."""
from __future__ import annotations

import importlib
import importlib.util
import sys


def _delegate(module: str, command: str, argv):
    if importlib.util.find_spec(module) is None:
        print(f"{command}: not built yet (see the project's open issues)", file=sys.stderr)
        sys.exit(2)
    return importlib.import_module(module).main(argv)


def extract_main(argv=None):
    return _delegate("extractor.cli", "vilbert-extract", argv)


def train_main(argv=None):
    return _delegate("pipelines.train_cli", "vilbert-train", argv)


def eval_main(argv=None):
    return _delegate("pipelines.eval_cli", "vilbert-eval", argv)


def demo_main(argv=None):
    return _delegate("pipelines.demo", "vilbert-demo", argv)
