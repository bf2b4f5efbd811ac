"""Checks on written DICOM objects shared by the backend, batch and service tests: dciodvfy's verdict, and where
each SEG frame lands (which source instance, which labelmap voxels)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of David Clunie's validator (Debian's dicom3tools, installed by .ci/run)."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is missing in CI: .ci/run installs dicom3tools (apt-get install dicom3tools)")
        pytest.skip("dciodvfy is not installed here (apt-get install dicom3tools)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")]


def frames_by_segment(seg: pydicom.Dataset) -> dict[int, list[tuple[str, list[float], np.ndarray]]]:
    """segment number -> [(referenced source SOP Instance UID, frame position, frame pixels)], read with pydicom."""
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    found: dict[int, list] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        identification = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        found.setdefault(number, []).append((str(source), position, pixels[index]))
    return found


def assert_seg_lies_on_labelmap(seg: pydicom.Dataset, source_files: list[Path], labels: np.ndarray,
                                numbers: dict[int, int]) -> None:
    """Every segment's frames: exactly one per source slice holding its label, on that slice's instance and
    position, with exactly the labelmap's pixels. `numbers`: labelmap label -> SEG segment number."""
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in source_files]
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    frames = frames_by_segment(seg)
    assert set(frames) == set(numbers.values())
    for label, number in numbers.items():
        expected = [k for k in range(labels.shape[0]) if (labels[k] == label).any()]
        landed = [slice_of[uid] for uid, _, _ in frames[number]]
        assert sorted(landed) == expected, f"segment {number}: frames on slices {sorted(landed)}, labelmap {expected}"
        for uid, position, pixels in frames[number]:
            k = slice_of[uid]
            assert np.allclose(position, [float(v) for v in sources[k].ImagePositionPatient], atol=1e-4)
            assert np.array_equal(pixels.astype(bool), labels[k] == label), f"segment {number}, slice {k}"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= \
        set(slice_of)
