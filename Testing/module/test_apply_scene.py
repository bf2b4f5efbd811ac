"""What an Apply writes into the scene: the nodes captured when it started, nothing after the scene closed, display
nodes, findings tables kept per run, oriented boxes, Slicer's terminology."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from module_helpers import run_until
from test_writers import add_volume, oblique_ijk_to_ras, segment_array

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "CitrusVSlicer"


# ---------------------------------------------------------------------------------------------- captured nodes, scene close

@pytest.mark.slicer
@pytest.mark.service
def test_the_result_goes_to_the_nodes_captured_at_apply(module_backend, mrml_scene, chest_ct_path):
    from citrusv_backend.volume.input.io import read_volume
    from CitrusVSlicerLib.apply import SceneApply

    voxels = read_volume(chest_ct_path).voxels[12:20].copy()
    first = add_volume(mrml_scene, voxels, oblique_ijk_to_ras(spacing=(2.5, 2.2, 7.5), degrees=17.0), name="first")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen output")
    table = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "chosen table")
    apply = SceneApply(mrml_scene, module_backend.transport, module_backend.local_target(), first, "segment",
                       "segment the left lung", {"mode": "per-slice", "slice_range": [3, 5], "window": "lung"},
                       output, table)
    apply.start()
    # Meanwhile the user loads and selects another volume, and deletes the table chosen for the results.
    add_volume(mrml_scene, voxels[:, ::2, ::2].copy(), np.diag([5.0, 5.0, 5.0, 1.0]), name="second")
    mrml_scene.RemoveNode(table)
    events = []
    run_until(lambda: (module_backend.poll(), apply.poll(), events.extend(apply.events())), lambda: not apply.active, 300)
    events.extend(apply.events())
    done = events[-1]
    assert done.kind == "done", done.message
    written = done.written
    assert written["segmentation"] is output
    import slicer
    import vtk

    labelmap = slicer.vtkOrientedImageData()
    output.GetBinaryLabelmapRepresentation(written["segment_ids"][0], labelmap)
    image_to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    geometry = np.array([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(geometry, oblique_ijk_to_ras(spacing=(2.5, 2.2, 7.5), degrees=17.0), atol=1e-6)  # the first's
    mask = segment_array(output, written["segment_ids"][0], first)
    assert mask.shape == voxels.shape and mask[3:5].any() and not mask[:3].any()
    assert written["table"] is not table and mrml_scene.IsNodePresent(written["table"])


@pytest.mark.slicer
@pytest.mark.service
def test_closing_the_scene_cancels_the_job_and_writes_nothing(module_backend, mrml_scene, chest_ct_path):
    from citrusv_backend.volume.input.io import read_volume
    from CitrusVSlicerLib.apply import SceneApply

    volume = read_volume(chest_ct_path)
    node = add_volume(mrml_scene, volume.voxels.copy(), volume.geometry.ijk_to_ras())
    apply = SceneApply(mrml_scene, module_backend.transport, module_backend.local_target(), node, "segment",
                       "segment the left lung", {"mode": "per-slice"})
    apply.start()
    seen = []
    run_until(lambda: (module_backend.poll(), apply.poll(), seen.extend(apply.events())),
              lambda: any(e.kind == "progress" and e.stage.startswith("per-slice") for e in seen), 120)
    mrml_scene.Clear(0)  # File > Close scene
    run_until(lambda: (module_backend.poll(), apply.poll(), seen.extend(apply.events())), lambda: not apply.active, 60)
    seen.extend(apply.events())
    assert seen[-1].kind == "cancelled"
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    status = module_backend.transport.request(module_backend.local_target(), "GET", f"/v1/jobs/{apply.runner.job_id}")
    run_until(module_backend.poll, lambda: status.done, 30)
    assert status.json()["status"] == "cancelled"


# ---------------------------------------------------------------------------------------------- display nodes

@pytest.mark.slicer
def test_a_segmentation_made_by_the_selector_gets_a_display_node(mrml_scene):
    from CitrusVSlicerLib.results import SegmentMask
    from CitrusVSlicerLib.writers import write_segments

    volume = add_volume(mrml_scene, np.zeros((4, 6, 6), np.int16), np.eye(4))
    # What qMRMLNodeComboBox's "Create new" makes: a bare node (qMRMLNodeFactory::createNode adds no display node).
    created = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    assert created.GetDisplayNode() is None
    write_segments(mrml_scene, volume, [SegmentMask(1, "liver", (1, 0, 0), (0, 0, 0), np.ones((2, 2, 2), bool))], created)
    assert created.GetDisplayNode() is not None and created.GetDisplayNode().GetVisibility()


# ---------------------------------------------------------------------------------------------- tables, boxes, terminology

@pytest.mark.slicer
def test_a_reused_findings_table_keeps_its_rows_and_each_run_has_its_report(mrml_scene):
    from CitrusVSlicerLib.results import SceneResult
    from CitrusVSlicerLib.writers import REPORT_REFERENCE_ROLE, write_findings_table

    first = SceneResult(task="segment", prompt="segment the liver", findings=[{"finding": "liver", "volume_ml": 1500.0}],
                        report_findings="Liver normal.")
    second = SceneResult(task="detect", prompt="find nodules", findings=[{"finding": "nodule", "volume_ml": 0.4},
                                                                         {"finding": "nodule", "volume_ml": 0.2}],
                         report_findings="Two nodules.")
    table, report_one = write_findings_table(mrml_scene, first)
    same, report_two = write_findings_table(mrml_scene, second, table)
    assert same is table
    rows = table.GetTable()
    assert rows.GetNumberOfRows() == 3
    assert [rows.GetColumnByName("finding").GetValue(r) for r in range(3)] == ["liver", "nodule", "nodule"]
    assert [rows.GetColumnByName("run").GetValue(r) for r in range(3)] == [1, 2, 2]
    assert [rows.GetColumnByName("report").GetValue(r) for r in range(3)] == [report_one.GetName()] + [report_two.GetName()] * 2
    assert [table.GetNthNodeReference(REPORT_REFERENCE_ROLE, n) for n in range(2)] == [report_one, report_two]
    assert "Liver normal." in report_one.GetText() and "Two nodules." in report_two.GetText()
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLTextNode") == 2


@pytest.mark.slicer
def test_boxes_of_oblique_volumes_are_oriented_rois_under_the_volumes_transform(mrml_scene):
    import vtk

    from CitrusVSlicerLib.geometry import ijk_to_ras_matrix
    from CitrusVSlicerLib.writers import write_boxes

    matrix = oblique_ijk_to_ras(spacing=(0.8, 1.3, 3.0), degrees=23.0, flips=(1, -1, 1))
    volume = add_volume(mrml_scene, np.zeros((10, 20, 16), np.int16), matrix)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    box = {"label": "nodule", "slices": [3, 6], "index_min_kji": [2.5, 4.5, 3.5], "index_max_kji": [6.5, 9.5, 8.5],
           "ras_min": [0, 0, 0], "ras_max": [1, 1, 1]}
    roi = write_boxes(mrml_scene, [box], volume)[0]
    assert roi.GetParentTransformNode() is transform
    ijk_to_ras = ijk_to_ras_matrix(volume)
    low, high = np.array(box["index_min_kji"])[::-1], np.array(box["index_max_kji"])[::-1]
    corners_ijk = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    expected = (corners_ijk @ ijk_to_ras.T)[:, :3]
    object_to_node = roi.GetObjectToNodeMatrix()
    object_to_node = np.array([[object_to_node.GetElement(r, c) for c in range(4)] for r in range(4)])
    half = np.array(roi.GetSize()) / 2
    corners_roi = np.array([(object_to_node @ np.r_[sx * half[0], sy * half[1], sz * half[2], 1.0])[:3]
                            for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    assert np.allclose(sorted(map(tuple, np.round(corners_roi, 6))), sorted(map(tuple, np.round(expected, 6))), atol=1e-6)


@pytest.mark.unit
def test_terminology_uses_slicers_anatomy_list_with_laterality_modifiers():
    from CitrusVSlicerLib.terminology import CONTEXT, TYPES, terminology_entry

    listed = json.loads((Path(__file__).parent / "data" / "slicer-general-anatomy-structures.json").read_text())
    codes = {t["code"]: t for t in listed["types"]}
    assert CONTEXT == listed["context"]
    for name, (code, meaning, sided) in TYPES.items():
        assert code in codes, f"{name}: SCT {code} is not in Slicer's General Anatomy list"
        assert codes[code]["meaning"] == meaning
        assert sided == bool(codes[code]["modifiers"]), f"{name}: Slicer's list {'has' if sided else 'has no'} modifiers"
    left_lung = terminology_entry("Left lung")
    assert left_lung.split("~")[1:4] == ["SCT^123037004^Anatomical Structure", "SCT^39607008^Lung", "SCT^7771000^Left"]
    assert ["SCT", "7771000", "Left"] in codes["39607008"]["modifiers"]
    assert terminology_entry("kidney", laterality="right").split("~")[2:4] == ["SCT^64033007^Kidney", "SCT^24028007^Right"]
    assert terminology_entry("liver", laterality="right").split("~")[3] == "^^"   # the list gives the liver no side
    assert terminology_entry("urinary bladder").split("~")[2] == "SCT^89837001^Bladder"
    assert terminology_entry("the lesion") is None
    assert "44029006" not in (MODULE_DIR / "CitrusVSlicerLib" / "terminology.py").read_text()
    # The backend codes its DICOM SEG from DICOM's own context groups: the same SNOMED codes for the same names.
    from citrusv_backend.volume.outputs.terminology import segment_codes

    for name, (code, _, sided) in TYPES.items():
        coded = segment_codes(("left " if sided else "") + name)
        if coded.type.value != "85756007":  # names DICOM's groups do not hold fall back to Tissue there
            assert coded.type.value == code, f"{name}: the DICOM SEG says {coded.type}, the scene SCT {code}"
        if sided:
            assert coded.modifier is not None and coded.modifier.value == "7771000"
