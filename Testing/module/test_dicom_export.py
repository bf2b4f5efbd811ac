"""The module's DICOM path with real MRML and the real backend: a volume node loaded from a DICOM database
(the slicerio chest CT written as a scanner's series, oblique) is uploaded with its series reference; the
Export button's logic (scene_export.py) sends the segments as they are in the scene, edits included, gets the
backend's SEG and SR and hands the folder to the database import — or refuses, saying why.

The database is a stand-in with ctkDICOMDatabase's two calls the module uses (`fileForInstance(uid)`,
`fileValue(file, "gggg,eeee")`, multi-values joined by a backslash), answering from the real files with
pydicom; Slicer's own DICOM SEG exporter (QuantitativeReporting) and `DICOMUtils.importDicom` need a full Slicer
and are not run here."""
from __future__ import annotations

import random

import numpy as np
import pydicom
import pytest
from dicom_series_maker import chest_ct_series, rotation
from test_writers import add_volume

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
    from citrusv_backend.volume.input.io import read_volume

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


def frame_masks(seg, source_files, shape) -> dict[int, np.ndarray]:
    """SEG segment number -> its voxels on the source series' grid (k, j, i), read with pydicom."""
    from dicom_checks import frames_by_segment

    slice_of = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): k for k, f in enumerate(source_files)}
    masks = {}
    for number, frames in frames_by_segment(seg).items():
        mask = np.zeros(shape, bool)
        for uid, _, pixels in frames:
            mask[slice_of[uid]] |= pixels.astype(bool)
        masks[number] = mask
    return masks


def sr_volumes(sr_bytes: bytes, seg) -> list[float]:
    """The SR's "Volume" per measurement group, after checking each group references the SEG's segment."""
    import io

    import highdicom as hd

    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.referenced_segment.referenced_segment_numbers for g in groups] == [[s.SegmentNumber]
                                                                                 for s in seg.SegmentSequence]
    assert {g.referenced_segment.referenced_sop_instance_uid for g in groups} == {seg.SOPInstanceUID}
    assert [g.tracking_uid for g in groups] == [s.TrackingUID for s in seg.SegmentSequence]
    return [next(m.value for m in g.get_measurements() if m.name.meaning == "Volume") for g in groups]


@pytest.fixture
def dicom_logic(module_backend, mrml_scene, loaded_series):
    """The module's logic on a scene with the series loaded as Slicer's DICOM reader loads it."""
    from CitrusVSlicerLib.logic import ModuleLogic

    series, volume = loaded_series
    logic = ModuleLogic(module_backend, mrml_scene, dicom_database=lambda: DicomDatabase(series.files))
    node = add_volume(mrml_scene, volume.voxels, volume.geometry.ijk_to_ras())
    node.SetAttribute("DICOM.instanceUIDs", " ".join(series.sop_uids))
    return logic, node


def export(logic, volume_node, segmentation_node, directory, target=None):
    """The Export button's logic, driven by polling as the panel's timer drives it: (done, error, imported)."""
    ends, imported = [], []
    logic.startDicomExport(target or logic.backend.local_target(), volume_node, segmentation_node, directory,
                           imported.append, lambda done, error: ends.append((done, error)))
    logic.pollUntil(lambda: ends, 120, "the export")
    return ends[0] + (imported,)


@pytest.mark.slow
def test_an_edited_segment_is_exported_as_it_is_in_the_scene(dicom_logic, loaded_series, tmp_path):
    """Two overlapping targets from the real backend, the heart then cut down by hand: the SEG holds each segment's
    voxels as the scene shows them and the SR's volumes are those voxels' (with or without QuantitativeReporting)."""
    from CitrusVSlicerLib.refinement.segment import read_segment, write_segment
    from CitrusVSlicerLib.scene_export import export_summary

    logic, node = dicom_logic
    series, volume = loaded_series
    written = logic.process(node, "segment", "segment the left lung and the heart",
                            {"mode": "per-slice", "slice_range": [15, 18]}, timeout=300)
    segmentation, (lung_id, heart_id) = written["segmentation"], written["segment_ids"]
    lung, heart = (read_segment(segmentation, i, node) for i in (lung_id, heart_id))
    assert lung.any() and (lung & heart).any(), "the tiny model's masks do not overlap: nothing tested"
    # Each target's own voxels in the scene, the backend's evidence in the table (a row per target).
    table = written["table"].GetTable()
    rows = [{name: table.GetColumnByName(name).GetValue(row) for name in ("finding", "found", "answer", "slice", "score")}
            for row in range(table.GetNumberOfRows())]
    assert [(r["finding"], r["found"]) for r in rows] == [("left lung", "yes"), ("heart", "yes")]
    assert all(r["answer"] and 15 <= r["slice"] < 18 and np.isfinite(r["score"]) for r in rows)
    table_volumes = [table.GetColumnByName("volume_ml").GetValue(row) for row in range(2)]
    print(f"\nscene voxels: left lung {int(lung.sum())}, heart {int(heart.sum())}, both {int((lung & heart).sum())}; "
          f"table volume_ml {table_volumes}")

    done, error, imported = export(logic, node, segmentation, tmp_path / "as-delivered")
    assert error is None, error
    assert done["edited"] is False and imported == [str(tmp_path / "as-delivered")]
    assert [s["voxel_count"] for s in done["segments"]] == [int(lung.sum()), int(heart.sum())]

    edited = heart.copy()
    edited[: int(np.nonzero(heart)[0].max())] = False                 # keep only the heart's last slice
    write_segment(segmentation, heart_id, node, edited)                # as a Segment Editor erase writes it
    segmentation.GetSegmentation().AddEmptySegment("", "cleared")      # an empty segment is left out, and named
    done, error, imported = export(logic, node, segmentation, tmp_path / "edited")
    assert error is None, error
    assert done["edited"] is True and done["empty"] == ["cleared"] and done["problems"] == []
    assert export_summary(done) == ("Exported 2 DICOM file(s) into the DICOM database: the segments as they are in "
                                    "the scene (left lung, heart), edited since the model delivered them. Empty "
                                    "segments left out: cleared.")
    assert sorted(p.name for p in done["files"]) == ["citrusv_seg.dcm", "citrusv_sr.dcm"]
    seg = pydicom.dcmread(tmp_path / "edited" / "citrusv_seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left lung", "heart"]
    masks = frame_masks(seg, series.files, volume.shape)
    assert np.array_equal(masks[1], lung) and np.array_equal(masks[2], edited)      # overlap and edit both kept
    assert int(edited.sum()) < int(heart.sum())
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    volumes = sr_volumes((tmp_path / "edited" / "citrusv_sr.dcm").read_bytes(), seg)
    assert volumes == pytest.approx([lung.sum() * voxel_ml, edited.sum() * voxel_ml], rel=1e-6)
    assert [s["volume_ml"] for s in done["segments"]] == pytest.approx(volumes, rel=1e-6)
    print(f"edited heart {int(edited.sum())} voxels; SEG frames: left lung {int(masks[1].sum())}, heart "
          f"{int(masks[2].sum())}; SR volumes {volumes} mL; backend {done['segments']}")
    sr = pydicom.dcmread(tmp_path / "edited" / "citrusv_sr.dcm")
    assert sr.StudyInstanceUID == series.study_uid and sr.PatientID == seg.PatientID


