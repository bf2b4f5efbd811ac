"""How much a model needs — download, GPU memory, RAM on the CPU — and how much the environment needs on disk.

The module cannot import the backend (Slicer's Python never loads torch), so the released model's figures are kept
here as a small table; Testing/module/test_first_use_preflight.py checks them against the backend's own estimate.
Figures: Citrus-V-8B is Qwen2.5-VL-7B (8.3 B parameters) + SAM2 (0.22 B): 17.1 GB of bf16 safetensors; on a GPU the
bf16 weights plus activations at the default pixel budgets need about 20 GB; the CPU runs float32 (no bf16 matmul
there, no MPS: see docs/first-use-slicer.md), twice the weights plus the working set: about 34 GB of RAM.
A folder of unknown weights is estimated from its safetensors' size with the same rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GPU_ENV_GB = 8.0       # the CUDA build of torch and the rest of the backend environment
CPU_ENV_GB = 3.0       # the CPU build
GPU_OVERHEAD_GB = 3.0  # activations at the default pixel budgets + CUDA context
CPU_OVERHEAD_GB = 0.0  # included in the float32 estimate below (RAM is counted against the total, not the free)


@dataclass(frozen=True)
class ModelNeed:
    weights_gb: float       # the download (bf16 safetensors)
    gpu_gb: float           # GPU memory to load and run it (bf16)
    cpu_ram_gb: float       # RAM to run it on the CPU (float32)


RELEASED_MODEL = "jdh-algo/Citrus-V-8B-v1.0"
KNOWN_MODELS = {
    RELEASED_MODEL: ModelNeed(weights_gb=17.1, gpu_gb=20.0, cpu_ram_gb=34.0),
    "tiny": ModelNeed(weights_gb=0.01, gpu_gb=0.5, cpu_ram_gb=1.0),
}


def estimate_from_weights(weights_gb: float) -> ModelNeed:
    """bf16 on disk -> the same on the GPU plus activations; float32 (twice) on the CPU."""
    return ModelNeed(round(weights_gb, 1), round(weights_gb + GPU_OVERHEAD_GB, 1),
                     round(2 * weights_gb + CPU_OVERHEAD_GB, 1))


def model_need(model: str) -> ModelNeed:
    model = model.strip() or RELEASED_MODEL
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]
    folder = Path(model).expanduser()
    if folder.is_dir():
        size = sum(path.stat().st_size for path in folder.glob("*.safetensors")) / 1e9
        if size > 0:
            return estimate_from_weights(size)
    # An unknown hub id: assume the released model's size (the only family the backend runs).
    return KNOWN_MODELS[RELEASED_MODEL]
