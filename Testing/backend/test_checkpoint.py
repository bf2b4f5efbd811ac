"""Loading and saving checkpoints in the released Citrus-V format (tiny random weights, CPU)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from citrusv_backend.errors import CheckpointError, HubUnreachableError, ModelMissingError
from citrusv_backend.model.checkpoint import (INDEX_NAME, canonical_key, legacy_key, resolve_checkpoint_dir,
                                              save_weights)
from citrusv_backend.model.config import CitrusVConfig
from citrusv_backend.model.loader import load_citrusv
from citrusv_backend.model.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.model

WEIGHT_SUFFIXES = (".safetensors",)


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files, under the names as written."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def clone_checkpoint(source: Path, target: Path, mutate=None, config_edit=None) -> Path:
    """Same non-weight files (config possibly edited); weights re-saved as one file after `mutate`."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.suffix not in WEIGHT_SUFFIXES and file.name not in (INDEX_NAME, "config.json"):
            (target / file.name).symlink_to(file)
    config = json.loads((source / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (target / "config.json").write_text(json.dumps(config))
    tensors = stored_tensors(source)
    if mutate:
        mutate(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_tiny_checkpoint_is_in_the_release_format(tiny_checkpoint: Path):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "citrus_v" and config["architectures"] == ["CitrusV"]
    assert config["seg_token_idx"] == 151665 and "vision_config" in config and "hidden_size" in config
    assert (tiny_checkpoint / config["grounding_encoder_config"]["cfg_path"]).is_file()
    index = json.loads((tiny_checkpoint / INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2, "the tiny checkpoint should be sharded like the release"
    prefixes = {key.split(".")[0] for key in index["weight_map"]}
    assert prefixes == {"mllm", "grounding_encoder", "seg_projector"}
    keys = set(index["weight_map"])
    assert "seg_projector.0.weight" in keys and "seg_projector.2.bias" in keys
    assert any(k.startswith("mllm.model.language_model.layers.") for k in keys)
    assert any(k.startswith("mllm.model.visual.blocks.") for k in keys)
    assert any(k.startswith("grounding_encoder.sam2_model.sam_mask_decoder.") for k in keys)
    tokenizer = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert added["[SEG]"] == 151665 and added["<bbox>"] == 151666 and added["</bbox>"] == 151667
    assert added["<|image_pad|>"] == 151655 and added["<|im_end|>"] == 151645


def test_save_load_round_trip_is_bit_exact(tiny_engine, tiny_checkpoint: Path, tmp_path: Path):
    loaded = tiny_engine.loaded
    original = stored_tensors(tiny_checkpoint)
    state = loaded.model.state_dict()
    assert set(state) == set(original)
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key
    saved = clone_checkpoint(tiny_checkpoint, tmp_path / "resaved")
    (saved / "model.safetensors").unlink()
    save_weights(loaded.model, saved, max_shard_bytes=16 * 1024**2)
    assert len(list(saved.glob("model-*.safetensors"))) >= 3
    reloaded = load_citrusv(saved, device="cpu").model.state_dict()
    for key, tensor in state.items():
        assert torch.equal(reloaded[key], tensor), key


def test_legacy_key_names_load_to_the_same_weights(tiny_engine, tiny_checkpoint: Path, tmp_path: Path):
    legacy = make_tiny_checkpoint(tmp_path / "legacy", seed=0, legacy_names=True)
    names = set(json.loads((legacy / INDEX_NAME).read_text())["weight_map"])
    assert any(k.startswith("mllm.model.layers.") for k in names)
    assert any(k.startswith("mllm.visual.") for k in names)
    assert not any(k.startswith(("mllm.model.language_model.", "mllm.model.visual.")) for k in names)
    reference = tiny_engine.loaded.model.state_dict()
    for key, tensor in load_citrusv(legacy, device="cpu").model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


@pytest.mark.parametrize("key", ["mllm.model.language_model.layers.0.mlp.up_proj.weight",
                                 "mllm.visual.blocks.1.attn.qkv.bias", "mllm.model.norm.weight",
                                 "grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"])
def test_key_renamings(key):
    assert legacy_key(canonical_key(key)) == legacy_key(key)
    assert canonical_key(legacy_key(canonical_key(key))) == canonical_key(key)
    assert not canonical_key(key).startswith(("mllm.visual.", "mllm.model.layers.", "mllm.model.norm."))


def test_missing_weight_is_named(tiny_checkpoint: Path, tmp_path: Path):
    victim = "seg_projector.2.weight"
    broken = clone_checkpoint(tiny_checkpoint, tmp_path / "missing", mutate=lambda t: t.pop(victim))
    with pytest.raises(CheckpointError, match=r"1 missing weights: seg_projector\.2\.weight"):
        load_citrusv(broken, device="cpu")


def test_unexpected_weight_is_named(tiny_checkpoint: Path, tmp_path: Path):
    def add(tensors):
        tensors["seg_projector.5.weight"] = torch.zeros(2, 2)
    broken = clone_checkpoint(tiny_checkpoint, tmp_path / "extra", mutate=add)
    with pytest.raises(CheckpointError, match=r"1 unexpected weights: seg_projector\.5\.weight"):
        load_citrusv(broken, device="cpu")


def test_wrong_shape_is_named(tiny_checkpoint: Path, tmp_path: Path):
    def reshape(tensors):
        tensors["seg_projector.0.bias"] = torch.zeros(7)
    broken = clone_checkpoint(tiny_checkpoint, tmp_path / "shape", mutate=reshape)
    with pytest.raises(CheckpointError, match=r"wrong shape: seg_projector\.0\.bias \(checkpoint \(7,\), model \(64,\)\)"):
        load_citrusv(broken, device="cpu")


def test_config_that_does_not_fit_the_weights(tiny_checkpoint: Path, tmp_path: Path):
    def widen(config):
        config["intermediate_size"] = 96
    broken = clone_checkpoint(tiny_checkpoint, tmp_path / "config", config_edit=widen)
    with pytest.raises(CheckpointError, match="wrong shape: .*mlp"):
        load_citrusv(broken, device="cpu")


def test_wrong_model_type(tiny_checkpoint: Path, tmp_path: Path):
    def qwen(config):
        config["model_type"] = "qwen2_5_vl"
    broken = clone_checkpoint(tiny_checkpoint, tmp_path / "qwen", config_edit=qwen)
    with pytest.raises(CheckpointError, match="model_type is 'qwen2_5_vl', expected 'citrus_v'"):
        load_citrusv(broken, device="cpu")


def test_missing_sam2_config_names_the_file(tiny_checkpoint: Path, tmp_path: Path):
    def rename(config):
        config["grounding_encoder_config"]["cfg_path"] = "/mnt/somewhere/sam2_hiera_unknown.yaml"
    broken = clone_checkpoint(tiny_checkpoint, tmp_path / "nosam", config_edit=rename)
    with pytest.raises(CheckpointError, match="sam2_hiera_unknown.yaml"):
        load_citrusv(broken, device="cpu")


def test_sam2_config_found_by_file_name_in_the_sam2_package():
    from citrusv_backend.model.sam2_support import resolve_sam2_config

    found = resolve_sam2_config(CitrusVConfig.from_dict({
        "model_type": "citrus_v", "vision_config": {},
        "grounding_encoder_config": {"cfg_path": "/mnt/ckpt/architectures/sam2_configs/sam2_hiera_l.yaml"}}
    ).sam2_config_name, checkpoint_dir=None)
    assert found.name == "sam2_hiera_l.yaml" and "sam2" in found.parts


def test_vendored_sam2_targets_are_pointed_at_the_sam2_package(tiny_checkpoint: Path, tmp_path: Path):
    from citrusv_backend.model.sam2_support import build_sam2_model

    text = (tiny_checkpoint / "citrusv_tiny_sam2.yaml").read_text()
    vendored = tmp_path / "vendored.yaml"
    vendored.write_text(text.replace("_target_: sam2.modeling.", "_target_: architectures.third_parts.sam2.modeling."))
    assert "architectures.third_parts" in vendored.read_text()
    model = build_sam2_model(vendored)
    assert type(model).__module__ == "sam2.modeling.sam2_base"


def test_missing_weight_files(tiny_checkpoint: Path, tmp_path: Path):
    target = tmp_path / "noweights"
    target.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", target)
    with pytest.raises(CheckpointError, match="weights are missing"):
        load_citrusv(target, device="cpu")


def test_corrupt_shard(tiny_checkpoint: Path, tmp_path: Path):
    broken = clone_checkpoint(tiny_checkpoint, tmp_path / "corrupt")
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_citrusv(broken, device="cpu")


def test_offline_hub_id_says_how_to_get_the_weights(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubUnreachableError, match=r"HF_HUB_OFFLINE is set.*citrusv download .*Browse…") as offline:
        resolve_checkpoint_dir("jdh-algo/Citrus-V-8B-v1.0")
    assert offline.value.reason == "hub_unreachable"
    with pytest.raises(ModelMissingError, match=r"not been downloaded.*may not download.*Download.*Browse…") as missing:
        resolve_checkpoint_dir("jdh-algo/Citrus-V-8B-v1.0", download=False)
    assert missing.value.reason == "model_missing"


def test_nonexistent_folder(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_checkpoint_dir(str(tmp_path / "nowhere"))