def test_an_export_that_cannot_describe_the_scene_refuses_and_says_why(dicom_logic, loaded_series, mrml_scene, tmp_path):
    import slicer
    from CitrusVSlicerLib.upload import UploadCache
    from CitrusVSlicerLib.dicom_export import DicomExportError
    from CitrusVSlicerLib.endpoints import Target
    from CitrusVSlicerLib.results import SegmentMask
    from CitrusVSlicerLib.scene_export import scene_segments
    from CitrusVSlicerLib.geometry import ijk_to_ras_matrix
    from CitrusVSlicerLib.writers import write_segments

    logic, node = dicom_logic
    series, volume = loaded_series
    mask = SegmentMask(1, "nodule", (1, 0, 0), (16, 40, 50), np.ones((2, 6, 5), bool))
    segmentation, _ = write_segments(mrml_scene, node, [mask])

    # A volume that did not come from the DICOM database: no series for a SEG to reference.
    plain = add_volume(mrml_scene, volume.voxels, volume.geometry.ijk_to_ras(), name="plain")
    plain_segmentation, _ = write_segments(mrml_scene, plain, [mask])
    done, error, imported = export(logic, plain, plain_segmentation, tmp_path / "plain")
    assert done is None and imported == [] and not (tmp_path / "plain").exists()
    assert "'plain' was not loaded from Slicer's DICOM database" in str(error)

    # Segments off the volume's grid: a segmentation under another transform; one whose geometry is oversampled.
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    done, error, _ = export(logic, node, segmentation, tmp_path / "moved")
    assert done is None and "are under different transforms" in str(error)
    segmentation.SetAndObserveTransformNodeID(None)
    finer = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    geometry = slicer.vtkOrientedImageData()
    geometry.SetExtent(0, 2 * volume.shape[2] - 1, 0, 2 * volume.shape[1] - 1, 0, volume.shape[0] - 1)
    matrix = ijk_to_ras_matrix(node) @ np.diag([0.5, 0.5, 1.0, 1.0])
    finer.SetReferenceImageGeometryParameterFromVolumeNode(node)
    finer.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(_vtk_matrix(matrix), geometry))
    segment_id = finer.GetSegmentation().AddEmptySegment("", "drawn")
    image = slicer.vtkOrientedImageData()
    image.SetExtent(10, 13, 10, 13, 16, 17)
    image.AllocateScalars(3, 1)  # VTK_UNSIGNED_CHAR
    image.GetPointData().GetScalars().Fill(1)
    image.SetImageToWorldMatrix(_vtk_matrix(matrix))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, finer, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
    with pytest.raises(DicomExportError, match="'drawn' is not on the voxel grid of 'CT'"):
        scene_segments(finer, node)

    # Nothing to export.
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    empty.SetReferenceImageGeometryParameterFromVolumeNode(node)
    empty.GetSegmentation().AddEmptySegment("", "cleared")
    done, error, _ = export(logic, node, empty, tmp_path / "empty")
    assert done is None and "has no segment with voxels" in str(error)

    # A backend without the endpoint (an older one): the real server answering a route it does not have.
    local = logic.backend.local_target()
    older = Target(local.url + "/older-backend", local.token, handover_dir=local.handover_dir)
    _, error, _ = export(logic, node, segmentation, tmp_path / "warm")     # uploads the volume for this content
    assert error is None, error
    volume_id = logic.backend.uploads.get(UploadCache.key(local, node, ijk_to_ras_matrix(node), True))
    logic.backend.uploads.remember(UploadCache.key(older, node, ijk_to_ras_matrix(node), True), volume_id)
    done, error, imported = export(logic, node, segmentation, tmp_path / "older", target=older)
    assert done is None and imported == []
    assert "cannot export edited segments (it has no POST /v1/volumes/{id}/dicom-export: update the backend)" \
        in str(error)


def _vtk_matrix(array):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix
