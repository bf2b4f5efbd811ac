"""What one run delivers, as the module writes and says it (real MRML through slicer-core, no backend process):
overlapping segments each with their own voxels, a findings row per target (found or not, with the reason), the
per-segment answer / key slice / score in the table, the segment tags and the panel's texts, and the key slice's
position for the "Jump to key slice" button."""
from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest

from test_writers import add_volume, oblique_ijk_to_ras, segment_array

pytestmark = pytest.mark.slicer

SHAPE = (10, 16, 14)
NOT_FOUND = "no slice whose mask logits show the target above the threshold"


def crop_entry(mask: np.ndarray, label: int) -> dict:
    found = np.argwhere(mask)
    low, high = found.min(axis=0), found.max(axis=0) + 1
    crop = mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]].astype(np.uint8) * label
    return {"offset": [int(v) for v in low], "shape": list(crop.shape), "dtype": "uint8", "encoding": "zlib+base64",
            "data": base64.b64encode(zlib.compress(crop.tobytes())).decode()}


def organ_and_lesion() -> tuple[np.ndarray, np.ndarray]:
    organ = np.zeros(SHAPE, bool)
    organ[2:8, 3:13, 2:12] = True
    lesion = np.zeros(SHAPE, bool)
    lesion[4:6, 6:9, 5:8] = True      # wholly inside the organ
    return organ, lesion


def payload(segments: list[dict], findings: list[dict], problems: list[str]) -> dict:
    return {"task": "segment", "prompt": "segment the liver, the liver lesion and the spleen", "random_weights": True,
            "labelmap": {"shape": list(SHAPE)}, "segments": segments, "findings": findings, "boxes": [],
            "report": None, "answer": None, "problems": problems, "settings": {"axis": "axial"}}


def liver_case() -> dict:
    organ, lesion = organ_and_lesion()
    segments = [
        {"label": 1, "name": "liver", "color": [220, 120, 80], "found": True, "answer": "It is [SEG].", "key_slice": 5,
         "score": 0.81, "measurements": {"volume_ml": 1.2}, "mask": crop_entry(organ, 1)},
        {"label": 2, "name": "liver lesion", "color": [250, 250, 20], "found": True, "answer": "Lesion [SEG].",
         "key_slice": 4, "score": 0.42, "measurements": {"volume_ml": 0.02}, "mask": crop_entry(lesion, 2)},
        {"label": 3, "name": "spleen", "color": [0, 0, 255], "found": False, "reason": NOT_FOUND, "mask": None,
         "answer": "", "key_slice": None, "score": None}]
    findings = [{"finding": "liver", "volume_ml": 1.2, "slice": 5, "segment": "liver"},
                {"finding": "liver lesion", "volume_ml": 0.02, "slice": 4, "segment": "liver lesion"},
                # the backend's own row for the target it did not find (its empty mask measured as 0 mL)
                {"finding": "spleen", "location": "spleen", "volume_ml": 0.0, "slice": None, "segment": "spleen"}]
    return payload(segments, findings, [f"spleen: not found ({NOT_FOUND})", "the window was chosen for the liver"])


def column(table, name: str) -> list:
    array = table.GetColumnByName(name)
    return [array.GetValue(row) for row in range(table.GetNumberOfRows())]


