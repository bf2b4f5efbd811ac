"""`--device auto` when torch cannot use CUDA: hidden GPUs or no GPU run on the CPU; a driver older than torch's CUDA
is a set-up to fix (cuda_unusable, with the driver and CUDA versions and the fix), never a silent 20x slower CPU run.
torch's CUDA probe is replaced here (this machine has no GPU); the decision and the message are the real code's."""
from __future__ import annotations

import pytest
import torch

from citrusv_backend.errors import CudaUnusableError
from citrusv_backend.model import loader

pytestmark = pytest.mark.unit


@pytest.fixture
def cuda_build_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loader, "nvidia_driver_version", lambda: "470.256.02")


def test_a_driver_too_old_is_cuda_unusable(cuda_build_without_cuda, monkeypatch):
    monkeypatch.setattr(loader, "cuda_init_error", lambda: "The NVIDIA driver on your system is too old "
                                                           "(found version 11040).")
    with pytest.raises(CudaUnusableError) as unusable:
        loader.choose_device("auto")
    message = str(unusable.value)
    assert unusable.value.reason == "cuda_unusable"
    assert "built for CUDA 12.8, and NVIDIA driver 470.256.02 cannot run it" in message
    assert "too old (found version 11040)" in message and "Update the driver" in message
    assert "CITRUSV_TORCH_CUDA_BUILDS" in message and "choose the CPU" in message


def test_hidden_gpus_run_on_the_cpu(cuda_build_without_cuda, monkeypatch):
    monkeypatch.setattr(loader, "cuda_init_error", lambda: "No CUDA GPUs are available")
    assert loader.choose_device("auto") == torch.device("cpu")


def test_asking_for_cuda_without_it_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine's torch can use CUDA")
    with pytest.raises(CudaUnusableError, match="choose the CPU"):
        loader.choose_device("cuda")
