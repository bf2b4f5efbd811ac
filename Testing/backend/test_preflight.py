"""What the model needs against what a machine has (`citrusv download --check`, model/requirements.py): the
numbers of the released model, a checkpoint's own numbers from its safetensors headers, and the sentence a
launcher shows for a big GPU, a 12 GB GPU, no GPU and a Mac."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from citrusv_backend.model.requirements import (RELEASED_NEED, RELEASED_PARAMETERS, checkpoint_parameters,
                                                memory_need)
from citrusv_backend.preflight import advice

pytestmark = pytest.mark.unit


def test_the_released_model_needs():
    assert RELEASED_NEED.parameters == RELEASED_PARAMETERS
    assert RELEASED_NEED.weights_gb_bf16 == 17.06 and RELEASED_NEED.weights_gb_fp32 == 34.12
    assert RELEASED_NEED.gpu_gb == 20.2 and RELEASED_NEED.cpu_ram_gb == 38.1 and RELEASED_NEED.disk_gb == 17.06


def test_a_checkpoint_counts_its_own_values(tiny_checkpoint):
    from safetensors.numpy import load_file

    tensors = [tensor for path in tiny_checkpoint.glob("*.safetensors") for tensor in load_file(path).values()]
    values, stored = checkpoint_parameters(tiny_checkpoint)
    assert values == sum(tensor.size for tensor in tensors)
    # the data after each file's header
    assert stored == sum(path.stat().st_size - _header_bytes(path) for path in tiny_checkpoint.glob("*.safetensors"))


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_a_12_gb_gpu_is_told_what_fits():
    device, sentence = advice(RELEASED_NEED, {"name": "NVIDIA GeForce RTX 3060", "total_gb": 12.0}, 32.0, "Linux")
    assert device == "cpu"
    assert sentence == ("This GPU (NVIDIA GeForce RTX 3060) has 12 GB and the model needs about 20 GB: use a remote "
                        "server, or the CPU (float32: needs about 38 GB of RAM, this machine has 32 GB: too little; "
                        "minutes per image).")


def test_a_24_gb_gpu_fits():
    device, sentence = advice(RELEASED_NEED, {"name": "NVIDIA GeForce RTX 4090", "total_gb": 24.0}, 64.0, "Windows")
    assert device == "cuda" and sentence.endswith("has 24 GB and the model needs about 20 GB: it fits.")


def test_a_mac_runs_on_the_cpu_and_says_the_ram():
    device, sentence = advice(RELEASED_NEED, None, 64.0, "Darwin")
    assert device == "cpu"
    assert "On macOS the model runs on the CPU (float32: needs about 38 GB of RAM, this machine has 64 GB;" in sentence
    assert "MPS) is not used" in sentence


def test_a_small_model_shares_the_working_memory():
    small = memory_need(RELEASED_PARAMETERS // 100)
    assert small.gpu_gb < 1.5 and small.cpu_ram_gb < 1.0


@pytest.mark.model
def test_check_prints_one_line_for_a_folder(tiny_checkpoint):
    done = subprocess.run([sys.executable, "-m", "citrusv_backend.cli", "download", "--check", str(tiny_checkpoint)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check = json.loads(done.stdout)
    assert check["event"] == "check" and check["weights"]["present"] is True
    assert check["need"]["parameters"] == checkpoint_parameters(tiny_checkpoint)[0]
    assert check["fits"]["disk"] is True and check["advice"]
