"""Which torch build the installer picks per platform, and that the backend's environment uses its own torch."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("citrusv_bootstrap", REPO / "CitrusVBackend" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- the torch build

@pytest.mark.unit
@pytest.mark.parametrize("system, cuda, requirement, index", [
    ("Linux", None, "torch==2.13.0+cpu", None),
    ("Linux", (12, 8), "torch==2.13.0", None),                                   # PyPI's Linux wheels are CUDA builds
    ("Darwin", None, "torch==2.13.0", None),                                     # no +cpu local version on macOS
    ("Windows", None, "torch==2.13.0", None),                                    # PyPI's Windows wheel is the CPU build
    ("Windows", (12, 9), "torch==2.13.0+cu128", "https://download.pytorch.org/whl/cu128"),
    ("Windows", (13, 1), "torch==2.13.0+cu130", "https://download.pytorch.org/whl/cu130"),
])
def test_torch_build_per_platform(system, cuda, requirement, index):
    choice = load_bootstrap().torch_choice(system, cuda, "2.13.0")
    assert (choice.requirement, choice.extra_index) == (requirement, index)
    assert choice.build  # what the log and citrusv-setup.json say was installed


@pytest.mark.unit
def test_a_driver_too_old_for_every_cuda_build_is_a_clear_error():
    with pytest.raises(SystemExit, match="update the driver"):
        load_bootstrap().torch_choice("Windows", (11, 2), "2.13.0")


@pytest.mark.unit
def test_what_was_installed_is_recorded_and_shown(tmp_path):
    from CitrusVSlicerLib.installer import installed_summary

    (tmp_path / "citrusv-setup.json").write_text(json.dumps({
        "python": "3.12.8", "torch": {"version": "2.13.0+cu128", "cuda_build": "12.8", "cuda_available": True,
                                      "device": "NVIDIA RTX 6000 Ada"}}))
    assert installed_summary(tmp_path) == "Python 3.12.8, torch 2.13.0+cu128 (CUDA 12.8 build, GPU NVIDIA RTX 6000 Ada)"


# ---------------------------------------------------------------------------------------------- the environment's own torch

@pytest.mark.unit
def test_bootstrap_pins_the_environments_own_torch_not_one_on_pythonpath(tmp_path, monkeypatch):
    """bootstrap.py asked `import torch` in a way that found Slicer's torch first (through PYTHONPATH) and pinned it."""
    import torch

    slicer_site = tmp_path / "Slicer" / "lib" / "Python" / "lib" / "python3.12" / "site-packages"
    fake = slicer_site / "torch"
    (fake / "cuda").mkdir(parents=True)
    (fake / "version").mkdir()
    (fake / "__init__.py").write_text("__version__ = '2.4.1+slicer'\nfrom . import cuda, version\n")
    (fake / "cuda" / "__init__.py").write_text("def is_available():\n    return False\n")
    (fake / "version" / "__init__.py").write_text("cuda = None\n")
    bootstrap = load_bootstrap()
    monkeypatch.setattr(bootstrap, "VENV_DIR", Path(sys.prefix))  # this test environment, which has a real torch
    monkeypatch.setenv("PYTHONPATH", str(slicer_site))
    monkeypatch.setenv("PYTHONHOME", sys.base_prefix)
    assert bootstrap.installed_torch_version() == torch.__version__
