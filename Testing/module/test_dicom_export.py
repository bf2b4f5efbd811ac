"""The module's DICOM path with real MRML and the real backend: a volume node loaded from a DICOM database
(the slicerio chest CT written as a scanner's series, oblique) is uploaded with its series reference; the
Export button's logic saves the backend's SEG and SR and hands the folder to the database import.

The database is a stand-in with ctkDICOMDatabase's two calls the module uses (`fileForInstance(uid)`,
`fileValue(file, "gggg,eeee")`, multi-values joined by a backslash), answering from the real files with
pydicom; Slicer's own DICOM SEG exporter (QuantitativeReporting) and `DICOMUtils.importDicom` need a full Slicer
and are not run here."""
from __future__ import annotations

import random

import numpy as np
import pydicom
import pytest
from dicom_checks import assert_seg_lies_on_labelmap
from dicom_series_maker import chest_ct_series, rotation
from module_helpers import run_until
from test_backend_flow import run_to_end
from test_writers import add_volume, segment_array

pytestmark = [pytest.mark.slicer, pytest.mark.service]


class DicomDatabase:
    """ctkDICOMDatabase's fileForInstance / fileValue, over real files."""

    def __init__(self, files):
        self.files = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}

    def fileForInstance(self, uid: str) -> str:
        return self.files.get(uid, "")

    def fileValue(self, file: str, tag: str) -> str:
        group, element = (int(part, 16) for part in tag.split(","))
        item = pydicom.dcmread(file, stop_before_pixels=True).get((group, element))
        if item is None or item.value is None:
            return ""
        value = item.value
        return "\\".join(str(v) for v in value) if isinstance(value, (list, pydicom.multival.MultiValue)) else str(value)


@pytest.fixture(scope="module")
def loaded_series(chest_ct_path, tmp_path_factory):
    from citrusv_backend.volume.io import read_volume

    series = chest_ct_series(chest_ct_path, tmp_path_factory.mktemp("slicer-dicom") / "series",
                             direction=rotation(0.0, 12.0, 25.0))
    return series, read_volume(series.folder)


def test_reference_from_the_database_matches_slices_by_position(mrml_scene, loaded_series):
    from CitrusVSlicerLib.dicom_export import dicom_reference, is_from_dicom_database

    series, volume = loaded_series
    node = add_volume(mrml_scene, volume.voxels, volume.geometry.ijk_to_ras())
    assert not is_from_dicom_database(node) and dicom_reference(node, volume.geometry.ijk_to_ras(), None) is None
    shuffled = list(series.sop_uids)
    random.Random(3).shuffle(shuffled)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(shuffled))
    reference = dicom_reference(node, volume.geometry.ijk_to_ras(), DicomDatabase(series.files))
    assert reference["sop_instance_uids"] == series.sop_uids   # slice k's own instance, whatever the order
    assert reference["series_instance_uid"] == series.series_uid and reference["modality"] == "CT"
    assert set(reference["identity"]) <= {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                                          "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"}
    cropped = add_volume(mrml_scene, volume.voxels[1:], volume.geometry.ijk_to_ras())
    cropped.SetAttribute("DICOM.instanceUIDs", " ".join(series.sop_uids))
    assert dicom_reference(cropped, volume.geometry.ijk_to_ras(), DicomDatabase(series.files)) is None


def test_export_saves_the_backends_seg_and_sr_for_the_database(module_backend, mrml_scene, loaded_series, tmp_path):
    from CitrusVSlicerLib.dicom_export import DicomExportError, dicom_reference, export_result
    from CitrusVSlicerLib.runner import ApplyRunner
    from CitrusVSlicerLib.transport import Fetched, fetch_all
    from CitrusVSlicerLib.writers import volume_array_and_geometry, write_result

    series, volume = loaded_series
    node = add_volume(mrml_scene, volume.voxels, volume.geometry.ijk_to_ras())
    node.SetAttribute("DICOM.instanceUIDs", " ".join(series.sop_uids))
    array, ijk_to_ras = volume_array_and_geometry(node)
    reference = dicom_reference(node, ijk_to_ras, DicomDatabase(series.files))
    transport, target = module_backend.transport, module_backend.local_target()
    # The raw upload (handover) with the reference attached after it (PUT /v1/volumes/{id}/dicom).
    runner = ApplyRunner(transport, target, array, ijk_to_ras, "CT", "segment", "segment the left lung",
                         {"mode": "per-slice", "slice_range": [15, 18]}, dicom_reference=reference)
    runner.start()
    events = run_to_end(module_backend, runner)
    assert events[-1].kind == "done", events[-1].message
    result = events[-1].result
    written = write_result(mrml_scene, node, result)
    fetched = []
    fetch_all(transport, target, list(result.dicom["files"].values()), lambda bodies, error: fetched.append((bodies, error)))
    run_until(module_backend.poll, lambda: fetched, 60)
    bodies, error = fetched[0]
    assert error is None, error
    imported = []
    done = export_result(Fetched(bodies), result.dicom, tmp_path / "export", imported.append)
    assert imported == [str(tmp_path / "export")] and done["segmentation_exported_by"] == "backend"
    assert sorted(p.name for p in done["files"]) == ["citrusv_seg.dcm", "citrusv_sr.dcm"]
    seg = pydicom.dcmread(tmp_path / "export" / "citrusv_seg.dcm")
    in_scene = segment_array(written["segmentation"], written["segment_ids"][0], node).astype(np.uint8)
    assert in_scene.any()
    assert_seg_lies_on_labelmap(seg, series.files, in_scene, {1: 1})  # the SEG is what the scene shows
    sr = pydicom.dcmread(tmp_path / "export" / "citrusv_sr.dcm")
    assert sr.StudyInstanceUID == series.study_uid and sr.PatientID == seg.PatientID
    with pytest.raises(DicomExportError, match="not loaded from the DICOM database"):
        export_result(Fetched({}), None, tmp_path / "none", imported.append)
