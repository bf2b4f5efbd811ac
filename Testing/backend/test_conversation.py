"""Conversations in the pipeline layer (volume/tasks/conversation.py) with the real tiny model and forced (scripted)
answers: turn 2 of 3 answers with a [SEG] and a box; its segment and ROI lie on that turn's slice, in the same
voxels for the chest CT stored as usual and for the same anatomy stored permuted, flipped and oblique."""
from __future__ import annotations

import json

import numpy as np
import pytest

from citrusv_backend.errors import InputError
from citrusv_backend.volume.tasks.conversation import (Conversation, ConversationRunner, ConversationTooLong,
                                                       TurnRequest, conversation_markdown)
from citrusv_backend.volume.input.io import Volume
from citrusv_backend.volume.outputs.quantify import VoxelGeometry
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import parse_window

pytestmark = pytest.mark.model

SEG_AND_BOX = 'Sure, it is [SEG]. ```json\n[{"bbox_2d": [120, 96, 260, 228], "label": "nodule"}]\n```'


def rotation_about_superior(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])


@pytest.fixture(scope="module")
def standard(chest) -> Volume:
    """Six slices of the chest CT, as stored (slicerio's file: i to the patient's right, j to anterior)."""
    return Volume(np.ascontiguousarray(chest.voxels[14:20]), chest.geometry, "chest6")


@pytest.fixture(scope="module")
def oblique(standard) -> Volume:
    """The same voxels stored with i and j swapped and one of them reversed, the whole volume turned 12 degrees
    about the patient's superior axis: B[k, a, b] = A[k, b, W-1-a]."""
    a = standard.voxels
    width = a.shape[2]
    b = np.ascontiguousarray(np.flip(a, axis=2).transpose(0, 2, 1))
    geometry = standard.geometry
    spacing = geometry.spacing  # (si, sj, sk)
    direction_a = np.asarray(geometry.direction)
    swap = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)  # B's index axes in A's index axes
    origin = np.asarray(geometry.origin) + direction_a @ (np.array(spacing) * [width - 1, 0, 0])
    turn = rotation_about_superior(12.0)
    return Volume(b, VoxelGeometry(spacing=(spacing[1], spacing[0], spacing[2]), origin=tuple(turn @ origin),
                                   direction=turn @ direction_a @ swap), "chest6-oblique")


def to_standard(mask_b: np.ndarray) -> np.ndarray:
    """The oblique volume's voxels back in the standard volume's order (the inverse of `oblique`)."""
    return np.flip(mask_b.transpose(0, 2, 1), axis=2)


def roi_to_standard(ijk_min, ijk_max, width: int) -> tuple[list[int], list[int]]:
    """(i_B, j_B, k) -> (i_A, j_A, k) = (W-1-j_B, i_B, k)."""
    corners = [(width - 1 - j, i, k) for i, j, k in (ijk_min, ijk_max)]
    return [min(c[n] for c in corners) for n in range(3)], [max(c[n] for c in corners) for n in range(3)]


