"""An optional output never blocks the main one: a DICOM series without a Frame of Reference UID is segmented,
its default SEG/SR left out with a warning in the log, the labels file, the findings and the batch summary;
`--dicom-out` asked for explicitly still refuses before the model loads. An input that is a symbolic-link loop
is one line and exit 2, as every other unreadable input."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pydicom
import pytest
from dicom_series_maker import chest_ct_series
from test_cli import citrusv

sys.path.insert(0, str(Path(__file__).parents[1] / "batch"))
from batch_helpers import batch_args, manifest_entries, run_batch  # noqa: E402

pytestmark = pytest.mark.model
FAST = ("--mode", "per-slice", "--slice-range", "16:18")
SKIPPED = "no DICOM SEG/SR written: the series has no Frame of Reference UID"


@pytest.fixture(scope="module")
def series_without_frame(chest_ct_path, tmp_path_factory):
    series = chest_ct_series(chest_ct_path, tmp_path_factory.mktemp("no-frame") / "inputs" / "noframe")
    for path in series.files:
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(path)
    return series


@pytest.mark.slow
def test_segmentation_goes_ahead_without_the_default_seg_and_sr(tiny_checkpoint, series_without_frame, work_dir):
    out = work_dir / "out"
    run = citrusv("segment", str(series_without_frame.folder), "--model", str(tiny_checkpoint), "--prompt",
                  "segment the left lung", "--out", str(out), *FAST)
    assert run.returncode == 0, run.stderr
    assert f"warning: {SKIPPED}" in run.stderr
    assert not list(out.glob("*.dcm")) and (out / "noframe_seg.nii.gz").is_file()
    labels = json.loads((out / "noframe_labels.json").read_text())
    assert any(SKIPPED in warning for warning in labels["warnings"])
    assert any(SKIPPED in problem for problem in json.loads((out / "noframe_findings.json").read_text())["problems"])
    explicit = citrusv("segment", str(series_without_frame.folder), "--model", str(tiny_checkpoint), "--prompt",
                       "segment the left lung", "--out", str(work_dir / "explicit"), "--dicom-out", *FAST)
    assert explicit.returncode == 2 and "loading model" not in explicit.stderr
    assert "no DICOM output possible" in explicit.stderr and not (work_dir / "explicit").exists()


@pytest.mark.slow
def test_a_batch_case_is_done_with_the_skip_in_its_summary(tiny_checkpoint, series_without_frame, tmp_path):
    run = run_batch(*batch_args(series_without_frame.folder.parent, tmp_path / "out", tiny_checkpoint))
    assert run.returncode == 0, run.stderr
    entry = manifest_entries(tmp_path / "out")["noframe"]
    assert entry["status"] == "done" and any(SKIPPED in w for w in entry["warnings"]) and not entry["dicom"]
    row = next(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert SKIPPED in row["warnings"] and row["found"] in ("yes", "no: no slice whose mask logits show the target")
    assert row["voxel_count"] != ""


@pytest.mark.unit
def test_a_symbolic_link_loop_as_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    run = citrusv("segment", str(tmp_path / "a"), "--prompt", "segment the liver", "--out", str(tmp_path / "out"))
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "symbolic link that loops" in run.stderr
    assert "Traceback" not in run.stderr
