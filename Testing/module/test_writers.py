"""The scene writers with real MRML (slicer-core): exact segment geometry, typed table, ROI bounds, .mrb."""
from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.slicer


def oblique_ijk_to_ras(spacing=(0.8, 1.3, 3.0), degrees=23.0, flips=(1, -1, 1), origin=(-40.0, 25.5, 118.0)):
    a = math.radians(degrees)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    axis_tilt = np.array([[1, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]])
    matrix = np.eye(4)
    matrix[:3, :3] = axis_tilt @ rotation @ np.diag(np.array(spacing) * np.array(flips))
    matrix[:3, 3] = origin
    return matrix


def add_volume(scene, voxels: np.ndarray, ijk_to_ras: np.ndarray, name="CT"):
    import slicer
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras[r, c])
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, voxels)
    node.CreateDefaultDisplayNodes()
    return node


def sorted_ras(mask: np.ndarray, ijk_to_ras: np.ndarray) -> list:
    kji = np.argwhere(mask)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return sorted(map(tuple, np.round((ijk1 @ ijk_to_ras.T)[:, :3], 4)))


def segment_array(segmentation_node, segment_id, volume_node) -> np.ndarray:
    import slicer

    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)


def test_volume_array_and_geometry_round_trip(mrml_scene):
    from CitrusVSlicerLib.writers import volume_array_and_geometry

    voxels = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    matrix = oblique_ijk_to_ras()
    volume = add_volume(mrml_scene, voxels, matrix)
    array, ijk_to_ras = volume_array_and_geometry(volume)
    assert np.array_equal(array, voxels) and np.allclose(ijk_to_ras, matrix)


@pytest.mark.parametrize("matrix", [oblique_ijk_to_ras(), oblique_ijk_to_ras(flips=(-1, -1, 1), degrees=-60),
                                    np.diag([0.5, 0.5, 5.0, 1.0])], ids=["oblique", "oblique-flipped", "anisotropic"])
