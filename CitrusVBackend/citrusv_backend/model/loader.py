"""One call from a model reference (folder or hub id) to a ready model + processor on the right device."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CudaUnusableError, InputError, NotEnoughMemoryError
from .checkpoint import DTYPES, build_model, checkpoint_files, load_weights, resolve_checkpoint_dir
from .config import CitrusVConfig
from .modeling import CitrusVModel
from .processor import CitrusVProcessor
from .requirements import GB, gb_text, need_of_checkpoint

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = ("!!! RANDOM WEIGHTS: this checkpoint ({path}) was made by `citrusv make-tiny-checkpoint`. "
                          "Its answers and masks are noise, useful only to test the software. !!!")


def choose_device(requested: str | None = None) -> torch.device:
    """`auto`: CUDA when torch can use it, else the CPU — unless a GPU driver is there and torch cannot use it
    (a driver older than torch's CUDA): that is a set-up to fix, not a reason to run 20× slower unnoticed."""
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.version.cuda is not None and nvidia_driver_version() is not None and "driver" in cuda_init_error():
            raise CudaUnusableError(cuda_diagnosis("auto"))
        return torch.device("cpu")  # no GPU, or GPUs hidden on purpose (CUDA_VISIBLE_DEVICES="")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CudaUnusableError(cuda_diagnosis(requested))
    return device


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (Linux), without asking CUDA."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else "unknown"


def cuda_init_error() -> str:
    """torch's own words on why CUDA cannot start ("The NVIDIA driver on your system is too old (found version
    ...)", "No CUDA GPUs are available"), or ''."""
    try:
        torch.cuda.init()
    except Exception as error:
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ""


def cuda_diagnosis(requested: str) -> str:
    """Why torch cannot use CUDA here, and the fix."""
    if torch.version.cuda is None:
        return (f"Device {requested}: this backend has the CPU build of torch {torch.__version__}, which cannot use a GPU. "
                f"Reinstall the backend on the GPU machine (the Slicer module's Install, or `bootstrap.py setup "
                f"--force`), or choose the CPU.")
    driver = nvidia_driver_version()
    cause = cuda_init_error() or "torch found no usable GPU"
    if driver is None:
        return (f"Device {requested}: no NVIDIA driver is loaded ({cause}). Install the NVIDIA driver (check with "
                f"`nvidia-smi`), or choose the CPU.")
    return (f"Device {requested}: torch {torch.__version__} is built for CUDA {torch.version.cuda}, and NVIDIA driver "
            f"{driver} cannot run it ({cause}). Update the driver (CUDA {torch.version.cuda} needs a driver from "
            f"the same CUDA major release or newer), or reinstall the backend for an older CUDA build "
            f"(CITRUSV_TORCH_CUDA_BUILDS, docs/first-use.md), or choose the CPU.")


def choose_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (the reference's SAM2 path only runs in fp32 there)."""
    if requested in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise InputError(f"unknown dtype {requested!r}; use auto, float32 or bfloat16")
    return DTYPES[requested]


def choose_attention(device: torch.device, requested: str | None = None) -> str:
    """flash-attention 2 when it is installed and a GPU is used, sdpa otherwise."""
    if requested not in (None, "", "auto"):
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise InputError("attention flash_attention_2 was asked for but the flash-attn package is not "
                             "installed (pip install 'citrusv-backend[gpu]'); use sdpa")
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@dataclass
class LoadedModel:
    model: CitrusVModel
    processor: CitrusVProcessor
    config: CitrusVConfig
    checkpoint_dir: Path
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    generation_defaults: dict = field(default_factory=dict)
    load_seconds: float = 0.0

    @property
    def random_weights(self) -> bool:
        return self.config.random_weights

    def describe(self) -> dict:
        return {"checkpoint": str(self.checkpoint_dir), "device": str(self.device), "dtype": str(self.dtype).split(".")[-1],
                "attention": self.attn_implementation, "random_weights": self.random_weights,
                "load_seconds": round(self.load_seconds, 3)}


def read_generation_defaults(directory: Path) -> dict:
    """The checkpoint's repetition_penalty: ms-swift keeps it from generation_config.json even at temperature 0."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    penalty = data.get("repetition_penalty")
    return {"repetition_penalty": float(penalty)} if isinstance(penalty, (int, float)) else {}


TEST_FAIL_LOAD_ENV = "CITRUSV_TEST_FAIL_LOAD"


def device_memory_gb(device: torch.device) -> tuple[str, float]:
    """(what, GB) of the memory the model would live in: the GPU's total, or this machine's RAM."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        return f"{torch.cuda.get_device_name(index)} has", total / GB
    return "this machine has", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def out_of_memory_error(directory: Path, device: torch.device) -> NotEnoughMemoryError:
    need = need_of_checkpoint(directory)
    what, available = device_memory_gb(device)
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()  # give back what the failed load took
        return NotEnoughMemoryError(
            f"Out of GPU memory while loading the model: it needs about {gb_text(need.gpu_gb)} GB of GPU memory in bf16 "
            f"and {what} {gb_text(available)} GB. Choose the CPU (it needs about {gb_text(need.cpu_ram_gb)} GB of RAM) or a "
            f"remote server on a bigger GPU in the Slicer module (on the command line: --device cpu).",
            needed_gb=need.gpu_gb, available_gb=round(available, 1), device=str(device))
    return NotEnoughMemoryError(
        f"Out of memory while loading the model on the CPU: it needs about {gb_text(need.cpu_ram_gb)} GB of RAM in "
        f"float32 and {what} {gb_text(available)} GB. Use a GPU with at least {gb_text(need.gpu_gb)} GB of memory, or a remote "
        f"server in the Slicer module.", needed_gb=need.cpu_ram_gb, available_gb=round(available, 1),
        device=str(device))


def load_citrusv(model: str | Path, device: str | None = None, dtype: str | None = None,
                 attention: str | None = None) -> LoadedModel:
    started = time.monotonic()
    directory = resolve_checkpoint_dir(model)
    config = CitrusVConfig.from_file(directory / "config.json")
    checkpoint_files(directory)  # fail on absent weights before building anything
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(torch_device, dtype)
    attn = choose_attention(torch_device, attention)
    try:
        if os.environ.get(TEST_FAIL_LOAD_ENV) == "out_of_memory":  # tests only: an out-of-memory at load
            raise torch.OutOfMemoryError(f"{TEST_FAIL_LOAD_ENV}=out_of_memory")
        citrusv = build_model(config, directory, torch_device, torch_dtype, attn_implementation=attn)
        load_weights(citrusv, directory)
        qwen_config = citrusv.mllm.config
        processor = CitrusVProcessor.from_checkpoint(directory, config.seg_token_idx, qwen_config.image_token_id,
                                                     citrusv.grounding_encoder.image_size)
        processor.fast.verified()  # the fast preprocessing's one-time self-check, here rather than in the first job
        processor.fast.use_device(torch_device)  # a GPU makes the SAM2 inputs of slices itself (checked first)
    except torch.OutOfMemoryError:
        citrusv = None  # what the failed load holds goes before the numbers are read
        raise out_of_memory_error(directory, torch_device) from None
    loaded = LoadedModel(citrusv, processor, config, directory, torch_device, torch_dtype, attn,
                         read_generation_defaults(directory), time.monotonic() - started)
    if loaded.random_weights:
        log.warning(RANDOM_WEIGHTS_WARNING.format(path=directory))
    return loaded
