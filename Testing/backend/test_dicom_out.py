"""DICOM SEG and TID 1500 SR written for a real result on the real chest CT (as a scanner's DICOM series, and
tilted), validated by dciodvfy, read back with pydicom and highdicom, and compared with what dcmqi (the
converter behind Slicer's QuantitativeReporting and its DICOM SEG reader) writes and reads for the same
segmentation.

The result is the ground truth segmentation that slicerio ships with the CT, measured by the pipeline's own
measurement code, so segments are real anatomy of real size (a tiny random model finds noise: the CLI tests
run that path)."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_checks import assert_seg_lies_on_labelmap, dciodvfy
from dicom_series_maker import NOT_TO_COPY, PATIENT, chest_ct_series, rotation

from citrusv_backend.errors import InputError
from citrusv_backend.volume.input.io import read_volume
from citrusv_backend.volume.outputs.dicom_out import write_dicom_outputs
from citrusv_backend.volume.outputs.files import write_outputs
from citrusv_backend.volume.outputs.quantify import laterality_of, measure_segment
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import parse_window
from citrusv_backend.volume.tasks.report import REPORT_EXPERIMENTAL
from citrusv_backend.volume.tasks.results import Segment, VolumeResult, segment_finding

pytestmark = pytest.mark.unit
TARGETS = {"ribs": 1, "right lung": 5, "left lung": 6}   # ground-truth label values in Segmentation.seg.nrrd
MODEL = {"checkpoint": "/models/models--jdh-algo--Citrus-V-8B-v1.0/snapshots/abc123"}


def ground_truth_result(volume, segmentation_path: Path, names=("ribs", "right lung", "left lung", "liver"),
                        random_weights: bool = True) -> VolumeResult:
    """A segment result as the pipeline makes it, with the ground truth's masks ("liver": not in the chest CT)."""
    import slicerio

    truth = slicerio.read_segmentation(str(segmentation_path))
    values = np.ascontiguousarray(truth["voxels"].transpose(2, 1, 0))
    source = SliceSource(volume, "axial", parse_window("lung", "", volume.modality, volume.voxels))
    result = VolumeResult(task="segment", prompt="segment " + ", ".join(names), case=volume.name,
                          labels=np.zeros(volume.shape, np.uint8), random_weights=random_weights, source=source)
    for number, name in enumerate(names, start=1):
        mask = values == TARGETS[name] if name in TARGETS else np.zeros(volume.shape, bool)
        measured = measure_segment(mask, volume.geometry, volume.voxels, source.orientation.slice_axis)
        segment = Segment(number, name, f"Please help segment the {name} in this scan.", mask,
                          17 if mask.any() else None, 0.9, measurements=measured.to_dict(),
                          laterality=laterality_of(measured.centroid_lps, volume.geometry, volume.shape)
                          if mask.any() else None)
        result.labels[mask & (result.labels == 0)] = number
        result.segments.append(segment)
    result.findings = [segment_finding(s) for s in result.segments]
    result.report_findings = "[slice 17] Both lungs are aerated; no nodule."
    result.report_impression = "[slice 17] No acute cardiopulmonary finding."
    result.experimental = REPORT_EXPERIMENTAL.format(what="CT slices")
    return result


@pytest.fixture(scope="module")
def runs(chest_ct_path, chest_ct_segmentation_path, tmp_path_factory):
    """One run per series (the chest CT on its own grid, and tilted): the series, the volume read from it, the
    result and the files `write_outputs` wrote for it."""
    root = tmp_path_factory.mktemp("dicom-out")
    made = {}
    for name, direction in (("chest", None), ("tilted", rotation(20.0, -15.0, 30.0))):
        series = chest_ct_series(chest_ct_path, root / f"{name}-series", direction=direction)
        volume = read_volume(series.folder)
        result = ground_truth_result(volume, chest_ct_segmentation_path)
        files = write_outputs(result, root / f"{name}-out", extra={"model": MODEL})
        made[name] = {"series": series, "volume": volume, "result": result, "files": files}
    return made


@pytest.mark.parametrize("name", ["chest", "tilted"])
def test_dciodvfy_finds_no_error_in_the_seg_and_sr(runs, name):
    files = runs[name]["files"]
    assert {"dicom_seg", "dicom_sr"} <= set(files)
    for kind in ("dicom_seg", "dicom_sr"):
        errors, warnings = dciodvfy(files[kind])
        assert errors == [], f"{kind}: {errors}"
        print(f"{name} {kind}: 0 errors, {len(warnings)} warnings", *warnings, sep="\n  ")


