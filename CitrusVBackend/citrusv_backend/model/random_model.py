"""The released 8B architecture with random weights, built in memory: timings equal the real model's.

The sizes are those of the reference's `config_citrus_8B.json` (Qwen2.5-VL-7B text and vision stacks,
SAM2 Hiera-L v1, the two-layer projector). Nothing is written to disk; outputs are noise.
"""
from __future__ import annotations

import torch

from .checkpoint import build_model
from .config import RANDOM_WEIGHTS_FIELD, CitrusVConfig
from .loader import LoadedModel, choose_attention
from .processor import CitrusVProcessor
from .tiny import qwen25_tokenizer, tiny_config_dict


def full_size_config_dict() -> dict:
    config = tiny_config_dict(sam2_config_name="sam2_hiera_l.yaml")
    config.update({
        "torch_dtype": "bfloat16", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "sliding_window": 32768, "max_window_layers": 28,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
                          "tokens_per_second": 2, "in_chans": 3},
        RANDOM_WEIGHTS_FIELD: True,
    })
    return config


def sam2_large_config_dict() -> dict:
    """The tiny language model with the released SAM2 (Hiera-L v1) in full: what a refinement click runs."""
    config = tiny_config_dict(sam2_config_name="sam2_hiera_l.yaml")
    config["torch_dtype"] = "bfloat16"
    return config


def build_full_size_random(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                           attention: str | None = None) -> LoadedModel:
    """Random weights in the exact 8B shapes on `device` (about 17 GB in bf16)."""
    return build_random(full_size_config_dict(), device, dtype, attention)


def build_random(config_dict: dict, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 attention: str | None = None) -> LoadedModel:
    """A model of `config_dict`'s shapes with random weights on `device`, built in memory."""
    import time

    from transformers import Qwen2VLImageProcessorPil

    started = time.monotonic()
    config = CitrusVConfig.from_dict(config_dict)
    attn = choose_attention(device, attention)
    model = build_model(config, None, device, dtype, attn_implementation=attn, initialize=False)
    with torch.no_grad():
        for parameter in model.parameters():  # uninitialised memory can hold NaNs; timings need finite numbers
            parameter.normal_(0.0, 0.02)
    processor = CitrusVProcessor(qwen25_tokenizer(), Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2),
                                 config.seg_token_idx, model.mllm.config.image_token_id,
                                 model.grounding_encoder.image_size)
    return LoadedModel(model, processor, config, checkpoint_dir=None, device=device, dtype=dtype,
                       attn_implementation=attn, load_seconds=time.monotonic() - started)


def parameter_counts(model) -> dict[str, int]:
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"language_model": count(model.mllm.model.language_model) + count(model.mllm.lm_head),
            "vision": count(model.mllm.model.visual), "sam2": count(model.grounding_encoder),
            "projector": count(model.seg_projector), "total": count(model)}