def test_a_lesion_inside_its_organ_keeps_all_its_voxels_and_every_target_has_a_row(mrml_scene):
    from CitrusVSlicerLib.client import scene_result_from_payload
    from CitrusVSlicerLib.key_slice import segment_evidence
    from CitrusVSlicerLib.writers import write_result

    volume = add_volume(mrml_scene, np.zeros(SHAPE, np.int16), oblique_ijk_to_ras())
    result = scene_result_from_payload(liver_case(), SHAPE)
    written = write_result(mrml_scene, volume, result)

    organ, lesion = organ_and_lesion()
    segmentation = written["segmentation"]
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2          # the spleen was not found: no segment
    liver = segment_array(segmentation, written["segment_ids"][0], volume).astype(bool)
    inner = segment_array(segmentation, written["segment_ids"][1], volume).astype(bool)
    assert np.array_equal(liver, organ) and np.array_equal(inner, lesion)   # overlap kept: 18 voxels in both
    assert int(inner.sum()) == 18 and (liver & inner).sum() == 18

    table = written["table"].GetTable()
    assert column(table, "finding") == ["liver", "liver lesion", "spleen"]
    assert column(table, "found") == ["yes", "yes", "no"]
    assert column(table, "reason") == ["", "", NOT_FOUND]
    assert column(table, "answer") == ["It is [SEG].", "Lesion [SEG].", ""]
    assert column(table, "slice") == [5, 4, -1]
    scores = column(table, "score")
    assert scores[:2] == [pytest.approx(0.81), pytest.approx(0.42)] and np.isnan(scores[2])
    assert np.isnan(column(table, "volume_ml")[2])                           # not found: never a volume

    evidence = segment_evidence(segmentation.GetSegmentation().GetSegment(written["segment_ids"][1]))
    assert evidence == {"answer": "Lesion [SEG].", "key_slice": 4, "score": pytest.approx(0.42), "axis": "axial"}
    # A segment written by the version that called the axis "plane" (tag CitrusV.Plane) still names its axis.
    from CitrusVSlicerLib.key_slice import AXIS_TAG, LEGACY_AXIS_TAG
    older = segmentation.GetSegmentation().GetSegment(written["segment_ids"][0])
    older.RemoveTag(AXIS_TAG)
    older.SetTag(LEGACY_AXIS_TAG, "coronal")
    assert segment_evidence(older)["axis"] == "coronal"

    report = written["report"].GetText()
    assert "- liver lesion: found (key slice 4, score 0.42, 0.02 mL). Answer: Lesion [SEG]." in report
    assert f"- spleen: NOT FOUND: {NOT_FOUND}" in report
    assert "PROBLEMS:\n- the window was chosen for the liver" in report
    assert report.count(NOT_FOUND) == 1                                      # the problem repeating it is not shown twice
    assert column(table, "location")[2] == "spleen"
    assert result.status_text == (f"Done: 2 segment(s), 2 finding(s) (liver, liver lesion). Not found: spleen: "
                                  f"{NOT_FOUND}. Problems: the window was chosen for the liver. "
                                  f"RANDOM TEST WEIGHTS: results are noise.")


def test_a_run_that_finds_nothing_says_why(mrml_scene):
    from CitrusVSlicerLib.client import scene_result_from_payload
    from CitrusVSlicerLib.writers import write_result

    volume = add_volume(mrml_scene, np.zeros(SHAPE, np.int16), np.eye(4))
    case = payload([{"label": 1, "name": "liver", "color": [1, 2, 3], "found": False, "reason": NOT_FOUND,
                     "mask": None}], [{"finding": "liver", "volume_ml": 0.0, "segment": "liver"}],
                   [f"liver: not found ({NOT_FOUND})"])
    result = scene_result_from_payload(case, SHAPE)
    assert result.found_nothing and not result.segments
    assert result.status_text == f"Nothing found: liver: {NOT_FOUND}. RANDOM TEST WEIGHTS: results are noise."
    written = write_result(mrml_scene, volume, result)
    assert written["segmentation"] is None
    table = written["table"].GetTable()
    assert column(table, "finding") == ["liver"] and column(table, "found") == ["no"]
    assert column(table, "reason") == [NOT_FOUND]
    assert f"- liver: NOT FOUND: {NOT_FOUND}" in written["report"].GetText()

    silent = scene_result_from_payload(payload([], [], []), SHAPE)
    assert silent.status_text.startswith("Nothing found (the backend gave no reason).")
    assert "NOTHING FOUND." in silent.report_text


def test_an_older_backends_empty_mask_is_reported_not_dropped():
    """A segment entry without a mask and without `found` (what the shared labelmap used to produce for a segment
    covered by an earlier one) is a missing target with a reason, not a silently absent one."""
    from CitrusVSlicerLib.client import scene_result_from_payload

    case = payload([{"label": 1, "name": "heart", "color": [1, 2, 3], "mask": None, "key_score": 0.3}], [], [])
    result = scene_result_from_payload(case, SHAPE)
    assert [(m.name, m.reason, m.score) for m in result.missing] == [("heart", "the backend sent no voxels for it", 0.3)]


