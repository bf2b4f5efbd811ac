"""Real MRML through the slicer-core wheel: a scene with the module logics Slicer would have registered.

CitrusVSlicerLib is imported from the module folder exactly as Slicer does (the folder on sys.path).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mrml_setup import make_scene

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture
def mrml_scene():
    pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides real MRML")
    scene = make_scene()
    yield scene
    scene.Clear(1)