@pytest.mark.parametrize("name", ["chest", "tilted"])
def test_every_seg_frame_lands_on_its_source_instance_and_the_labelmaps_voxels(runs, name):
    run = runs[name]
    seg = pydicom.dcmread(run["files"]["dicom_seg"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(run["files"]["labelmap"])))  # the run's own labelmap
    # Labels 1-3 (ribs, lungs) found, 4 (liver) absent: SEG segments 1-3.
    assert_seg_lies_on_labelmap(seg, run["series"].files, labels, {1: 1, 2: 2, 3: 3})
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["ribs", "right lung", "left lung"]
    # highdicom reads the same pixels back as a volume, on the source geometry.
    read = hd.seg.segread(run["files"]["dicom_seg"]).get_volume(combine_segments=True, relabel=False)
    index_map = np.linalg.inv(run["volume"].geometry.ijk_to_lps()) @ read.affine  # highdicom (a, b, c) -> our (i, j, k)
    signs = np.round(index_map[:3, :3])
    assert np.allclose(index_map[:3, :3], signs, atol=1e-6) and np.allclose(np.abs(signs), np.eye(3)[::-1])
    array = read.array  # (a, b, c) = (k, j, i) up to the direction highdicom chose for each axis
    for axis, sign in zip((0, 1, 2), (signs[2, 0], signs[1, 1], signs[0, 2])):
        if sign < 0:
            array = np.flip(array, axis=axis)
    low = np.minimum(index_map[:3, 3], index_map[:3, 3] + (signs @ (np.array(read.array.shape) - 1)))
    i0, j0, k0 = np.round(low).astype(int)
    assert np.allclose(low, [i0, j0, k0], atol=1e-4)
    depth, rows, columns = array.shape
    assert np.array_equal(array, labels[k0:k0 + depth, j0:j0 + rows, i0:i0 + columns])
    assert not np.delete(labels, np.s_[k0:k0 + depth], axis=0).any()


def test_segments_carry_codes_algorithm_and_tracking(runs):
    seg = pydicom.dcmread(runs["chest"]["files"]["dicom_seg"])
    right, left = seg.SegmentSequence[1], seg.SegmentSequence[2]
    assert right.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"      # Anatomical Structure
    assert right.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"          # Lung
    assert right.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert left.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert right.SegmentAlgorithmType == "AUTOMATIC" and right.SegmentAlgorithmName == "CitrusV"
    algorithm = right.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "CitrusV" and algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert "jdh-algo/Citrus-V-8B-v1.0" in algorithm.AlgorithmParameters
    assert "RANDOM WEIGHTS" in seg.SeriesDescription and "RESEARCH USE ONLY" in seg.ImageComments
    assert seg.SegmentationType == "BINARY"


def test_only_the_least_identity_is_copied(runs):
    series = runs["chest"]["series"]
    for kind in ("dicom_seg", "dicom_sr"):
        ds = pydicom.dcmread(runs["chest"]["files"][kind])
        for keyword, value in PATIENT.items():
            assert str(ds.get(keyword)) == value, (kind, keyword)
        assert not [k for k in NOT_TO_COPY if k in ds], kind
        assert ds.StudyInstanceUID == series.study_uid and ds.SeriesInstanceUID != series.series_uid


