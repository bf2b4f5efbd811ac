"""Helpers of the batch tests: the batch command as a user runs it (a subprocess), manifest and file states."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "segment the left lung"
# Three slices per case, each on its own: a few seconds per case on a 2-core CPU.
FAST_OPTIONS = ("--mode", "per-slice", "--slice-range", "15:18", "--recursive")
GOOD_CASES = {"chest": "chest.nrrd", "chest_copy": "chest_copy.nii.gz", "sub__chest": "sub/chest.nrrd"}
BAD_CASES = {"corrupt": "corrupt.nii.gz", "flat2d": "flat2d.nii.gz", "notes": "notes.nrrd"}


def run_batch(*args: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "citrusv_backend.cli", "batch", *args], capture_output=True,
                          encoding="utf-8", timeout=600, env=batch_env(), **popen)


def start_batch(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "citrusv_backend.cli", "batch", *args], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), env=batch_env())


def batch_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def batch_args(inputs: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [str(inputs), "--out", str(out), "--model", str(checkpoint), "--prompt", PROMPT, *FAST_OPTIONS, *extra]


def manifest_entries(out: Path) -> dict[str, dict]:
    """The latest entry per case."""
    entries = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        entries[entry["case"]] = entry
    return entries


def wait_for_done_case(out: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    manifest, deadline = out / "manifest.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if manifest.is_file() and '"status": "done"' in manifest.read_text():
            return
        assert process.poll() is None, "the batch ended before its first case was done"
        time.sleep(0.05)
    raise AssertionError("no case was done in time")


def file_states(folder: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file below `folder`."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def labelmap_voxels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def decompressed(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())
