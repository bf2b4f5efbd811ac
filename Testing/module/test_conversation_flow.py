"""A 3-turn conversation driven from the module's library (ModuleLogic.ask, as the panel's Ask button does) against
the real backend process (tiny checkpoint, 127.0.0.1), on real CT voxels with an oblique, flipped grid in a real
MRML scene: scripted answers force a [SEG] and a box in turn 2; its segment and ROI lie on the asked slice; the
history is saved with the scene in an .mrb, read back, continued on the server, and exported as Markdown.
"""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from test_conversation_scene import roi_corners_ijk
from test_conversation_views import slice_view
from test_refine_panel import logic  # noqa: F401  (the fixture: ModuleLogic on the real backend, its own uploads)
from test_writers import add_volume, oblique_ijk_to_ras, segment_array

pytestmark = [pytest.mark.slicer, pytest.mark.service, pytest.mark.slow]

BOX_ANSWER = 'It is [SEG].\n```json\n[{"bbox_2d": [30, 24, 70, 60], "label": "nodule"}]\n```'


def test_three_turns_segment_and_roi_on_the_asked_slice_history_saved_and_reloaded(logic, mrml_scene, chest_ct_path,
                                                                                     tmp_path):
    import slicer

    from citrusv_backend.volume.input.io import read_volume
    from CitrusVSlicerLib.conversation import history_markdown
    from CitrusVSlicerLib.conversation_scene import (
        TURN_TAG, create_history, history_segmentation, history_volume, jump_to_turn, propagation_question,
        question_for, read_history, slice_node_of, turn_rois, view_slice_of)
    from CitrusVSlicerLib.refinement.segment import segment_tag
    from CitrusVSlicerLib.view_slice import index_axis_of_slice_axis, slice_centre_ras

    voxels = read_volume(chest_ct_path).voxels[12:22].copy()           # real CT values, 10 axial slices
    matrix = oblique_ijk_to_ras(spacing=(3.0, 3.0, 10.0), degrees=21.0, flips=(-1, 1, -1))
    volume = add_volume(mrml_scene, voxels, matrix)
    red, _ = slice_view(mrml_scene, volume, "Red")
    red.SetOrientationToAxial()
    red.RotateToVolumePlane(volume)
    history = create_history(mrml_scene, volume)
    asked = []

    def ask(slice_index: int, prompt: str, answer: str) -> dict:
        red.JumpSliceByCentering(*slice_centre_ras(matrix, voxels.shape, "axial", slice_index))
        question = question_for(mrml_scene, volume, "Red", prompt, "lung")
        assert (question.axis, question.slice) == ("axial", slice_index)
        question.answer = answer
        asked.append(question)
        return logic.ask(volume, history, question, timeout=300)

    ask(3, "What is on this slice?", "Both lungs and the heart.")
    written = ask(6, "Segment the nodule and box it.", BOX_ANSWER)
    ask(6, "How large is it?", "About two centimetres.")

    turns = read_history(history)["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert len({t["conversation_id"] for t in turns}) == 1 and not any(t["context_reset"] for t in turns)
    assert [(t["axis"], t["slice"], t["window"]) for t in turns] == [("axial", 3, "lung"), ("axial", 6, "lung"),
                                                                      ("axial", 6, "lung")]
    assert all(t["random_weights"] and t["model"] for t in turns)
    assert turns[1]["answer"] == BOX_ANSWER and turns[2]["answer"] == "About two centimetres."
    assert not turns[0]["segments"] and not turns[0]["boxes"] and not turns[2]["boxes"]
    assert logic.watch.ticks > 0 and logic.watch.new == set(), "Python threads on Slicer's side"

    # Turn 2's segment: tagged with its turn, on slice 6 of the axial axis only.
    axis_kji = 2 - index_axis_of_slice_axis(matrix, "axial")
    segmentation = history_segmentation(history)
    assert written["segmentation"] is segmentation and len(written["segment_ids"]) == 1
    segment = segmentation.GetSegmentation().GetSegment(written["segment_ids"][0])
    assert segment_tag(segment, TURN_TAG) == "2"
    mask = segment_array(segmentation, written["segment_ids"][0], volume).astype(bool)
    assert mask.any(), turns[1]["segments"]
    assert set(np.nonzero(mask)[axis_kji].tolist()) == {6}
    # Turn 2's box: one ROI, one slice thick, around slice 6 (its corners on that slice's borders).
    [roi] = turn_rois(history, 2)
    [box] = turns[1]["boxes"]
    assert box["ijk_min"][2 - axis_kji] == box["ijk_max"][2 - axis_kji] == 6
    corners = roi_corners_ijk(roi, matrix)
    assert np.allclose([corners[:, 2 - axis_kji].min(), corners[:, 2 - axis_kji].max()], [5.5, 6.5], atol=1e-6)

    # Saved with the scene, read back: the same history, segment and ROI; selecting turn 1 jumps the view back.
    path = tmp_path / "conversation.mrb"
    assert mrml_scene.WriteToMRB(str(path))
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "unpacked")
    from mrml_setup import make_scene

    restored = make_scene()
    restored.SetURL(str(next((tmp_path / "unpacked").rglob("*.mrml"))))
    assert restored.Connect()
    slicer.mrmlScene = restored
    history_back = restored.GetFirstNodeByName(history.GetName())
    assert read_history(history_back) == read_history(history)
    volume_back = history_volume(history_back)
    segmentation_back = history_segmentation(history_back)
    segment_id = segmentation_back.GetSegmentation().GetSegmentIdBySegmentName(segment.GetName())
    assert segment_tag(segmentation_back.GetSegmentation().GetSegment(segment_id), TURN_TAG) == "2"
    assert segment_array(segmentation_back, segment_id, volume_back).astype(bool).sum() == mask.sum()
    assert len(turn_rois(history_back, 2)) == 1
    restored_red = slice_node_of(restored, "Red")           # the view came back with the scene
    assert restored_red is not None and restored.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 1
    restored_red.RotateToVolumePlane(volume_back)
    jump_to_turn(restored, volume_back, read_history(history_back)["turns"][0])
    assert view_slice_of(restored, "Red", volume_back).index == 3

    markdown = history_markdown(read_history(history_back), volume_back.GetName())
    assert markdown.count("## Turn ") == 3 and "RANDOM WEIGHTS" in markdown
    assert "axial slice 3, window lung (" in markdown and "axial slice 6, window lung (" in markdown
    assert "Turn 2: nodule" in markdown

    # Propagate to 3D, one click: turn 2's question again with propagate on, as turn 4 of the same conversation.
    slicer.mrmlScene = mrml_scene
    question = propagation_question(turns[1])
    question.answer = "It is [SEG]."
    propagated = logic.ask(volume, history, question, timeout=300)
    fourth = read_history(history)["turns"][-1]
    [propagated_id] = propagated["segment_ids"]
    slices = set(np.nonzero(segment_array(propagated["segmentation"], propagated_id, volume))[axis_kji].tolist())
    assert 6 in slices and len(slices) > 1, slices          # carried from the asked slice through the volume
    assert fourth["segments"][0]["key_slice"] == 6
    assert (fourth["turn"], fourth["propagate"], fourth["propagated_from"]) == (4, True, 2)
    assert fourth["conversation_id"] == turns[0]["conversation_id"]



