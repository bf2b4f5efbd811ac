"""The run manifest: OUTPUT_DIR/manifest.jsonl, one JSON line per finished case, appended and fsync'ed.

A case counts as done only once its line is on disk, so a run killed at any moment loses at most the case
it was working on. Later lines win: a rerun appends, never rewrites. A torn last line (a kill in the middle
of a write) is skipped when reading and cut off by the next run before it appends.

The settings key is a hash of what decides a case's outputs (task, prompt, volume options, model); together
with the input's SHA-256 it decides whether `--resume` may skip a case.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..serialization import json_default

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
HASH_CHUNK = 4 * 1024 * 1024


def sha256_of_input(path: Path) -> tuple[str, int]:
    """(hex digest, bytes) of a file, or of a DICOM folder's files (names and contents, sorted by name)."""
    digest, total = hashlib.sha256(), 0
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
                total += len(chunk)
    return digest.hexdigest(), total


def settings_key(task: str, prompt: str, options: dict, model: dict) -> str:
    payload = json.dumps({"task": task, "prompt": prompt, "options": options, "model": model}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def model_identity(model: str) -> dict:
    """What names the weights: the hub id, or a folder with a hash of its config and weight index or sizes."""
    folder = Path(model)
    if not folder.is_dir():
        return {"model": model}
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return {"model": str(folder.resolve()), "fingerprint": digest.hexdigest()[:16]}


class Manifest:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / MANIFEST_NAME

    def latest(self) -> dict[str, dict]:
        """The last entry of every case."""
        entries: dict[str, dict] = {}
        if not self.path.is_file():
            return entries
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    entries[entry["case"]] = entry
                except (ValueError, KeyError, TypeError):
                    log.warning("%s line %d is not a complete entry (a run killed mid-write?); ignored",
                                self.path, number)
        return entries

    def repair_tail(self) -> None:
        """Cut a torn last line so the next append starts on a line of its own."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data.endswith(b"\n"):
                return
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=False, default=json_default) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
