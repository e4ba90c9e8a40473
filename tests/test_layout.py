"""The package layering of docs/architecture.md, read from the source with `ast`: every import of
this project's packages (at the top of a module or inside a function) goes down the stack, never up
or sideways into a package it does not list, and the modules import one another without a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("common", "vilbert", "extractor", "pipelines")
ARCHITECTURE = REPO / "docs" / "architecture.md"


def read_layers(text: str) -> dict[str, set[str]]:
    """package -> the project packages it may import, from the table of docs/architecture.md."""
    table = text.split("<!-- layers:start -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    layers = {}
    for row in table.strip().splitlines()[2:]:  # after the header and the |---| line
        cells = [c.strip() for c in row.strip("|").split("|")]
        package, allowed = cells[0].strip("`"), cells[-1]
        layers[package] = {a.strip().strip("`") for a in allowed.split(",")} - {"–", ""}
    return layers


# package -> what it may import (itself always); the modules directly under pipelines/ (the CLIs)
# are the package `pipelines`, on top
ALLOWED = read_layers(ARCHITECTURE.read_text())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its source (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name`: the module pkg (or pkg.name)
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> str:
    """The ALLOWED key a module belongs to: its deepest listed package."""
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        if ".".join(parts[:depth]) in ALLOWED:
            return ".".join(parts[:depth])
    raise AssertionError(f"{module}: in no package of docs/architecture.md")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_every_import_goes_down_the_stack(graph):
    wrong = []
    for module, targets in graph.items():
        layer = layer_of(module)
        for target in targets:
            other = layer_of(target)
            if other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target} ({layer} may import only {sorted(ALLOWED[layer])})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_checker_sees_what_it_must(tmp_path):
    """The walker resolves relative and in-function imports and reports an upward import and a circle."""
    (tmp_path / "extractor").mkdir()
    (tmp_path / "extractor" / "__init__.py").write_text("")
    (tmp_path / "extractor" / "a.py").write_text("def f():\n    from .b import g\n    import pipelines.x\n")
    (tmp_path / "extractor" / "b.py").write_text("from extractor import a\ng = 1\n")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "x.py").write_text("")
    known = {"extractor", "extractor.a", "extractor.b", "pipelines.x"}
    a = imports_of("extractor.a", tmp_path / "extractor" / "a.py", known)
    b = imports_of("extractor.b", tmp_path / "extractor" / "b.py", known)
    assert a == {"extractor.b", "pipelines.x"} and b == {"extractor", "extractor.a"}
    assert "pipelines" not in ALLOWED[layer_of("extractor.a")]  # the upward import is refused
    graph = {"extractor.a": a - {"pipelines.x"}, "extractor.b": b - {"extractor"}}
    with pytest.raises(AssertionError, match="extractor.a -> extractor.b -> extractor.a"):
        test_no_import_circles(graph)


def test_the_page_lists_exactly_the_packages_of_the_tree():
    packages = {module_name(p.parent / "__init__.py") for root in ROOTS for p in (REPO / root).rglob("__init__.py")}
    assert set(ALLOWED) == packages
    assert read_layers("<!-- layers:start -->\n| a | b | c |\n|---|---|---|\n| `x` | y | – |\n"
                       "| `z` | w | `x`, `v` |\n<!-- layers:end -->") == {"x": set(), "z": {"x", "v"}}


def test_console_scripts_point_at_their_packages_cli():
    text = (REPO / "setup.cfg").read_text()
    scripts = dict(line.strip().split(" = ") for line in text.split("console_scripts =", 1)[1].strip().splitlines()
                   if " = " in line)
    assert scripts == {"vilbert-extract": "extractor.cli:main", "vilbert-import": "extractor.import_cli:main",
                       "vilbert-export": "extractor.import_cli:export_main",
                       "vilbert-train": "pipelines.train_cli:main", "vilbert-eval": "pipelines.eval_cli:main",
                       "vilbert-multitask": "pipelines.multitask_cli:main", "vilbert-demo": "pipelines.demo:main"}
