"""`citrusv batch` over DICOM series folders: SEG and SR per good series, recorded in the manifest and the
summary; a series with one broken file fails with the reason (issue 13 item 7), never runs with wrong
geometry; `--dicom-out` for a NIfTI case (new study, no identity)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from batch_helpers import batch_args, file_states, manifest_entries, run_batch
from dicom_checks import assert_seg_lies_on_labelmap
from dicom_series_maker import chest_ct_series

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def dicom_inputs(chest_ct_path: Path, tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("batch-dicom") / "inputs"
    good = chest_ct_series(chest_ct_path, folder / "good")
    broken = chest_ct_series(chest_ct_path, folder / "broken")
    broken.files[20].write_bytes(broken.files[20].read_bytes()[:400])  # one damaged file mid-series
    sitk.WriteImage(sitk.ReadImage(str(chest_ct_path)), str(folder / "plain.nii.gz"), useCompression=True)
    return folder, good


def test_batch_writes_seg_and_sr_per_series_and_fails_the_broken_one(dicom_inputs, tiny_checkpoint, tmp_path):
    inputs, good = dicom_inputs
    before = file_states(inputs)
    out = tmp_path / "out"
    run = run_batch(*batch_args(inputs, out, tiny_checkpoint, "--dicom-out"))
    assert run.returncode == 1, run.stderr  # one case failed
    entries = manifest_entries(out)
    assert entries["broken"]["status"] == "failed" and not entries["broken"]["outputs"]
    assert "DICOM series refused, 1 unreadable file(s)" in entries["broken"]["error"]
    assert "broken (broken): broken: DICOM series refused" in run.stderr

    entry = entries["good"]
    assert entry["status"] == "done", entry["error"]
    assert entry["dicom"] == {"dicom_seg": "good/good_seg.dcm", "dicom_sr": "good/good_sr.dcm"}
    assert entry["options"]["dicom_out"] is True and entry["warnings"] == []
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / entry["outputs"]["labelmap"])))
    seg = pydicom.dcmread(out / entry["outputs"]["dicom_seg"])
    assert labels.any(), "the tiny model found nothing: the SEG check would prove nothing"
    assert_seg_lies_on_labelmap(seg, good.files, labels, {1: 1})
    assert pydicom.dcmread(out / entry["outputs"]["dicom_sr"]).StudyInstanceUID == good.study_uid

    plain = entries["plain"]   # --dicom-out: a new study for a file that has none
    assert plain["status"] == "done" and "dicom_seg" in plain["outputs"] and "dicom_image_0034" in plain["outputs"]
    assert pydicom.dcmread(out / plain["outputs"]["dicom_sr"]).PatientIdentityRemoved == "YES"

    rows = {row["case"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert rows["good"]["dicom_seg"] == "good/good_seg.dcm" and rows["good"]["dicom_sr"] == "good/good_sr.dcm"
    assert rows["broken"]["status"] == "failed" and "unreadable" in rows["broken"]["error"]
    assert file_states(inputs) == before, "the input folder was written"


def test_skip_leaves_out_a_stray_image_with_a_recorded_warning(dicom_inputs, tiny_checkpoint, tmp_path):
    inputs, good = dicom_inputs
    folder = tmp_path / "inputs"
    shutil.copytree(good.folder, folder / "series")
    scout = pydicom.dcmread(good.files[0])
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal localizer in the same series
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(folder / "series" / "SCOUT.dcm")
    refused = run_batch(*batch_args(folder, tmp_path / "refused", tiny_checkpoint))
    assert refused.returncode == 1 and "mixed orientations" in refused.stderr
    run = run_batch(*batch_args(folder, tmp_path / "out", tiny_checkpoint, "--on-bad-dicom", "skip"))
    assert run.returncode == 0, run.stderr
    entry = manifest_entries(tmp_path / "out")["series"]
    assert entry["status"] == "done" and len(entry["warnings"]) == 1 and "SCOUT.dcm" in entry["warnings"][0]
    assert "SCOUT.dcm" in next(csv.DictReader(open(tmp_path / "out" / "summary.csv")))["warnings"]
    assert set(entry["dicom"]) >= {"dicom_sr"}  # a DICOM input: SEG/SR by default
