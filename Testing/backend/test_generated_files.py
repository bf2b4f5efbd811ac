"""docs/cli.md and the Slicer module's backend_options.py are made from the backend's declarations by
bench/tools/generated_files.py; they must be what it makes now (run it after changing an option)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "tools"))

import generated_files  # noqa: E402

pytestmark = pytest.mark.unit


def test_the_generated_files_are_current():
    stale = generated_files.stale_files()
    assert stale == [], f"{stale} are stale: run python bench/tools/generated_files.py"


def test_a_stale_or_missing_file_is_named(tmp_path):
    for path in generated_files.GENERATORS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    assert generated_files.stale_files(tmp_path) == []
    cli = tmp_path / generated_files.CLI_DOC
    cli.write_text(cli.read_text(encoding="utf-8").replace("--slice-range", "--slices"), encoding="utf-8")
    (tmp_path / generated_files.SLICER_OPTIONS).unlink()
    assert generated_files.stale_files(tmp_path) == [str(generated_files.CLI_DOC), str(generated_files.SLICER_OPTIONS)]


def test_the_cli_reference_lists_every_option_of_every_command():
    text = (ROOT / generated_files.CLI_DOC).read_text(encoding="utf-8")
    for heading in ("## `citrusv segment`", "## `citrusv serve`", "### `citrusv dev make-tiny-checkpoint`",
                    "### `citrusv dev bench`"):
        assert heading in text
    for flag in ("--object-score-suppression", "--full-size-random", "--heads", "--ray-address", "--exit-with-parent"):
        assert f"`{flag}" in text, flag