def test_segments_land_on_exactly_their_voxels(mrml_scene, matrix):
    from CitrusVSlicerLib.results import SegmentMask
    from CitrusVSlicerLib.writers import write_segments

    shape = (12, 20, 16)
    volume = add_volume(mrml_scene, np.zeros(shape, np.int16), matrix)
    rng = np.random.default_rng(1)
    crop = rng.random((3, 5, 4)) > 0.4
    mask = SegmentMask(label=1, name="liver", color=(0.9, 0.6, 0.0), offset_kji=(4, 7, 9), crop=crop)
    node, ids = write_segments(mrml_scene, volume, [mask])
    written = segment_array(node, ids[0], volume)
    assert np.array_equal(written.astype(bool), mask.full_mask(shape))
    # The same voxel index means the same patient position in the segmentation's own geometry.
    import slicer

    labelmap = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(ids[0], labelmap)
    import vtk

    image_to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    as_numpy = np.array([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(as_numpy, matrix, atol=1e-6)
    segment = node.GetSegmentation().GetSegment(ids[0])
    entry = vtk.reference("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
    assert "SCT^10200004^Liver" in str(entry)
    assert segment.GetName() == "liver"


def test_existing_segments_are_never_overwritten_unless_asked(mrml_scene):
    from CitrusVSlicerLib.results import SegmentMask
    from CitrusVSlicerLib.writers import write_segments

    volume = add_volume(mrml_scene, np.zeros((4, 5, 6), np.int16), np.eye(4))
    first = SegmentMask(1, "lesion", (1, 0, 0), (0, 0, 0), np.ones((2, 2, 2), bool))
    second = SegmentMask(1, "lesion", (1, 0, 0), (2, 2, 2), np.ones((2, 2, 2), bool))
    node, _ = write_segments(mrml_scene, volume, [first])
    write_segments(mrml_scene, volume, [second], segmentation_node=node)
    names = [node.GetSegmentation().GetNthSegment(n).GetName() for n in range(node.GetSegmentation().GetNumberOfSegments())]
    assert names == ["lesion", "lesion (2)"]
    write_segments(mrml_scene, volume, [second], segmentation_node=node, replace_existing=True)
    names = [node.GetSegmentation().GetNthSegment(n).GetName() for n in range(node.GetSegmentation().GetNumberOfSegments())]
    assert sorted(names) == ["lesion", "lesion (2)"]
    replaced = node.GetSegmentation().GetSegmentIdBySegmentName("lesion")
    assert segment_array(node, replaced, volume)[2:4, 2:4, 2:4].all() and not segment_array(node, replaced, volume)[0, 0, 0]


def test_findings_table_columns_types_units_and_report(mrml_scene):
    import vtk

    from CitrusVSlicerLib.results import SceneResult
    from CitrusVSlicerLib.writers import FINDING_COLUMNS, REPORT_REFERENCE_ROLE, write_findings_table

    result = SceneResult(task="segment", prompt="segment the liver", findings=[
        {"finding": "liver", "location": "liver", "laterality": "right", "volume_ml": 1523.25, "long_axis_mm": 201.5,
         "short_axis_mm": 150.0, "mean_intensity": 55.5, "slice": 40, "segment": "liver"},
        {"finding": "nodule", "location": "lung", "laterality": "left", "volume_ml": None, "slice": None}],
        report_findings="A nodule in the left lung.", random_weights=True)
    table_node, report = write_findings_table(mrml_scene, result)
    table = table_node.GetTable()
    assert [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())] == [c[0] for c in FINDING_COLUMNS]
    assert isinstance(table.GetColumnByName("volume_ml"), vtk.vtkDoubleArray)
    assert isinstance(table.GetColumnByName("slice"), vtk.vtkIntArray)
    assert isinstance(table.GetColumnByName("finding"), vtk.vtkStringArray)
    assert table_node.GetColumnUnitLabel("volume_ml") == "mL" and table_node.GetColumnUnitLabel("long_axis_mm") == "mm"
    assert "RECIST" in table_node.GetColumnDescription("long_axis_mm")
    assert table.GetNumberOfRows() == 2
    assert table.GetColumnByName("volume_ml").GetValue(0) == 1523.25 and math.isnan(table.GetColumnByName("volume_ml").GetValue(1))
    assert table.GetColumnByName("laterality").GetValue(1) == "left" and table.GetColumnByName("slice").GetValue(1) == -1
    assert table_node.GetNodeReference(REPORT_REFERENCE_ROLE) is report
    assert "RANDOM WEIGHTS" in report.GetText() and "left lung" in report.GetText()


def test_an_experimental_report_says_so_in_the_scene(mrml_scene):
    from CitrusVSlicerLib.client import scene_result_from_payload
    from CitrusVSlicerLib.writers import write_findings_table

    note = "EXPERIMENTAL: Citrus-V's reports were trained and benchmarked on chest radiographs"
    payload = {"task": "report", "prompt": "", "labelmap": {"shape": [2, 3, 4]}, "segments": [], "findings": [],
               "boxes": [], "report": {"findings": "Clear lungs.", "impression": "Normal.", "experimental": note},
               "experimental": note, "problems": [], "random_weights": False}
    result = scene_result_from_payload(payload, (2, 3, 4))
    _, report = write_findings_table(mrml_scene, result)
    assert report.GetText().startswith(note) and "Clear lungs." in report.GetText()


def test_rois_at_the_right_ras_bounds(mrml_scene):
    from CitrusVSlicerLib.writers import write_boxes

    rois = write_boxes(mrml_scene, [{"label": "kidney", "ras_min": [-10.0, 20.0, 30.0], "ras_max": [14.0, 40.0, 36.0],
                                     "slices": [3, 5]}])
    bounds = [0.0] * 6
    rois[0].GetRASBounds(bounds)
    assert np.allclose(bounds, [-10, 14, 20, 40, 30, 36])
    assert rois[0].GetName() == "kidney"


def test_write_result_is_one_step_and_survives_mrb(mrml_scene, tmp_path):
    import slicer

    from CitrusVSlicerLib.results import SceneResult, SegmentMask
    from CitrusVSlicerLib.writers import write_result

    matrix = oblique_ijk_to_ras()
    volume = add_volume(mrml_scene, np.zeros((10, 12, 14), np.int16), matrix)
    crop = np.zeros((2, 3, 4), bool)
    crop[1, 1:, 2:] = True
    result = SceneResult(task="segment", prompt="segment the spleen",
                         segments=[SegmentMask(1, "spleen", (0.2, 0.4, 0.8), (5, 6, 7), crop, laterality="left")],
                         findings=[{"finding": "spleen", "volume_ml": 2.5, "slice": 6, "segment": "spleen"}],
                         boxes=[{"label": "spleen", "ras_min": [1, 2, 3], "ras_max": [4, 5, 6], "slices": [5, 6]}])
    written = write_result(mrml_scene, volume, result)
    assert written["segmentation"] is not None and written["table"] is not None and len(written["rois"]) == 1
    expected = result.segments[0].full_mask((10, 12, 14))
    path = tmp_path / "scene.mrb"
    assert mrml_scene.WriteToMRB(str(path))
    from mrml_setup import make_scene

    import zipfile

    # Slicer's ReadFromMRB needs the application's data I/O manager; unpack and load the .mrml as it does.
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "unpacked")
    restored = make_scene()
    restored.SetURL(str(next((tmp_path / "unpacked").rglob("*.mrml"))))
    assert restored.Connect()
    segmentation = restored.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    volume_back = restored.GetFirstNodeByName("CT")
    slicer.mrmlScene = restored
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("spleen")
    restored_mask = segment_array(segmentation, segment_id, volume_back).astype(bool)
    # A left-handed IJK->RAS comes back from NRRD with k reversed (same voxels, other indexing): compare positions.
    from CitrusVSlicerLib.geometry import ijk_to_ras_matrix

    assert restored_mask.sum() == expected.sum() == 4
    assert np.allclose(sorted_ras(restored_mask, ijk_to_ras_matrix(volume_back)), sorted_ras(expected, matrix), atol=1e-3)
    table = restored.GetFirstNodeByClass("vtkMRMLTableNode")
    assert table.GetTable().GetColumnByName("volume_ml").GetValue(0) == 2.5
    roi = restored.GetFirstNodeByClass("vtkMRMLMarkupsROINode")
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    assert np.allclose(bounds, [1, 4, 2, 5, 3, 6])


def test_results_are_placed_in_the_volumes_study(mrml_scene):
    import slicer

    from CitrusVSlicerLib.results import SceneResult, SegmentMask
    from CitrusVSlicerLib.writers import write_result

    volume = add_volume(mrml_scene, np.zeros((4, 5, 6), np.int16), np.eye(4))
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "CT chest")
    hierarchy.CreateItem(study, volume)
    result = SceneResult(task="segment", prompt="segment the liver", findings=[{"finding": "liver"}],
                         segments=[SegmentMask(1, "liver", (1, 0, 0), (0, 0, 0), np.ones((1, 2, 2), bool))],
                         boxes=[{"label": "liver", "ras_min": [0, 0, 0], "ras_max": [1, 1, 1], "slices": [0, 0]}])
    written = write_result(mrml_scene, volume, result)
    for node in (written["segmentation"], written["table"], written["report"], written["rois"][0]):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study, node.GetName()
