"""One call from a model reference (folder or hub id) to a ready model + processor on the right device."""
from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from .checkpoint import DTYPES, build_model, checkpoint_files, load_weights, resolve_checkpoint_dir
from .config import CitrusVConfig
from .modeling import CitrusVModel
from .processor import CitrusVProcessor

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = ("!!! RANDOM WEIGHTS: this checkpoint ({path}) was made by `citrusv dev make-tiny-checkpoint`. "
                          "Its answers and masks are noise, useful only to test the software. !!!")


def choose_device(requested: str | None = None) -> torch.device:
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {requested} was asked for, but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
    return device


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


def load_citrusv(model: str | Path, device: str | None = None, dtype: str | None = None,
                 attention: str | None = None) -> LoadedModel:
    started = time.monotonic()
    directory = resolve_checkpoint_dir(model)
    config = CitrusVConfig.from_file(directory / "config.json")
    checkpoint_files(directory)  # fail on absent weights before building anything
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(torch_device, dtype)
    attn = choose_attention(torch_device, attention)
    citrusv = build_model(config, directory, torch_device, torch_dtype, attn_implementation=attn)
    load_weights(citrusv, directory)
    qwen_config = citrusv.mllm.config
    processor = CitrusVProcessor.from_checkpoint(directory, config.seg_token_idx, qwen_config.image_token_id,
                                                 citrusv.grounding_encoder.image_size)
    processor.fast.verified()  # the fast preprocessing's one-time self-check, here rather than in the first job
    processor.fast.use_device(torch_device)  # a GPU makes the SAM2 inputs of slices itself (checked first)
    loaded = LoadedModel(citrusv, processor, config, directory, torch_device, torch_dtype, attn,
                         read_generation_defaults(directory), time.monotonic() - started)
    if loaded.random_weights:
        log.warning(RANDOM_WEIGHTS_WARNING.format(path=directory))
    return loaded
