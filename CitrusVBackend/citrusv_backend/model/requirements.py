"""What a Citrus-V checkpoint needs — GPU memory (bf16), RAM (fp32 on the CPU), disk — in one place: the docs'
table (docs/first-use.md), `citrusv download --check` (the Slicer module's preflight) and the message of an
out-of-memory at load all read it. No torch here.

Weights: the parameter count × the bytes of the dtype the device runs (bf16 on CUDA, fp32 on the CPU). The
released 8B model: 8,530,363,442 values (Qwen2.5-VL-7B 8,292,166,656 + SAM2 Hiera-L 224,430,386 + the [SEG]
projector), counted from the architecture (`model/random_model.full_size_config_dict`).
Working memory on top of the weights, at the default pixel budgets (segment 65,535 px per slice in batches of 4,
report/ask up to 1,003,520 px = 1,280 visual tokens, answers up to 4,096 tokens): the vision tower's attention
over 5,120 patches, the KV cache of 28 layers × 4 KV heads × 128 × 4,096 tokens (0.24 GB in bf16), the vocabulary
logits (152,064 per position, fp32), SAM2 Hiera-L's features for a batch of 4 slices at 1,024 px, and the CUDA
context and allocator slack. These are ESTIMATES from the shapes (no GPU has been lent to measure them yet):
`bench/` `citrusv bench --full-size-random --full` reports the measured peak on a GPU.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

GB = 1e9
RELEASED_PARAMETERS = 8_530_363_442
GPU_WORKING_GB = 2.5      # activations + KV cache + logits + SAM2 features at the default budgets, bf16 (estimate)
CUDA_CONTEXT_GB = 0.6     # the CUDA context, cuBLAS/cuDNN workspaces, allocator slack (estimate)
CPU_WORKING_GB = 4.0      # the same work in fp32, plus the Python process and its libraries (estimate)
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class MemoryNeed:
    parameters: int
    gpu_gb: float        # bf16 weights + working memory + CUDA context
    cpu_ram_gb: float    # fp32 weights + working memory
    weights_gb_bf16: float
    weights_gb_fp32: float
    disk_gb: float       # the stored weights

    def as_dict(self) -> dict:
        return asdict(self)


def memory_need(parameters: int, stored_bytes: int | None = None) -> MemoryNeed:
    bf16, fp32 = parameters * 2 / GB, parameters * 4 / GB
    disk = (stored_bytes if stored_bytes is not None else parameters * 2) / GB
    # A small (test) model needs a share of the working memory, never more than the released one's.
    share = min(1.0, parameters / RELEASED_PARAMETERS)
    return MemoryNeed(parameters, round(bf16 + GPU_WORKING_GB * share + CUDA_CONTEXT_GB, 1),
                      round(fp32 + CPU_WORKING_GB * share, 1), round(bf16, 2), round(fp32, 2), round(disk, 2))


RELEASED_NEED = memory_need(RELEASED_PARAMETERS)


def gb_text(value: float) -> str:
    """20 GB, 0.6 GB: whole gigabytes where that is precise enough."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def checkpoint_parameters(directory: Path) -> tuple[int, int]:
    """(values, bytes) stored in a checkpoint folder's safetensors files, read from their headers only."""
    values = stored = 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for size in entry["shape"]:
                count *= size
            values += count
            stored += count * DTYPE_BYTES.get(entry["dtype"], 4)
    return values, stored


def need_of_checkpoint(directory: Path | None) -> MemoryNeed:
    """The need of the checkpoint in `directory` (the released model's when it cannot be read)."""
    if directory is not None:
        try:
            values, stored = checkpoint_parameters(directory)
        except (OSError, ValueError, KeyError, struct.error):
            values = 0
        if values:
            return memory_need(values, stored)
    return RELEASED_NEED
