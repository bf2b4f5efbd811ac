"""The Citrus-V checkpoint configuration (`config.json`, `model_type: citrus_v`).

The released config is the reference's transformers-4.41-style flat layout: Qwen2.5-VL text fields at the
top level, `vision_config` nested, plus Citrus-specific fields (`seg_token_idx`, `grounding_encoder_config`,
loss settings). transformers 5 still accepts the flat text fields for `Qwen2_5_VLConfig`, so the Qwen part
is built from the same dict minus the Citrus fields.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import CheckpointError

MODEL_TYPE = "citrus_v"
ARCHITECTURE = "CitrusV"
DEFAULT_SEG_TOKEN_IDX = 151665
# Marker we write into configs whose weights are random, so every output made with them says so.
RANDOM_WEIGHTS_FIELD = "citrusv_random_weights"

# Fields that belong to the Citrus wrapper, not to Qwen2.5-VL.
CITRUS_FIELDS = frozenset({
    "seg_token_idx", "grounding_encoder_config", "loss_mask_config", "loss_dice_config", "use_seg_loss",
    "use_res_seg_projector", "frozen_sam2_decoder", "frozen_sam2_image_encoder", "frozen_sam2_prompt_encoder",
    RANDOM_WEIGHTS_FIELD, "model_type", "architectures", "auto_map",
})


@dataclass
class CitrusVConfig:
    """A validated view of a Citrus-V `config.json`; `raw` is kept verbatim for saving."""

    raw: dict

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "CitrusVConfig":
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise CheckpointError(
                f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r}. This folder is not a Citrus-V "
                f"checkpoint (for example a plain Qwen2.5-VL or SAM2 download); use jdh-algo/Citrus-V-8B-v1.0 or a "
                f"folder written by `citrusv dev make-tiny-checkpoint`.")
        if "vision_config" not in raw:
            raise CheckpointError(f"{source}: no vision_config; the Qwen2.5-VL part cannot be built")
        grounding = raw.get("grounding_encoder_config")
        if not isinstance(grounding, dict) or not grounding.get("cfg_path"):
            raise CheckpointError(f"{source}: grounding_encoder_config.cfg_path is missing; it names the SAM2 "
                                  f"hydra config (e.g. sam2_hiera_l.yaml)")
        if raw.get("use_res_seg_projector"):
            raise CheckpointError(f"{source}: use_res_seg_projector=true is not supported (the released 8B model "
                                  f"uses the plain two-layer projector)")
        return cls(raw=copy.deepcopy(raw))

    @classmethod
    def from_file(cls, path: Path) -> "CitrusVConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: no config.json; a Citrus-V checkpoint folder holds config.json, "
                                  f"*.safetensors and tokenizer files") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: cannot read it as JSON ({error})") from None
        return cls.from_dict(raw, source=str(path))

    @property
    def seg_token_idx(self) -> int:
        return int(self.raw.get("seg_token_idx", DEFAULT_SEG_TOKEN_IDX))

    @property
    def sam2_config_name(self) -> str:
        """The file name of the SAM2 hydra config; the reference stores an absolute path of its machine."""
        cfg_path = str(self.raw["grounding_encoder_config"]["cfg_path"])
        return PureWindowsPath(cfg_path).name if "\\" in cfg_path else PurePosixPath(cfg_path).name

    @property
    def sam2_dtype_name(self) -> str | None:
        return self.raw["grounding_encoder_config"].get("torch_dtype")

    @property
    def checkpoint_dtype_name(self) -> str | None:
        return self.raw.get("torch_dtype") or self.raw.get("dtype")

    @property
    def random_weights(self) -> bool:
        return bool(self.raw.get(RANDOM_WEIGHTS_FIELD, False))

    def qwen_config(self):
        """The `Qwen2_5_VLConfig` of the language/vision part."""
        from transformers import Qwen2_5_VLConfig

        fields = {key: value for key, value in self.raw.items() if key not in CITRUS_FIELDS}
        fields.pop("torch_dtype", None)
        fields.pop("dtype", None)
        try:
            config = Qwen2_5_VLConfig(**fields)
        except (TypeError, ValueError, KeyError) as error:
            raise CheckpointError(f"config.json: the Qwen2.5-VL fields are inconsistent ({error})") from None
        text = config.text_config
        if config.vision_config.out_hidden_size != text.hidden_size:
            raise CheckpointError(
                f"config.json: vision_config.out_hidden_size ({config.vision_config.out_hidden_size}) must equal the "
                f"text hidden_size ({text.hidden_size})")
        return config

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=2, sort_keys=True) + "\n"