def test_sr_measurements_equal_the_findings_table(runs):
    run = runs["chest"]
    sr = hd.sr.srread(run["files"]["dicom_sr"])
    seg = pydicom.dcmread(run["files"]["dicom_seg"])
    table = {row["finding"]: row for row in csv.DictReader(open(run["files"]["findings_tsv"]), delimiter="\t")}
    findings = {row["finding"]: row for row in json.loads(run["files"]["findings_json"].read_text())["findings"]}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    tracking = {s.SegmentNumber: s.TrackingUID for s in seg.SegmentSequence}
    for group in groups:
        reference = group.referenced_segment
        [number] = reference.referenced_segment_numbers
        name = seg.SegmentSequence[number - 1].SegmentLabel
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.source_series_for_segmentation.value == run["series"].series_uid
        assert group.tracking_uid == tracking[number]
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        expected = findings[name]
        assert values["Volume"] == pytest.approx(expected["volume_ml"], rel=1e-9)
        assert values["Long axis"] == pytest.approx(expected["long_axis_mm"], rel=1e-9)
        assert values["Short axis"] == pytest.approx(expected["short_axis_mm"], rel=1e-9)
        assert values["Attenuation Coefficient"] == pytest.approx(expected["mean_intensity"], rel=1e-9)
        assert f"{values['Volume']:.2f}" == table[name]["volume_ml"]  # and the TSV a person reads
    texts = [item.TextValue for item in _all_items(sr) if getattr(item, "ValueType", "") == "TEXT"]
    assert any("FINDINGS: [slice 17] Both lungs" in t for t in texts)
    assert any("IMPRESSION: [slice 17] No acute" in t for t in texts)
    assert any("RANDOM WEIGHTS" in t for t in texts) and any("RESEARCH USE ONLY" in t for t in texts)
    assert REPORT_EXPERIMENTAL.format(what="CT slices") in texts, "a report's EXPERIMENTAL mark reaches the SR"
    assert any(t == "liver: not found" for t in texts)
    evidence = {str(i.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and set(run["series"].sop_uids) <= evidence


def _all_items(dataset):
    for item in getattr(dataset, "ContentSequence", []):
        yield item
        yield from _all_items(item)


def dcmqi(tool: str, *args: str) -> subprocess.CompletedProcess:
    import shutil
    import sysconfig

    path = shutil.which(tool) or str(Path(sysconfig.get_paths()["scripts"]) / tool)
    if not Path(path).exists():
        pytest.skip(f"dcmqi's {tool} is not installed (pip install dcmqi)")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=300)


def test_dcmqi_reads_our_seg_back_onto_the_labelmap(runs, tmp_path):
    """segimage2itkimage is what Slicer's DICOM SEG reader (QuantitativeReporting) runs on a SEG."""
    run = runs["tilted"]
    read = dcmqi("segimage2itkimage", "--inputDICOM", str(run["files"]["dicom_seg"]), "--outputDirectory",
                 str(tmp_path), "-t", "nrrd")
    assert read.returncode == 0, read.stdout + read.stderr
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(run["files"]["labelmap"])))
    meta = json.loads((tmp_path / "meta.json").read_text())
    grid = run["volume"].to_sitk(labels)
    for group, attributes in enumerate(meta["segmentAttributes"], start=1):
        segment = sitk.ReadImage(str(tmp_path / f"{group}.nrrd"))
        on_grid = sitk.Resample(segment, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        label = attributes[0]["labelID"]
        name = attributes[0]["SegmentLabel"]
        assert np.array_equal(sitk.GetArrayFromImage(on_grid) == label, labels == group), name
        assert np.allclose(segment.GetDirection(), grid.GetDirection(), atol=1e-5)


def test_our_seg_matches_what_dcmqi_writes_for_the_same_segmentation(runs, tmp_path):
    run = runs["chest"]
    ours = pydicom.dcmread(run["files"]["dicom_seg"])
    attributes = []
    for item in ours.SegmentSequence:
        entry = {"labelID": int(item.SegmentNumber), "SegmentLabel": item.SegmentLabel,
                 "SegmentDescription": item.SegmentLabel, "SegmentAlgorithmType": "AUTOMATIC",
                 "SegmentAlgorithmName": "CitrusV", "recommendedDisplayRGBValue": [128, 174, 128]}
        for key in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
            code = item[key][0]
            entry[key] = {"CodeValue": code.CodeValue, "CodingSchemeDesignator": code.CodingSchemeDesignator,
                          "CodeMeaning": code.CodeMeaning}
        modifier = item.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
        if modifier:
            entry["SegmentedPropertyTypeModifierCodeSequence"] = {
                "CodeValue": modifier[0].CodeValue, "CodingSchemeDesignator": modifier[0].CodingSchemeDesignator,
                "CodeMeaning": modifier[0].CodeMeaning}
        attributes.append(entry)
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps({"ContentCreatorName": "Reader1", "ClinicalTrialSeriesID": "1",
                                    "ClinicalTrialTimePointID": "1", "SeriesDescription": "dcmqi",
                                    "SeriesNumber": "300", "InstanceNumber": "1", "BodyPartExamined": "CHEST",
                                    "segmentAttributes": [attributes], "ContentLabel": "DCMQI",
                                    "ContentDescription": "dcmqi", "ClinicalTrialCoordinatingCenterName": "none"}))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(run["files"]["labelmap"])))
    labelmap = tmp_path / "labels.nrrd"
    sitk.WriteImage(run["volume"].to_sitk(labels.astype(np.uint8)), str(labelmap))
    output = tmp_path / "dcmqi_seg.dcm"
    made = dcmqi("itkimage2segimage", "--inputImageList", str(labelmap), "--inputDICOMDirectory",
                 str(run["series"].folder), "--inputMetadata", str(metadata), "--outputDICOM", str(output))
    assert made.returncode == 0, made.stdout + made.stderr
    theirs = pydicom.dcmread(output)
    # The same frames: per segment, the same source instances, positions and pixels.
    from dicom_checks import frames_by_segment

    mine, reference = frames_by_segment(ours), frames_by_segment(theirs)
    assert set(mine) == set(reference) == {1, 2, 3}
    for number in mine:
        a = sorted(mine[number], key=lambda f: f[0])
        b = sorted(reference[number], key=lambda f: f[0])
        assert [f[0] for f in a] == [f[0] for f in b], f"segment {number}: other source instances"
        for (_, position_a, pixels_a), (_, position_b, pixels_b) in zip(a, b):
            assert np.allclose(position_a, position_b, atol=1e-4)
            assert np.array_equal(pixels_a.astype(bool), pixels_b.astype(bool))
    # The same grid and references, and the segment codes as Slicer's terminology reads them.
    for keyword in ("FrameOfReferenceUID", "StudyInstanceUID", "Rows", "Columns", "SegmentationType", "PatientID"):
        assert ours.get(keyword) == theirs.get(keyword), keyword
    shared_ours = ours.SharedFunctionalGroupsSequence[0]
    shared_theirs = theirs.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(v) for v in shared_ours.PlaneOrientationSequence[0].ImageOrientationPatient],
                       [float(v) for v in shared_theirs.PlaneOrientationSequence[0].ImageOrientationPatient], atol=1e-6)
    assert np.allclose([float(v) for v in shared_ours.PixelMeasuresSequence[0].PixelSpacing],
                       [float(v) for v in shared_theirs.PixelMeasuresSequence[0].PixelSpacing], atol=1e-6)
    assert ours.ReferencedSeriesSequence[0].SeriesInstanceUID == theirs.ReferencedSeriesSequence[0].SeriesInstanceUID
    for a, b in zip(ours.SegmentSequence, theirs.SegmentSequence):
        for key in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
            assert a[key][0].CodeValue == b[key][0].CodeValue and a[key][0].CodingSchemeDesignator == \
                b[key][0].CodingSchemeDesignator


