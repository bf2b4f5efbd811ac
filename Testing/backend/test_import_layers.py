"""The backend's import rules, as CitrusVBackend/ARCHITECTURE.md states them, checked on the source: nothing
imports `cli.py`, `batch/` and `server/` do not import each other, and no import circle runs anywhere in the
package — not between its parts, not inside one (imports inside functions count too: they are circles
waiting for a caller). The graph is read by import_graph.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import import_circles, import_graph

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_nothing_imports_the_command_line(graph):
    importers = sorted(module for module, targets in graph.items() if "citrusv_backend.cli" in targets)
    assert importers == [], f"{importers} import citrusv_backend.cli: move what they need below it"


def test_batch_and_server_stay_side_by_side(graph):
    crossing = sorted((module, target) for module, targets in graph.items() for target in targets
                      if (module.startswith("citrusv_backend.batch") and target.startswith("citrusv_backend.server"))
                      or (module.startswith("citrusv_backend.server") and target.startswith("citrusv_backend.batch")))
    assert crossing == []


def test_no_import_circle(graph):
    circles = import_circles(graph)
    assert circles == [], f"import circles in the backend (move what both need into a module below them): {circles}"


def _write(package: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text, encoding="utf-8")
    return package


def test_a_circle_is_found_inside_one_part_and_through_a_function_level_import(tmp_path):
    """The rule above fails when broken: a two-module circle inside one folder, closed by an import inside a
    function, and a three-module one through `from . import` and an absolute import, are both reported."""
    package = _write(tmp_path / "pkg", {
        "__init__.py": "", "part/__init__.py": "",
        "part/a.py": "from .b import thing\n",
        "part/b.py": "def thing():\n    from .a import other\n",
        "ring/__init__.py": "", "ring/x.py": "from .y import f\n", "ring/y.py": "from . import z\n",
        "ring/z.py": "import pkg.ring.x\n",
        "clean.py": "from .part import a\n"})
    circles = import_circles(import_graph(package))
    assert circles == [["pkg.part.a", "pkg.part.b"], ["pkg.ring.x", "pkg.ring.y", "pkg.ring.z"]]
