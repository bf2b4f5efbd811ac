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


# ---------------------------------------------------------------------------------------------- independent readers

DCMJS_VERSION = "0.52.2"   # the OHIF viewer's DICOM library, pinned
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "network")


def dcmjs_modules() -> Path:
    """A node_modules folder holding dcmjs (installed once per machine into a cache folder, never committed).
    Skips only when npm cannot reach its registry (outside CI); a missing node or any other failure fails."""
    cache = Path(os.environ.get("CITRUSV_NPM_CACHE", Path.home() / ".cache" / "citrusv-tests")) / f"dcmjs-{DCMJS_VERSION}"
    modules = cache / "node_modules"
    if (modules / "dcmjs" / "package.json").is_file():
        return modules
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed to read DICOM SEG with dcmjs (apt-get install nodejs npm)")
    cache.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["npm", "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--no-save",
                          f"dcmjs@{DCMJS_VERSION}"], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        if any(word in run.stderr for word in NETWORK_ERRORS) and not os.environ.get("CI"):
            pytest.skip(f"npm cannot reach its registry to install dcmjs: {run.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"npm install dcmjs@{DCMJS_VERSION} failed: {run.stderr[-2000:]}")
    return modules


def dcmjs_segments(seg_path: Path) -> dict:
    """What dcmjs reads from a SEG: {"segment_type", "bits_allocated", "segments": [{number, label, tracking_uid,
    frames, voxels, sources}]} (Testing/js/dcmjs_seg_voxels.js)."""
    import json

    script = Path(__file__).parent / "js" / "dcmjs_seg_voxels.js"
    run = subprocess.run(["node", str(script), str(dcmjs_modules()), str(seg_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def dcmqi_segments(seg_path: Path, out_dir: Path, grid) -> dict[str, np.ndarray]:
    """dcmqi's segimage2itkimage (the converter behind Slicer's DICOM SEG plugin): segment label -> its mask as a
    (k, j, i) bool array on `grid` (a SimpleITK image of the source volume), one file per segment."""
    import json
    import sysconfig

    import SimpleITK as sitk

    tool = shutil.which("segimage2itkimage") or str(Path(sysconfig.get_paths()["scripts"]) / "segimage2itkimage")
    if not Path(tool).exists():
        pytest.fail("dcmqi's segimage2itkimage is missing (pip install dcmqi: the test extra has it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([tool, "--inputDICOM", str(seg_path), "--outputDirectory", str(out_dir), "-t", "nrrd"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out_dir / "meta.json").read_text())
    masks = {}
    for group, attributes in enumerate(meta["segmentAttributes"], start=1):
        image = sitk.ReadImage(str(out_dir / f"{group}.nrrd"))
        on_grid = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        for segment in attributes:
            masks[segment["SegmentLabel"]] = on_grid == segment["labelID"]
    return masks
