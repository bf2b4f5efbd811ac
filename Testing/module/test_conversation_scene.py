"""A conversation's answers in the scene (real MRML, slicer-core): segments and ROIs of a turn on its slice, tagged
with the turn; the history kept in the scene, saved in an .mrb and read back; the Markdown export's marks.

The job results here are the service's result shape (CONTRACTS.md, issue 23) written out by hand, so the scene side
is checked on its own, oblique and flipped volumes included; test_conversation_flow.py asks the real server.
"""
from __future__ import annotations

import base64
import zipfile
import zlib

import numpy as np
import pytest

from test_writers import add_volume, oblique_ijk_to_ras, segment_array

pytestmark = pytest.mark.slicer

SHAPE = (10, 12, 14)
MATRIX = oblique_ijk_to_ras(spacing=(1.4, 1.1, 2.5), degrees=-28.0, flips=(-1, 1, -1))


def crop_of(mask: np.ndarray) -> dict:
    found = np.argwhere(mask)
    low, high = found.min(axis=0), found.max(axis=0) + 1
    crop = np.ascontiguousarray(mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]], np.uint8)
    return {"offset": low.tolist(), "shape": list(crop.shape), "dtype": "uint8", "encoding": "zlib+base64",
            "data": base64.b64encode(zlib.compress(crop.tobytes())).decode()}


def answer_payload(turn: int, text: str, axis: str, index: int, mask: np.ndarray | None = None,
                   box: dict | None = None) -> dict:
    segments = []
    if mask is not None:
        segments.append({"label": 1, "name": "nodule", "color": [230, 80, 60], "mask": crop_of(mask), "found": True,
                         "answer": text, "key_slice": index, "score": 0.61, "turn": turn})
    return {"task": "ask", "conversation_id": "conv-1", "turn": turn,
            "answer": {"text": text, "slice": index, "axis": axis,
                       "window": {"center": -600.0, "width": 1500.0, "name": "lung"}},
            "segments": segments, "boxes": [dict(box, turn=turn)] if box else [],
            "labelmap": {"shape": list(SHAPE)}, "random_weights": True, "experimental": False,
            "model": "tiny-random", "problems": []}


def answer_into_scene(scene, volume, history, question, payload):
    from CitrusVSlicerLib.client import scene_result_from_payload
    from CitrusVSlicerLib.conversation import turn_record
    from CitrusVSlicerLib.conversation_scene import write_turn

    record = turn_record(question, payload, "conv-1", f"job-{payload['turn']}")
    return write_turn(scene, volume, history, scene_result_from_payload(payload, SHAPE), record)


def test_a_turns_segment_and_roi_on_its_slice_survive_an_mrb(mrml_scene, tmp_path):
    import slicer

    from CitrusVSlicerLib.conversation import Question, history_markdown
    from CitrusVSlicerLib.conversation_scene import (
        ANSWER_TAG, TURN_TAG, create_history, history_segmentation, history_volume, histories_of, read_history,
        turn_rois)
    from CitrusVSlicerLib.refinement.segment import JOB_TAG, segment_tag
    from CitrusVSlicerLib.view_slice import index_axis_of_slice_axis
    from CitrusVSlicerLib.geometry import ijk_to_ras_matrix

    volume = add_volume(mrml_scene, np.zeros(SHAPE, np.int16), MATRIX)
    history = create_history(mrml_scene, volume)
    parameters = mrml_scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CitrusVSlicer")
    parameters.SetNodeReferenceID("conversation", history.GetID())   # as the panel's parameter node keeps it
    axis = index_axis_of_slice_axis(MATRIX, "coronal")                   # j here: index 1 of (i, j, k)
    mask = np.zeros(SHAPE, bool)
    mask[3:6, 7, 4:9] = True                                        # on coronal slice j = 7
    box = {"label": "nodule", "ijk_min": [4, 7, 3], "ijk_max": [8, 7, 5]}      # inclusive voxels, one slice thick
    answers = [("what is on this slice?", "Lungs.", None, None),
               ("segment the nodule and box it", "It is [SEG] at [box].", mask, box),
               ("how large is it?", "About 2 cm.", None, None)]
    for turn, (prompt, text, turn_mask, turn_box) in enumerate(answers, start=1):
        question = Question(prompt, "coronal", 7, window="lung", view="Green")
        answer_into_scene(mrml_scene, volume, history, question, answer_payload(turn, text, "coronal", 7, turn_mask,
                                                                                turn_box))

    segmentation = history_segmentation(history)
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("nodule")
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert (segment_tag(segment, TURN_TAG), segment_tag(segment, JOB_TAG)) == ("2", "job-2")
    assert segment_tag(segment, ANSWER_TAG) == "It is [SEG] at [box]."
    assert np.array_equal(segment_array(segmentation, segment_id, volume).astype(bool), mask)
    [roi] = turn_rois(history, 2)
    assert turn_rois(history, 1) == [] and roi.GetName() == "Turn 2: nodule"
    # The ROI spans the asked slice, and only it, along the coronal axis (its corners in index space).
    corners = roi_corners_ijk(roi, MATRIX)
    assert np.allclose(corners.min(axis=0), np.array(box["ijk_min"]) - 0.5, atol=1e-6)   # on the voxels' borders
    assert np.allclose(corners.max(axis=0), np.array(box["ijk_max"]) + 0.5, atol=1e-6)
    assert corners[:, axis].min() < 7 < corners[:, axis].max() and corners[:, axis].max() - corners[:, axis].min() == \
        pytest.approx(1.0)
    turns = read_history(history)["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and turns[1]["segments"][0]["segment_name"] == "nodule"
    assert all(t["random_weights"] and (t["axis"], t["slice"], t["window"]) == ("coronal", 7, "lung") for t in turns)

    path = tmp_path / "scene.mrb"
    assert mrml_scene.WriteToMRB(str(path))
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "unpacked")
    from mrml_setup import make_scene

    restored = make_scene()
    restored.SetURL(str(next((tmp_path / "unpacked").rglob("*.mrml"))))
    assert restored.Connect()
    slicer.mrmlScene = restored
    parameters_back = restored.GetFirstNodeByName("CitrusVSlicer")
    history_back = parameters_back.GetNodeReference("conversation")
    volume_back = history_volume(history_back)
    assert volume_back is not None and histories_of(restored, volume_back) == [history_back]
    assert read_history(history_back) == read_history(history)
    segmentation_back = history_segmentation(history_back)
    segment_back = segmentation_back.GetSegmentation().GetSegment(
        segmentation_back.GetSegmentation().GetSegmentIdBySegmentName("nodule"))
    assert segment_tag(segment_back, TURN_TAG) == "2"
    mask_back = segment_array(segmentation_back, segmentation_back.GetSegmentation().GetSegmentIdBySegmentName("nodule"),
                              volume_back).astype(bool)
    # A left-handed grid may come back from NRRD with an axis reversed: compare patient positions.
    assert sorted_positions(mask_back, ijk_to_ras_matrix(volume_back)) == sorted_positions(mask, MATRIX)
    [roi_back] = turn_rois(history_back, 2)
    assert np.allclose(roi_corners_world(roi_back), roi_corners_world(roi), atol=1e-4)
    markdown = history_markdown(read_history(history_back), volume_back.GetName())
    assert "RANDOM WEIGHTS" in markdown and "## Turn 2: segment the nodule and box it" in markdown
    assert "coronal slice 7, window lung (-600/1500)" in markdown and "Turn 2: nodule" in markdown


