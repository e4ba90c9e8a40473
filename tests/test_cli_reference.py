"""docs/cli.md is generated from the commands' --help and must stay current (the README links to it)."""
import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    assert (DOCS / "cli.md").read_text() == text, "run: python docs/cli_reference.py"