def test_a_non_dicom_input_gets_a_new_study_without_identity(chest_ct_path, chest_ct_segmentation_path, tmp_path):
    volume = read_volume(chest_ct_path)
    result = ground_truth_result(volume, chest_ct_segmentation_path, names=("left lung",), random_weights=False)
    files = write_outputs(result, tmp_path / "out", extra={"model": MODEL})
    assert not any(kind.startswith("dicom") for kind in files)  # only on request
    files = write_outputs(result, tmp_path / "out", extra={"model": MODEL}, dicom=True)
    images = sorted(path for kind, path in files.items() if kind.startswith("dicom_image_"))
    assert len(images) == 34
    seg, sr = pydicom.dcmread(files["dicom_seg"]), pydicom.dcmread(files["dicom_sr"])
    first = pydicom.dcmread(images[0])
    for ds in (seg, sr, first):
        assert ds.PatientIdentityRemoved == "YES" and "No patient or study identity" in ds.DeidentificationMethod
        assert not ds.PatientName and not ds.PatientID
        assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert "RESEARCH USE ONLY" in seg.ImageComments and "RANDOM" not in seg.SeriesDescription
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(files["labelmap"])))
    assert_seg_lies_on_labelmap(seg, images, labels, {1: 1})
    for path in (files["dicom_seg"], files["dicom_sr"], images[0], images[-1]):
        errors, _ = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
    back = read_volume(tmp_path / "out", on_bad_dicom="skip")  # the image series, its SEG and SR left out
    assert np.array_equal(back.voxels, volume.voxels) and np.allclose(back.geometry.ijk_to_lps(),
                                                                      volume.geometry.ijk_to_lps(), atol=1e-4)


def test_dicom_output_of_a_non_dicom_pet_volume_is_refused_with_the_reason(chest_ct_path, tmp_path):
    volume = read_volume(chest_ct_path)
    volume.modality = "PET"
    result = ground_truth_result(volume, chest_ct_path.parent / "Segmentation.seg.nrrd", names=("left lung",))
    with pytest.raises(InputError, match="non-DICOM PET volume is not supported"):
        write_dicom_outputs(result, volume, tmp_path, "pet", "model")
