"""The backend's import rules, as CitrusVBackend/ARCHITECTURE.md states them, checked on the source: nothing
imports `cli.py`, `batch/` and `server/` do not import each other, each layer imports only from the layers
below it (LAYERS: refinement's files sit in the layer their name says), and no import circle runs anywhere in the
package — not between its parts, not inside one (imports inside functions count too: they are circles
waiting for a caller). The graph is read by import_graph.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import import_circles, import_graph

pytestmark = pytest.mark.unit


# Module-name prefixes per layer, lowest first (ARCHITECTURE.md, "Backend layers"); the longest prefix decides.
LAYERS = {
    "foundation": ("errors", "serialization", "signals", "paths", "option_types", "option_fields", "parent_watch"),
    "model": ("model",),
    "inference": ("inference",),
    "volume": ("volume", "refine.volume_"),
    "services": ("server", "batch", "refine.server_"),
    "commands": ("console", "model_source", "command_parser", "cli", "refine.command_cli", "ask_cli", "benchmark",
                 "demo", "download_cli", "hub_download", "preflight", "hostbench"),
}
ORDER = list(LAYERS)
# The one import into a higher layer, inside a function: the window rule of option_types checks a spec against the
# clinical presets, whose table lives with the windowing that applies them.
KNOWN_UPWARD = {("citrusv_backend.option_types", "citrusv_backend.volume.slices.windowing")}


def layer_of(module: str) -> str | None:
    name = module.removeprefix("citrusv_backend.")
    found = [(len(prefix), layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
             if name == prefix or name.startswith(prefix + ".") or (prefix.endswith("_") and name.startswith(prefix))]
    return max(found)[1] if found else None


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


def test_every_module_has_a_layer(graph):
    unplaced = sorted(module for module in graph if module not in ("citrusv_backend", "citrusv_backend.refine")
                      and layer_of(module) is None)
    assert unplaced == [], f"{unplaced}: give them a layer in LAYERS (and a line in ARCHITECTURE.md)"


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a layer into one above it (services and commands may import each other's neighbours as the
    tests above say; below them the order is strict)."""
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if layer_of(module) in ORDER[:ORDER.index("services")] and layer_of(target) is not None
                  and ORDER.index(layer_of(target)) > ORDER.index(layer_of(module))
                  and (module, target) not in KNOWN_UPWARD)


def test_each_layer_imports_only_from_below(graph):
    """volume/ and refinement's volume_* files (and everything below them) never import a service or a command
    module, nor a layer above their own: the CLI, the batch and the service all build on them."""
    upward = upward_imports(graph)
    assert upward == [], f"imports into a layer above: {upward}"


def test_the_layer_table_catches_an_upward_import():
    assert layer_of("citrusv_backend.refine.volume_session") == "volume"
    assert layer_of("citrusv_backend.refine.server_service") == "services"
    assert layer_of("citrusv_backend.volume.tasks.pipeline") == "volume"
    assert layer_of("citrusv_backend.cli") == "commands"
    broken = {"citrusv_backend.refine.volume_session": {"citrusv_backend.refine.server_schemas"},
              "citrusv_backend.model.loader": {"citrusv_backend.volume.tasks.results"},
              "citrusv_backend.volume.tasks.segment": {"citrusv_backend.inference.engine"}}
    assert upward_imports(broken) == [("citrusv_backend.model.loader", "citrusv_backend.volume.tasks.results"),
                                      ("citrusv_backend.refine.volume_session", "citrusv_backend.refine.server_schemas")]


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