def test_a_segment_not_found_says_why_and_the_experimental_mark_is_kept(mrml_scene):
    from CitrusVSlicerLib.conversation import Question, history_markdown, turn_details
    from CitrusVSlicerLib.conversation_scene import create_history, history_segmentation, read_history

    volume = add_volume(mrml_scene, np.zeros(SHAPE, np.int16), MATRIX)
    history = create_history(mrml_scene, volume)
    payload = answer_payload(1, "No [SEG] visible.", "axial", 4)
    payload["segments"] = [{"label": 1, "name": "nodule", "color": [1, 2, 3], "mask": None, "found": False,
                            "reason": "the model's mask was empty on slice 4", "turn": 1}]
    payload["experimental"] = True
    payload["experimental_note"] = "EXPERIMENTAL: Citrus-V's reports were trained on chest radiographs only."
    payload["random_weights"] = False
    written = answer_into_scene(mrml_scene, volume, history, Question("segment the nodule", "axial", 4), payload)
    assert written["segmentation"] is None and history_segmentation(history) is None
    [turn] = read_history(history)["turns"]
    details = turn_details(turn)
    assert "Segment 'nodule' not made: the model's mask was empty on slice 4" in details
    assert "EXPERIMENTAL: Citrus-V's reports" in details and "RANDOM WEIGHTS" not in details
    assert "EXPERIMENTAL" in history_markdown(read_history(history), "CT")


def sorted_positions(mask: np.ndarray, ijk_to_ras: np.ndarray) -> list:
    kji = np.argwhere(mask)
    return sorted(map(tuple, np.round((np.c_[kji[:, ::-1], np.ones(len(kji))] @ ijk_to_ras.T)[:, :3], 3)))


def roi_corners_world(roi) -> np.ndarray:
    from CitrusVSlicerLib.refinement.segment import node_to_world

    size = np.array(roi.GetSize(), float)
    matrix = roi.GetObjectToNodeMatrix()
    object_to_node = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    signs = np.array(list(np.ndindex(2, 2, 2))) * 2 - 1
    return node_to_world(roi, (np.c_[signs * size / 2, np.ones(8)] @ object_to_node.T)[:, :3])


def roi_corners_ijk(roi, ijk_to_ras: np.ndarray) -> np.ndarray:
    world = roi_corners_world(roi)
    return (np.c_[world, np.ones(len(world))] @ np.linalg.inv(ijk_to_ras).T)[:, :3]


def test_a_history_saved_before_the_axis_rename_reads_its_turns_axis(mrml_scene):
    """Scenes saved by the version that called the slice axis "plane" keep working: turns read with "axis"."""
    import json

    from CitrusVSlicerLib.conversation_scene import create_history, propagation_question, read_history, save_history

    volume = add_volume(mrml_scene, np.zeros(SHAPE, np.int16), MATRIX)
    node = create_history(mrml_scene, volume)
    history = read_history(node)
    history["turns"].append({"turn": 1, "prompt": "where?", "plane": "coronal", "slice": 7, "window": "lung",
                             "question": {"prompt": "where?", "plane": "coronal", "slice": 7}})
    node.SetText(json.dumps(history))
    turn = read_history(node)["turns"][0]
    assert (turn["axis"], turn["question"]["axis"]) == ("coronal", "coronal") and "plane" not in turn
    assert (propagation_question(turn).axis, propagation_question(turn).slice) == ("coronal", 7)
    save_history(node, read_history(node))
    assert '"plane"' not in node.GetText()
