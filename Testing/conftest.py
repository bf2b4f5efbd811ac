"""Shared fixtures and tier markers for the whole test suite.

Every test runs with HF_HUB_OFFLINE=1: nothing may reach a model hub, and a stray hub id fails at once
instead of retrying for a minute.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent.parent
TESTING_DIR = REPO_DIR / "Testing"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA: no GPU visible to torch on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    """A fresh, empty directory for one test's outputs."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    """A directory shared by every test of the session (tiny checkpoints, converted data)."""
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def chest_ct_path() -> Path:
    """The real chest CT that slicerio ships: CTChest4.nrrd, 128x128x34, 3.047x3.047x10 mm, LPS."""
    slicerio = pytest.importorskip("slicerio")
    path = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    assert path.is_file(), f"slicerio no longer ships {path.name}"
    return path


@pytest.fixture(scope="session")
def chest_ct_segmentation_path(chest_ct_path: Path) -> Path:
    """Ground truth for the chest CT: 7 segments (ribs, vertebrae, lungs, tissue) on the same grid."""
    path = chest_ct_path.parent / "Segmentation.seg.nrrd"
    assert path.is_file(), f"slicerio no longer ships {path.name}"
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(session_dir: Path) -> Path:
    """A random tiny Citrus-V in the release format (sharded safetensors, real Qwen2.5 token ids)."""
    from citrusv_backend.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(session_dir / "tiny-checkpoint", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path):
    """The tiny checkpoint loaded once on CPU (float32). Tests must not modify its weights."""
    from citrusv_backend.inference.engine import CitrusVEngine

    return CitrusVEngine.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def ct_slice_rgb(chest_ct_path: Path):
    """The middle axial slice of the real chest CT, lung window, radiological orientation, uint8 RGB."""
    import numpy as np
    import SimpleITK as sitk

    from citrusv_backend.volume.slices.orientation import axial_display_orientation
    from citrusv_backend.volume.slices.windowing import CT_PRESETS

    image = sitk.ReadImage(str(chest_ct_path))
    orientation = axial_display_orientation(np.array(image.GetDirection()))
    plane = orientation.slice(sitk.GetArrayViewFromImage(image), 17)
    gray = CT_PRESETS["lung"].apply(plane)
    return np.repeat(gray[:, :, None], 3, axis=2)
