"""Reading and writing Citrus-V checkpoints in the released format.

A checkpoint is a Hugging Face folder: `config.json` (model_type citrus_v), one `model.safetensors` or
sharded `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, tokenizer files, and
optionally the SAM2 hydra yaml. Keys start with `mllm.`, `grounding_encoder.sam2_model.` and
`seg_projector.`. Different transformers versions save the Qwen2.5-VL part under different names; they
are all mapped onto the in-memory names (`mllm.model.language_model.*`, `mllm.model.visual.*`).
Loading is strict: a missing, unexpected or wrongly shaped weight is an error naming it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..errors import CheckpointError, ModelMissingError
from .config import CitrusVConfig
from .hub import (CHECKPOINT_FILE_PATTERNS, RELEASED_MODEL_ID, get_the_weights_advice, hub_failure, hub_offline,
                  is_hub_id, use_ca_bundle)
from .modeling import CitrusVModel
from .sam2_support import build_sam2_model, resolve_sam2_config

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3
# Names in configs (torch_dtype) and on the command line.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# (pattern, replacement) applied in order; all other keys are taken as they are.
_KEY_RENAMES = [
    (re.compile(r"^mllm\.visual\."), "mllm.model.visual."),
    (re.compile(r"^mllm\.model\.(?!language_model\.|visual\.)"), "mllm.model.language_model."),
]


def canonical_key(key: str) -> str:
    """Map the names older/newer transformers write for Qwen2.5-VL onto the in-memory names."""
    for pattern, replacement in _KEY_RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key


def legacy_key(key: str) -> str:
    """The transformers-4.4x naming (`mllm.model.layers.*`, `mllm.visual.*`) of an in-memory key."""
    if key.startswith("mllm.model.language_model."):
        return "mllm.model." + key[len("mllm.model.language_model."):]
    if key.startswith("mllm.model.visual."):
        return "mllm.visual." + key[len("mllm.model.visual."):]
    return key


# ---------------------------------------------------------------------------------------------- locating

def resolve_checkpoint_dir(model: str | os.PathLike, download: bool = True) -> Path:
    """A local folder as is; anything else is a hub id, taken from the Hugging Face cache — downloaded into it
    first when it is not there, unless `download` is False (the Slicer module downloads as a step of its own)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(model)
    if not is_hub_id(text):
        raise ModelMissingError(f"{text}: no such checkpoint folder (and it is not a hub id like {RELEASED_MODEL_ID}). "
                                f"{get_the_weights_advice(RELEASED_MODEL_ID)}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cached_only = not download or hub_offline()
    use_ca_bundle()
    try:
        local = snapshot_download(text, local_files_only=cached_only, allow_patterns=list(CHECKPOINT_FILE_PATTERNS))
    except LocalEntryNotFoundError as error:
        if download:  # asked the hub (or would have, but HF_HUB_OFFLINE is set)
            raise hub_failure(text, error) from None
        raise ModelMissingError(f"Model {text} has not been downloaded to this machine (it is not in the Hugging Face "
                                f"cache{'' if download else ', and this start may not download'}). "
                                f"{get_the_weights_advice(text)}") from None
    except Exception as error:  # offline, not found, no network, gated, a proxy...
        raise hub_failure(text, error) from None
    return Path(local)


# ---------------------------------------------------------------------------------------------- reading

def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: unreadable index ({error})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / SINGLE_FILE_NAME).is_file():
        files = [directory / SINGLE_FILE_NAME]
    else:
        raise ModelMissingError(f"{directory}: no {SINGLE_FILE_NAME} or {INDEX_NAME}; the weights are missing "
                                f"(an incomplete download or copy?). {get_the_weights_advice(RELEASED_MODEL_ID)}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{directory}: weight files listed in the index are missing: {', '.join(missing)}")
    return files


def iter_checkpoint_tensors(directory: Path):
    """Yield (canonical key, tensor) for every stored tensor, one shard at a time."""
    from safetensors import safe_open

    for file in checkpoint_files(directory):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    yield canonical_key(key), handle.get_tensor(key)
        except Exception as error:  # safetensors raises its own SafetensorError for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_weights(model: CitrusVModel, directory: Path) -> None:
    """Copy every stored tensor into `model` (casting to its dtype), strictly."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    expected = set(model.state_dict().keys())
    tied = bool(getattr(model.mllm.config, "tie_word_embeddings", False))
    seen, unexpected, mismatched = set(), [], []
    with torch.no_grad():
        for key, tensor in iter_checkpoint_tensors(directory):
            target = params.get(key)
            if target is None or key not in expected:
                unexpected.append(key)
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                mismatched.append(f"{key} (checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)})")
                continue
            target.copy_(tensor.to(dtype=target.dtype))
            seen.add(key)
    missing = sorted(expected - seen)
    if tied:
        missing = [key for key in missing if key != "mllm.lm_head.weight"]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weights: {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights: {_describe(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} weights with the wrong shape: {_describe(mismatched)}")
    if problems:
        raise CheckpointError(f"{directory}: the weights do not fit the model described by config.json: "
                              + "; ".join(problems) + ". Is the config the one saved with these weights?")
    if tied:
        model.mllm.tie_weights()


# ---------------------------------------------------------------------------------------------- building

@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: CitrusVConfig, checkpoint_dir: Path | None, device: torch.device, dtype: torch.dtype,
                attn_implementation: str = "sdpa", initialize: bool = False) -> CitrusVModel:
    """The model structure of `config`, on `device`, parameters in `dtype`.

    Parameters are created in `dtype` (not cast afterwards) so that buffers computed in float32 by their
    modules, such as rotary frequencies, stay float32 exactly as `from_pretrained` leaves them.
    `initialize=False` skips random initialisation (the weights are loaded right after).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    qwen_config = config.qwen_config()
    qwen_config._attn_implementation = attn_implementation
    sam2_config = resolve_sam2_config(config.sam2_config_name, checkpoint_dir)
    sam2_dtype = DTYPES.get(config.sam2_dtype_name or "", None)
    init_context = nullcontext() if initialize else no_init_weights()
    with torch.device(device), _default_dtype(dtype), init_context:
        mllm = Qwen2_5_VLForConditionalGeneration(qwen_config)
        sam2_model = build_sam2_model(sam2_config)
        model = CitrusVModel(config, mllm, sam2_model, sam2_autocast_dtype=sam2_dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing

def save_weights(model: CitrusVModel, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 legacy_names: bool = False, dtype: torch.dtype | None = None) -> list[Path]:
    """Write sharded safetensors + index as `save_pretrained` does (the released layout)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[legacy_key(key) if legacy_names else key] = tensor.contiguous()
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE_NAME), metadata={"format": "pt"})
        return [directory / SINGLE_FILE_NAME]
    files, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        files.append(directory / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True) + "\n")
    return files


def save_config(config: CitrusVConfig, directory: Path, sam2_config_source: Path | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(config.to_json())
    if sam2_config_source is not None:
        target = directory / config.sam2_config_name
        if sam2_config_source.resolve() != target.resolve():
            shutil.copyfile(sam2_config_source, target)
