"""How much a model needs — download, GPU memory, RAM on the CPU — and how much the environment needs on disk.

The module cannot import the backend (Slicer's Python never loads torch), so the backend's estimate
(citrusv_backend/model/requirements.py: parameters x bytes of the dtype the device runs, plus working memory at the
default pixel budgets) is mirrored here: the released model's figures as a row, the same rule for a folder of other
weights. Testing/module/test_first_use.py checks both against the backend's own numbers.
Released Citrus-V-8B: 8.53 B values (Qwen2.5-VL-7B + SAM2 Hiera-L + the [SEG] projector): 17.1 GB of bf16
safetensors; on a GPU bf16 weights + 2.5 GB working memory + 0.6 GB CUDA context = 20.2 GB; on the CPU float32 (no
MPS: docs/first-use-slicer.md) weights + 4 GB = 38.1 GB of RAM.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GPU_ENV_GB = 8.0       # the CUDA build of torch and the rest of the backend environment
CPU_ENV_GB = 3.0       # the CPU build
RELEASED_PARAMETERS = 8_530_363_442
GPU_WORKING_GB = 2.5   # activations, KV cache, logits, SAM2 features at the default budgets (bf16)
CUDA_CONTEXT_GB = 0.6
CPU_WORKING_GB = 4.0   # the same in float32, plus the process


def gb(value: float) -> str:
    """"20 GB", "8 GB", "0.4 GB": whole numbers from 1 GB up (the figures are estimates), one decimal below."""
    return f"{value:.0f} GB" if value >= 0.95 else f"{value:.1f} GB"


@dataclass(frozen=True)
class ModelNeed:
    weights_gb: float       # the download (bf16 safetensors)
    gpu_gb: float           # GPU memory to load and run it (bf16)
    cpu_ram_gb: float       # RAM to run it on the CPU (float32)


def estimate_from_weights(weights_gb: float) -> ModelNeed:
    """bf16 weights of `weights_gb` on disk: the backend's rule (a small model needs a share of the working memory)."""
    share = min(1.0, weights_gb * 1e9 / 2 / RELEASED_PARAMETERS)
    return ModelNeed(round(weights_gb, 1), round(weights_gb + GPU_WORKING_GB * share + CUDA_CONTEXT_GB, 1),
                     round(2 * weights_gb + CPU_WORKING_GB * share, 1))


RELEASED_MODEL = "jdh-algo/Citrus-V-8B-v1.0"
KNOWN_MODELS = {RELEASED_MODEL: estimate_from_weights(RELEASED_PARAMETERS * 2 / 1e9),
                "tiny": estimate_from_weights(0.01)}   # the backend's random tiny checkpoint


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
