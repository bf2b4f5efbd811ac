"""The backend's import rules, as CitrusVBackend/ARCHITECTURE.md states them, checked on the source: nothing
imports `cli.py`, `batch/` and `server/` do not import each other, and no import circle runs between two parts
of the package (the batch <-> cli one is gone). Imports inside functions count too: they are circles waiting
for a caller. (Circles inside one part — volume.outputs <-> volume.dicom_out, server.app <-> server.routers —
are that part's own structure; this test does not rule on them.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "CitrusVBackend" / "citrusv_backend"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports (a `from X import name` of a submodule counts as X.name)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
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
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)  # (its own packages are imported on the way to it: not an edge)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    return {_module_name(path): _imports(path, modules) for path in paths}


def test_nothing_imports_the_command_line(graph):
    importers = sorted(module for module, targets in graph.items() if "citrusv_backend.cli" in targets)
    assert importers == [], f"{importers} import citrusv_backend.cli: move what they need below it"


def test_batch_and_server_stay_side_by_side(graph):
    crossing = sorted((module, target) for module, targets in graph.items() for target in targets
                      if (module.startswith("citrusv_backend.batch") and target.startswith("citrusv_backend.server"))
                      or (module.startswith("citrusv_backend.server") and target.startswith("citrusv_backend.batch")))
    assert crossing == []


def _part(module: str) -> str:
    """citrusv_backend.volume.io -> volume; citrusv_backend.cli -> cli."""
    return module.split(".")[1] if "." in module else module


def test_no_import_circle_between_parts(graph):
    """Strongly connected components of the import graph; one that spans two parts (batch and cli, server
    and volume...) is a circle the layers forbid."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while (member := stack.pop()) != module:
                component.append(member)
            component.append(module)
            if len({_part(member) for member in component}) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    assert circles == [], f"import circles between parts of the backend: {circles}"
