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


@pytest.fixture(scope="session")
def module_backend(tiny_checkpoint, session_dir):
    """The module's own local backend (a BackendManager starting `citrusv serve` with the tiny checkpoint), once per
    session; its python is this interpreter (the test environment has the backend installed)."""
    from CitrusVSlicerLib.manager import BackendManager

    manager = BackendManager(MODULE_DIR, env_dir=session_dir / "module-env", python=sys.executable,
                             log_dir=session_dir / "module-logs", work_dir=session_dir / "module-work")
    process = manager.start_local(str(tiny_checkpoint), "cpu")
    assert process.wait_ready(300), "\n".join(process.lines)
    yield manager
    manager.shutdown()

