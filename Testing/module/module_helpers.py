"""Helpers shared by the module tests (not fixtures)."""
from __future__ import annotations

import ast
import time
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"
WIDGET_CLASS = "CitrusVSlicerWidget"
# The panel's code: the module file and the section mixins its widget inherits (CitrusVSlicerPanels/). The static
# checks of `self.ui.<name>` against the .ui read all of them, so moving a section into a mixin hides nothing.
WIDGET_SOURCE_FILES = [MODULE_DIR / "CitrusVSlicer.py", *sorted((MODULE_DIR / "CitrusVSlicerPanels").glob("*.py"))]


def run_until(poll, done, timeout: float = 300.0, step: float = 0.02):
    """Call `poll()` until `done()` (tests drive the module's polling as the panel's timer would)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done after {timeout} s"
        poll()
        time.sleep(step)


def widget_sources() -> dict[Path, str]:
    """Each file of the panel's code -> its text."""
    return {path: path.read_text(encoding="utf-8") for path in WIDGET_SOURCE_FILES}


def widget_source() -> str:
    """All of the panel's code as one text (for searches; parse the files one by one)."""
    return "\n".join(widget_sources().values())


def widget_classes() -> dict[str, ast.ClassDef]:
    """The widget class and every panel mixin class, by name."""
    return {node.name: node for text in widget_sources().values() for node in ast.parse(text).body
            if isinstance(node, ast.ClassDef) and (node.name == WIDGET_CLASS or node.name.endswith("Panel"))}


def widget_method(name: str) -> ast.FunctionDef:
    """The widget's method `name`, wherever it is defined (the widget itself or one of its panel mixins)."""
    found = [node for cls in widget_classes().values() for node in cls.body
             if isinstance(node, ast.FunctionDef) and node.name == name]
    assert len(found) == 1, f"{name} is defined {len(found)} times in the widget and its panels"
    return found[0]
