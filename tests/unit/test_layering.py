"""Layering: pipelines ← augserve ← trainer. The service never imports the trainer; the top-level
command line alone registers ``augserve tune`` and ``augserve bench trainer``, through imports inside
the function that builds its parser."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The one entry point that may import the trainer lazily (inside a function), for the commands above it.
COMMAND_LINES = {"augserve/cli.py"}


def imports(path: Path):
    """(top-level package imported, whether the import sits inside a function) for every import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) in inside


def test_the_service_imports_nothing_from_the_trainer():
    offenders = []
    for path in sorted((ROOT / "augserve").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for package, lazy in imports(path):
            if package == "trainer" and not (relative in COMMAND_LINES and lazy):
                offenders.append(relative)
    assert not offenders, f"the service imports the trainer: {sorted(set(offenders))}"


def test_pipelines_import_neither_the_service_nor_the_trainer():
    offenders = sorted({path.relative_to(ROOT).as_posix() for path in (ROOT / "pipelines").rglob("*.py") for package, _ in imports(path) if package in ("augserve", "trainer")})
    assert not offenders, f"pipelines import the layers above them: {offenders}"