@pytest.mark.parametrize("matrix", [oblique_ijk_to_ras(), oblique_ijk_to_ras(flips=(-1, -1, 1), degrees=-60),
                                    np.array([[0, 0, 2.0, 5], [1.5, 0, 0, -3], [0, -0.7, 0, 40], [0, 0, 0, 1]])],
                         ids=["oblique", "oblique-flipped", "permuted"])
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_key_slice_axis_is_the_backends_slicing_axis(matrix, axis):
    """The module's slice axis equals the one the backend's pipeline counts key slices along (orientation.py)."""
    from citrusv_backend.volume.input.io import Volume
    from citrusv_backend.volume.slices.orientation import model_orientation
    from CitrusVSlicerLib.key_slice import key_slice_position, slice_axis_ijk

    volume = Volume.from_ijk_to_ras(np.zeros(SHAPE, np.int16), matrix)
    backend_axis = 2 - model_orientation(volume.geometry.direction, axis).slice_axis    # numpy (k, j, i) -> ijk
    assert slice_axis_ijk(matrix, axis) == backend_axis
    position = key_slice_position(matrix, SHAPE, axis, 3)
    ijk = np.linalg.solve(matrix, np.r_[position, 1.0])[:3]
    assert ijk[backend_axis] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="outside the volume"):
        key_slice_position(matrix, SHAPE, axis, SHAPE[2 - backend_axis])


def test_jump_to_key_slice_moves_the_slice_views(mrml_scene):
    import slicer
    from CitrusVSlicerLib.client import scene_result_from_payload
    from CitrusVSlicerLib.key_slice import jump_to_key_slice
    from CitrusVSlicerLib.writers import write_result

    matrix = oblique_ijk_to_ras()
    volume = add_volume(mrml_scene, np.zeros(SHAPE, np.int16), matrix)
    written = write_result(mrml_scene, volume, scene_result_from_payload(liver_case(), SHAPE))
    red = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetOrientation("Axial")
    world = jump_to_key_slice(mrml_scene, volume, written["segmentation"], written["segment_ids"][1])
    ijk = np.linalg.solve(matrix, np.r_[world, 1.0])[:3]
    assert ijk[2] == pytest.approx(4.0)                                       # the lesion's key slice
    assert ijk[:2] == pytest.approx([6.0, 7.0])                               # centred on the lesion (i, j)
    slice_to_ras = red.GetSliceToRAS()
    assert [slice_to_ras.GetElement(r, 3) for r in range(3)] == pytest.approx(list(world))
    hand_drawn = written["segmentation"].GetSegmentation().AddEmptySegment("", "drawn")
    with pytest.raises(ValueError, match="has no key slice"):
        jump_to_key_slice(mrml_scene, volume, written["segmentation"], hand_drawn)
    assert isinstance(slicer.vtkMRMLSliceNode.CenteredJumpSlice, int)


@pytest.mark.service
def test_the_real_backends_not_found_reaches_the_table_and_the_panels_text(module_backend, mrml_scene):
    """A blank volume: the tiny model's masks are empty, so the backend reports the target not found with its reason;
    the module makes no segment, a table row with the reason, and says so in the status and answer texts."""
    from CitrusVSlicerLib.logic import ModuleLogic

    logic = ModuleLogic(module_backend, mrml_scene)
    volume = add_volume(mrml_scene, np.zeros((2, 32, 32), np.int16), np.eye(4))
    logic.startApply(module_backend.local_target(), volume, "segment", "segment the liver", {"mode": "per-slice"})
    ends = []
    logic.pollUntil(lambda: ends.extend(e for e in logic.applyEvents() if e.kind != "progress") or ends, 300, "Apply")
    assert ends[0].kind == "done", ends[0].message
    result, written = ends[0].result, ends[0].written
    assert written["segmentation"] is None and not result.segments
    assert [(m.name, m.reason) for m in result.missing] == [("liver", NOT_FOUND_BY_MASK)]
    assert result.status_text.startswith(f"Nothing found: liver: {NOT_FOUND_BY_MASK}.")
    table = written["table"].GetTable()
    assert column(table, "found") == ["no"] and column(table, "reason") == [NOT_FOUND_BY_MASK]
    assert np.isnan(column(table, "volume_ml")[0])
    assert f"- liver: NOT FOUND: {NOT_FOUND_BY_MASK}" in written["report"].GetText()


NOT_FOUND_BY_MASK = "no slice whose mask logits show the target"