@pytest.fixture(scope="module")
def chest():
    from pathlib import Path

    import slicerio

    from citrusv_backend.volume.input.io import read_volume

    return read_volume(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd")


def three_turns(engine, volume: Volume, roi: dict, propagate: bool = False):
    conversation = Conversation.new(volume, title="three turns")
    runner = ConversationRunner(engine, "tiny")
    outcomes = [runner.ask(conversation, volume, TurnRequest("What is in this slice?", slice=2, max_new_tokens=3)),
                runner.ask(conversation, volume, TurnRequest("Segment the nodule and locate it.", slice=3, roi=roi,
                                                             answer=SEG_AND_BOX, propagate=propagate)),
                runner.ask(conversation, volume, TurnRequest("And how large is it?", max_new_tokens=3))]
    return conversation, outcomes


def test_the_model_sees_the_same_slices_of_both_storages(standard, oblique):
    """The same voxel plane is the same image; its slice number counts along each storage's own index (B's
    left-right index runs the other way)."""
    window = parse_window(None, "", "CT", standard.voxels)
    for axis, same in (("axial", lambda n, depth: n), ("coronal", lambda n, depth: n),
                       ("sagittal", lambda n, depth: depth - 1 - n)):
        a, b = SliceSource(standard, axis, window), SliceSource(oblique, axis, window)
        assert a.depth == b.depth
        for n in (0, a.depth // 3, a.depth - 1):
            assert np.array_equal(a.gray(n), b.gray(same(n, a.depth))), (axis, n)


def test_turn_two_segment_and_roi_on_its_slice_for_an_oblique_flipped_volume(tiny_engine, standard, oblique):
    width = standard.shape[2]
    roi_a = {"ijk_min": [20, 30, 1], "ijk_max": [110, 100, 4]}
    low, high = roi_a["ijk_min"], roi_a["ijk_max"]
    # The same voxels in B's index space: i_B = j_A, j_B = W-1-i_A.
    roi_b = {"ijk_min": [low[1], width - 1 - high[0], low[2]], "ijk_max": [high[1], width - 1 - low[0], high[2]]}
    conversation_a, (first_a, second_a, third_a) = three_turns(tiny_engine, standard, roi_a)
    conversation_b, (first_b, second_b, third_b) = three_turns(tiny_engine, oblique, roi_b)
    assert first_a.turn.answer == first_b.turn.answer and third_a.turn.answer == third_b.turn.answer
    assert second_a.turn.prompt_tokens == second_b.turn.prompt_tokens
    for second, conversation in ((second_a, conversation_a), (second_b, conversation_b)):
        [segment] = second.result.segments
        assert segment.key_slice == 3 and segment.slices == [3], "the mask lies on turn 2's slice"
        assert segment.mask.any() and second.turn.masks_on_turn == 2
        assert [s["name"] for s in second.turn.segments] == ["turn 2"]
        assert conversation.turns[2].masks_on_turn == 2 and conversation.turns[2].slice is None
    assert np.array_equal(to_standard(second_b.result.segments[0].mask), second_a.result.segments[0].mask)
    [box_a], [box_b] = second_a.turn.boxes, second_b.turn.boxes
    assert box_a["ijk_min"][2] == box_a["ijk_max"][2] == 3
    assert roi_to_standard(box_b["ijk_min"], box_b["ijk_max"], width) == (box_a["ijk_min"], box_a["ijk_max"])
    # Inside the ROI the question was asked in (the model saw only that crop).
    assert all(lo <= v <= hi for v, lo, hi in zip(box_a["ijk_min"] + box_a["ijk_max"], low * 2, high * 2))
    # Every voxel of the mask is inside the ROI's crop of the slice.
    mask = second_a.result.segments[0].mask
    inside = np.zeros_like(mask)
    inside[3, low[1]:high[1] + 1, low[0]:high[0] + 1] = True
    assert not (mask & ~inside).any()


def test_turn_two_box_lands_where_the_model_drew_it(tiny_engine, standard):
    """The box's voxels, independently: the model's resized frame scaled to the slice, then the model orientation
    undone by hand for this file's storage (i to the patient's right: the model's columns run against i)."""
    from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS, smart_resize
    from citrusv_backend.volume.slices.orientation import model_orientation

    _, (_, second, _) = three_turns(tiny_engine, standard, roi=None)
    orientation = model_orientation(standard.geometry.direction, "axial")
    assert (orientation.slice_axis, orientation.row_axis, orientation.col_axis) == (0, 1, 2)
    height, width = standard.shape[1:]
    budget = TASK_PIXEL_BUDGETS["ask"]
    resized_h, resized_w = smart_resize(height, width, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    cols = (int(np.floor(120 * width / resized_w)), int(np.ceil(260 * width / resized_w)) - 1)
    rows = (int(np.floor(96 * height / resized_h)), int(np.ceil(228 * height / resized_h)) - 1)
    i = sorted((width - 1 - c) if orientation.flip_cols else c for c in cols)
    j = sorted((height - 1 - r) if orientation.flip_rows else r for r in rows)
    [box] = second.turn.boxes
    assert box["ijk_min"] == [i[0], j[0], 3] and box["ijk_max"] == [i[1], j[1], 3]


@pytest.mark.slow
def test_propagation_carries_the_turns_mask_through_the_volume(tiny_engine, standard):
    _, (_, second, _) = three_turns(tiny_engine, standard, roi=None, propagate=True)
    [segment] = second.result.segments
    assert 3 in segment.slices and segment.key_slice == 3
    assert second.turn.segments[0]["propagated"] is True
    # Slice 3 keeps exactly the [SEG] mask; propagation adds only other slices.
    _, (_, alone, _) = three_turns(tiny_engine, standard, roi=None)
    assert np.array_equal(segment.mask[3], alone.result.segments[0].mask[3])


def test_saved_conversation_continues_and_markdown_carries_the_markings(tiny_engine, standard, tmp_path):
    conversation, _ = three_turns(tiny_engine, standard, roi=None)
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(conversation.to_dict()))
    loaded = Conversation.from_dict(json.loads(path.read_text()))
    assert loaded.to_dict() == conversation.to_dict()
    outcome = ConversationRunner(tiny_engine, "tiny").ask(loaded, standard, TurnRequest("Anything else?", slice=1,
                                                                                        max_new_tokens=2))
    assert outcome.turn.number == 4 and outcome.turn.prompt_tokens > conversation.tokens
    text = conversation_markdown(loaded, {1: "turn1.png"})
    assert "**RANDOM WEIGHTS**" in text and "![turn 1: axial slice 2](turn1.png)" in text
    report = ConversationRunner(tiny_engine, "tiny").ask(loaded, standard, TurnRequest(
        "Write a report of this slice.", slice=2, answer="<answer> FINDINGS: clear. IMPRESSION: normal. </answer>"))
    assert report.turn.experimental.startswith("EXPERIMENTAL") and loaded.experimental
    assert "EXPERIMENTAL" in conversation_markdown(loaded)
    with pytest.raises(InputError, match="another volume"):
        ConversationRunner(tiny_engine, "tiny").ask(loaded, Volume(standard.voxels[:3].copy(), standard.geometry, "x"),
                                                    TurnRequest("What?", slice=1))


def test_a_turn_over_the_budget_is_refused_and_nothing_is_added(tiny_engine, standard):
    conversation = Conversation.new(standard, budget_tokens=600)
    runner = ConversationRunner(tiny_engine, "tiny")
    runner.ask(conversation, standard, TurnRequest("What is in this slice?", slice=2, max_new_tokens=3))
    with pytest.raises(ConversationTooLong, match="start a new conversation"):
        runner.ask(conversation, standard, TurnRequest("And this one?", slice=3, max_new_tokens=64))
    assert len(conversation.turns) == 1
    with pytest.raises(InputError, match="damaged|not a CitrusV conversation"):
        Conversation.from_dict({"format": "citrusv-conversation/1", "turns": [{"number": 1}]})


def test_the_answer_streams_through_progress(tiny_engine, standard):
    """While the model writes, progress carries the answer so far (what the service's job status shows)."""
    seen = []
    runner = ConversationRunner(tiny_engine, "tiny", progress=lambda stage, fraction, message: seen.append(
        (stage, fraction, message)))
    outcome = runner.ask(Conversation.new(standard), standard, TurnRequest("What is in this slice?", slice=2,
                                                                           max_new_tokens=12))
    partial = [message for stage, _, message in seen if stage == "answering" and message]
    assert len(partial) >= 3, seen
    assert all(outcome.turn.answer.startswith(text) for text in partial)
    assert [len(text) for text in partial] == sorted(len(text) for text in partial)
    fractions = [fraction for _, fraction, _ in seen]
    assert fractions == sorted(fractions) and seen[-1] == ("done", 1.0, outcome.turn.answer)
