"""The module's library has no import circle (imports inside functions count: they are circles waiting for a
caller), read from the source with the backend's own import-graph reader."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "CitrusVSlicer" / "CitrusVSlicerLib"


def _import_graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "Testing" / "backend" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_library_has_no_import_circle():
    reader = _import_graph_module()
    graph = reader.import_graph(LIBRARY)
    assert "CitrusVSlicerLib.writers" in graph and graph["CitrusVSlicerLib.writers"], "the graph was not read"
    circles = reader.import_circles(graph)
    assert circles == [], f"import circles in CitrusVSlicerLib (move what both need into a module below them): {circles}"
