"""Bad folders: symbolic links that loop (anywhere under the input folder) are failed cases with a message,
never a crash of the whole batch; a bad --out is a one-line usage error before any work."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from batch_helpers import batch_env, manifest_entries

from citrusv_backend.batch.discovery import discover_cases

pytestmark = pytest.mark.unit


def _looping_folder(root: Path, chest: Path | None = None) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    if chest is not None:
        shutil.copyfile(chest, root / "chest.nrrd")
    os.symlink("loop.nrrd", root / "loop.nrrd")            # a volume name that points at itself
    os.symlink("loopy", root / "loopy")                    # no suffix: could be a DICOM file
    os.symlink("../sub/self", root / "sub" / "self")       # inside a subfolder
    os.symlink("b", root / "sub" / "deeper" / "a")         # a two-link cycle, two levels down
    os.symlink("a", root / "sub" / "deeper" / "b")
    os.symlink("notes.txt", root / "notes.txt")            # not a volume by its name: ignored, as other files
    return root


@pytest.mark.parametrize("recursive", [False, True])
def test_discovery_survives_looping_links(tmp_path, recursive):
    cases, ignored = discover_cases(_looping_folder(tmp_path / "in"), "*", recursive)
    found = {case.relative for case in cases}
    assert {"loop.nrrd", "loopy"} <= found
    if recursive:
        assert {"sub/self", "sub/deeper/a", "sub/deeper/b"} <= found
    assert "notes.txt" not in found and ignored >= 1


def test_a_batch_with_looping_links_fails_those_cases_and_goes_on(tmp_path):
    """No good case at all: the batch runs, fails each loop with a message, and never loads a model."""
    inputs = _looping_folder(tmp_path / "in")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "citrusv_backend.cli", "batch", str(inputs), "--out", str(out),
                          "--prompt", "segment the liver", "--recursive", "--model", str(tmp_path / "no-model")],
                         capture_output=True, encoding="utf-8", timeout=300, env=batch_env())
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    entries = manifest_entries(out)
    assert set(entries) >= {"loop", "loopy", "sub__self", "sub__deeper__a", "sub__deeper__b"}
    for entry in entries.values():
        assert entry["status"] == "failed" and "symbolic link" in entry["error"] and "loop" in entry["error"]
    assert "loading model" not in run.stderr


def _citrusv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "citrusv_backend.cli", *args], capture_output=True,
                          encoding="utf-8", timeout=600, env=batch_env())


def test_writable_folder_names_what_is_in_the_way(tmp_path):
    from citrusv_backend.errors import InputError
    from citrusv_backend.paths import writable_folder

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    with pytest.raises(InputError, match="a file of that name is in the way"):
        writable_folder(blocker)
    with pytest.raises(InputError, match="blocker is a file, so nothing can be created under it"):
        writable_folder(blocker / "a" / "b")
    with pytest.raises(InputError, match="blocker is a file"):
        writable_folder(blocker / "a", create=False)
    # Unwritable: a read-only folder (for a user; root writes anyway) and a file system that takes no folders.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:
        with pytest.raises(InputError, match="permission denied"):
            writable_folder(locked / "out")
    with pytest.raises(InputError, match="^--out /proc/citrusv-nowhere/out: "):
        writable_folder("/proc/citrusv-nowhere/out")
    with pytest.raises(InputError, match="^--out /proc/citrusv-nowhere: "):
        writable_folder("/proc/citrusv-nowhere", create=False)
    assert writable_folder(tmp_path / "later", create=False) and not (tmp_path / "later").exists()
    assert writable_folder(tmp_path / "new" / "folder").is_dir()


def test_a_bad_out_is_a_one_line_usage_error_before_any_work(tmp_path, chest_ct_path):
    """segment and infer used to fail only after the whole model run, all three with a traceback and exit 1."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    image = tmp_path / "slice.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    runs = {
        "segment": _citrusv("segment", str(chest_ct_path), "--prompt", "segment the left lung", "--out", str(blocker),
                            "--model", "tiny", "--mode", "per-slice", "--slice-range", "15:16"),
        "infer": _citrusv("infer", "--image", str(image), "--prompt", "What is this?", "--max-new-tokens", "2",
                          "--out", str(blocker / "sub" / "prefix"), "--model", "tiny"),
        "batch": _citrusv("batch", str(chest_ct_path.parent), "--pattern", "CTChest4.nrrd", "--prompt", "x",
                          "--out", str(blocker / "results"), "--model", "tiny"),
    }
    for command, run in runs.items():
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2, f"{command}: {run.returncode} {run.stderr[-2000:]}"
        assert len(lines) == 1 and lines[0].startswith("citrusv: error: ") and "--out" in lines[0], (command, lines)
        assert "loading model" not in run.stderr
