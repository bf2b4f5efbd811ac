"""`citrusv segment / detect / report` on a DICOM series folder, as a user runs them (a subprocess, the tiny
model): DICOM SEG + SR beside the other files, on exactly the labelmap's voxels; bad series refused first."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import SimpleITK as sitk
from dicom_checks import assert_seg_lies_on_labelmap, dciodvfy
from dicom_series_maker import chest_ct_series
from test_cli import citrusv

pytestmark = pytest.mark.model
FAST = ("--mode", "per-slice", "--slice-range", "15:18")


@pytest.fixture(scope="module")
def chest_series(chest_ct_path, tmp_path_factory):
    return chest_ct_series(chest_ct_path, tmp_path_factory.mktemp("cli-dicom") / "CT_series")


def test_segment_a_dicom_series_writes_seg_and_sr_on_the_labelmap(tiny_checkpoint, chest_series, work_dir: Path):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in chest_series.folder.iterdir())
    out = work_dir / "out"
    run = citrusv("segment", str(chest_series.folder), "--model", str(tiny_checkpoint), "--prompt",
                  "segment the left lung", "--out", str(out), *FAST)
    assert run.returncode == 0, run.stderr
    assert "dicom_seg      CT_series_seg.dcm" in run.stderr and "dicom_sr       CT_series_sr.dcm" in run.stderr
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "CT_series_seg.nii.gz")))
    findings = json.loads((out / "CT_series_findings.json").read_text())
    assert labels.any(), "the tiny model found nothing: the SEG check below would prove nothing"
    seg = pydicom.dcmread(out / "CT_series_seg.dcm")
    assert_seg_lies_on_labelmap(seg, chest_series.files, labels, {1: 1})
    sr = hd.sr.srread(out / "CT_series_sr.dcm")
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values["Volume"] == pytest.approx(findings["findings"][0]["volume_ml"], rel=1e-9)
    assert values["Long axis"] == pytest.approx(findings["findings"][0]["long_axis_mm"], rel=1e-9)
    assert "jdh-algo" not in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    for path in (out / "CT_series_seg.dcm", out / "CT_series_sr.dcm"):
        errors, _ = dciodvfy(path)
        assert errors == [], errors
    assert sorted((p.name, p.stat().st_mtime_ns) for p in chest_series.folder.iterdir()) == before


def test_report_writes_an_sr_with_the_report_text_and_no_dicom_out_writes_none(tiny_checkpoint, chest_series,
                                                                                work_dir: Path):
    run = citrusv("report", str(chest_series.folder), "--model", str(tiny_checkpoint), "--out", str(work_dir / "r"),
                  "--slice-range", "16:17", "--max-new-tokens", "24")
    assert run.returncode == 0, run.stderr
    assert not (work_dir / "r" / "CT_series_seg.dcm").exists()  # nothing segmented, no SEG
    sr = pydicom.dcmread(work_dir / "r" / "CT_series_sr.dcm")
    assert sr.SeriesDescription.startswith("CitrusV measurements - RANDOM WEIGHTS")
    errors, _ = dciodvfy(work_dir / "r" / "CT_series_sr.dcm")
    assert errors == [], errors
    off = citrusv("detect", str(chest_series.folder), "--model", str(tiny_checkpoint), "--prompt", "nodule",
                  "--out", str(work_dir / "d"), "--slice-range", "16:17", "--max-new-tokens", "24", "--no-dicom-out")
    assert off.returncode == 0, off.stderr
    assert not list((work_dir / "d").glob("*.dcm")) and (work_dir / "d" / "CT_series_findings.json").is_file()


def test_a_broken_series_is_refused_before_the_model_loads(tiny_checkpoint, chest_series, work_dir: Path):
    broken = work_dir / "broken"
    shutil.copytree(chest_series.folder, broken)
    victim = chest_series.files[10].name
    (broken / victim).write_bytes((broken / victim).read_bytes()[:300])
    run = citrusv("segment", str(broken), "--model", str(tiny_checkpoint), "--prompt", "segment the liver",
                  "--out", str(work_dir / "x"))
    assert run.returncode == 2 and "loading model" not in run.stderr
    assert f"DICOM series refused, 1 unreadable file(s): {victim}" in run.stderr
    skipped = citrusv("segment", str(broken), "--model", str(tiny_checkpoint), "--prompt", "segment the liver",
                      "--out", str(work_dir / "x"), "--on-bad-dicom", "skip")
    assert skipped.returncode == 2 and "uneven slice positions" in skipped.stderr  # a gap is never bridged
    inside = citrusv("segment", str(chest_series.folder), "--model", str(tiny_checkpoint), "--prompt", "liver",
                     "--out", str(chest_series.folder / "results"))
    assert inside.returncode == 2 and "inside the input folder" in inside.stderr
    assert not (chest_series.folder / "results").exists()