def test_cancel_before_the_question_reaches_the_backend_writes_nothing(logic, mrml_scene, chest_ct_path):
    from citrusv_backend.volume.input.io import read_volume
    from CitrusVSlicerLib.conversation import Question
    from CitrusVSlicerLib.conversation_scene import create_history, read_history

    volume = add_volume(mrml_scene, read_volume(chest_ct_path).voxels[12:16].copy(), np.diag([3.0, 3.0, 10.0, 1.0]))
    history = create_history(mrml_scene, volume)
    logic.startAsk(logic.backend.local_target(), volume, history, Question("What is this?", "axial", 1))
    assert logic.asking
    logic.cancelAsk()
    events = []
    for _ in range(3):          # the panel's timer ticks on: the ending is handed over by the next poll
        logic.poll()
        events.extend(logic.askEvents())
    assert not logic.asking
    assert [e.kind for e in events if e.kind != "progress"] == ["cancelled"]
    assert read_history(history)["turns"] == [] and mrml_scene.GetFirstNodeByClass("vtkMRMLSegmentationNode") is None


def test_closing_the_scene_while_a_question_is_asked_writes_nothing(logic, mrml_scene, chest_ct_path):
    from citrusv_backend.volume.input.io import read_volume
    from CitrusVSlicerLib.conversation import Question
    from CitrusVSlicerLib.conversation_scene import create_history

    volume = add_volume(mrml_scene, read_volume(chest_ct_path).voxels[12:16].copy(), np.diag([3.0, 3.0, 10.0, 1.0]))
    history = create_history(mrml_scene, volume)
    logic.startAsk(logic.backend.local_target(), volume, history, Question("What is this?", "axial", 1))
    logic.poll()
    mrml_scene.Clear(0)                       # File > Close scene
    events = []
    for _ in range(3):
        logic.poll()
        events.extend(logic.askEvents())
    assert not logic.asking and [e.kind for e in events if e.kind != "progress"] == ["cancelled"]
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLTextNode") == 0
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
