"""Are the model's weights on this computer? A cheap check, before Start, without importing huggingface_hub.

A folder holds a checkpoint when it has config.json and every safetensors shard its index names. A hub id is in the
Hugging Face cache when `models--{org}--{name}/snapshots/{revision}` (the revision `refs/main` names, else any
snapshot) holds the same. The cache is where the backend's huggingface_hub looks: HF_HUB_CACHE, else HF_HOME/hub,
else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub, in the environment the backend starts with.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TINY_ALIAS = "tiny"   # the backend makes a random tiny checkpoint itself (tests, trying the panel)


@dataclass
class WeightsCheck:
    model: str
    present: bool
    folder: Path | None     # where the weights are (or would be, for a hub id: its cache folder)
    is_hub_id: bool
    missing: str = ""       # what is missing, in words

    def describe(self) -> str:
        if self.present:
            return f"the weights of {self.model} are in {self.folder}"
        return self.missing


def hub_cache_dir(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(environ.get("HF_HUB_CACHE") or environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(environ["XDG_CACHE_HOME"]).expanduser() if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "huggingface" / "hub"


def looks_like_hub_id(model: str) -> bool:
    text = model.strip()
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists() \
        and ":" not in text and "\\" not in text


def missing_files(folder: Path) -> list[str]:
    """What a checkpoint folder lacks: config.json, or safetensors shards (those its index names, else any)."""
    if not (folder / "config.json").is_file():
        return ["config.json"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return [index.name + " (unreadable)"]
        return [shard for shard in shards if not (folder / shard).is_file()]   # is_file follows the cache's links
    return [] if any(folder.glob("*.safetensors")) else ["*.safetensors"]


def cached_snapshot(model_id: str, cache: Path) -> Path | None:
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        revision = ""
    if revision and (snapshots / revision).is_dir():
        return snapshots / revision
    found = sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1] if found else None


def check_weights(model: str, environ=None) -> WeightsCheck:
    model = model.strip()
    if model == TINY_ALIAS:
        return WeightsCheck(model, True, None, False)
    if looks_like_hub_id(model):
        cache = hub_cache_dir(environ)
        snapshot = cached_snapshot(model, cache)
        if snapshot is None:
            return WeightsCheck(model, False, cache, True, f"{model} has not been downloaded yet (not in {cache})")
        lacking = missing_files(snapshot)
        if lacking:
            return WeightsCheck(model, False, snapshot, True, f"the download of {model} is incomplete "
                                f"({', '.join(lacking[:3])}{'…' if len(lacking) > 3 else ''} missing in {snapshot})")
        return WeightsCheck(model, True, snapshot, True)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return WeightsCheck(model, False, folder, False, f"the model folder {folder} does not exist (moved, or a "
                                                         f"drive that is not connected?)")
    lacking = missing_files(folder)
    if lacking:
        return WeightsCheck(model, False, folder, False, f"{folder} is not a complete checkpoint "
                            f"({', '.join(lacking[:3])}{'…' if len(lacking) > 3 else ''} missing)")
    return WeightsCheck(model, True, folder, False)
