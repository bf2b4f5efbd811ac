"""Refinement prompts without a model: IJK -> display slices, SAM2's frame, boxes, markups files, the prompt
rules on a mask, and the crop-diff history."""
from __future__ import annotations

import json

import numpy as np
import pytest

from citrusv_backend.errors import InputError
from citrusv_backend.volume.slices.orientation import display_orientation
from citrusv_backend.refine.volume_session import enforce_prompts
from citrusv_backend.refine.volume_history import History, MaskChange, changed_box
from citrusv_backend.refine.volume_prompts import (BoxPrompt, PointPrompt, RefinePrompts, SlicePrompt, box_mask,
                                                   ijk_to_display, prompts_by_slice, prompts_from_dict,
                                                   prompts_from_markups)

pytestmark = pytest.mark.unit

SHAPE = (6, 20, 30)  # (k, j, i)
FLIPPED_LPS = np.diag([-1.0, 1.0, -1.0])            # i runs to the right, k runs inferior
PERMUTED = np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])  # i along S, j along L, k along P (a coronal-ish scan)
ORIENTATIONS = [np.eye(3), FLIPPED_LPS, PERMUTED]


@pytest.mark.parametrize("direction", ORIENTATIONS, ids=["lps", "flipped", "permuted"])
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_ijk_lands_on_the_display_pixel_that_shows_that_voxel(direction, plane):
    orientation = display_orientation(direction, plane)
    shape = SHAPE
    volume = np.arange(np.prod(shape)).reshape(shape)
    rng = np.random.default_rng(0)
    for _ in range(20):
        kji = [int(rng.integers(0, n)) for n in shape]
        position, row, col = ijk_to_display(orientation, shape, kji[::-1])
        image = orientation.slice(volume, int(position))
        assert image[int(row), int(col)] == volume[tuple(kji)]
        back = orientation.display_to_index(int(position), np.array([row]), np.array([col]), shape)[0]
        assert np.array_equal(back, kji)


def test_fractional_coordinates_are_kept_and_points_group_by_slice():
    orientation = display_orientation(np.eye(3), "axial")
    prompts = RefinePrompts([PointPrompt((3.25, 4.5, 2.2), True), PointPrompt((10, 11, 1.6), False),
                             PointPrompt((5, 5, 4), True)])
    slices = prompts_by_slice(prompts, orientation, SHAPE, (0, 6))
    assert sorted(slices) == [2, 4]
    # Axial LPS: rows are j (anterior up), columns are i (patient right on the left): no flips.
    assert slices[2].points == [(3.25, 4.5, 1), (10.0, 11.0, 0)]


def test_sam2_frame_is_a_scale_per_axis_and_a_box_comes_first():
    prompt = SlicePrompt(0, points=[(15.0, 10.0, 1), (3.0, 2.0, 0)], box=(1.0, 2.0, 20.0, 12.0))
    coords, labels = prompt.sam2_points(height=20, width=30, size=1024)
    assert labels.tolist() == [[2, 3, 1, 0]]
    expected = np.array([[1, 2], [20, 12], [15, 10], [3, 2]]) / np.array([30, 20]) * 1024
    assert np.allclose(coords[0].numpy(), expected)
    assert SlicePrompt(0).sam2_points(20, 30, 1024) is None


def test_box_covers_the_slices_whose_centres_it_spans():
    orientation = display_orientation(np.eye(3), "axial")
    spans = {(1.5, 3.5): [2, 3], (2.0, 2.0): [2], (2.2, 2.4): [2], (2.6, 2.8): [3], (0.0, 5.0): [0, 1, 2, 3, 4, 5]}
    for (a, b), expected in spans.items():
        box = BoxPrompt((2, 3, a), (9.5, 7, b))
        slices = prompts_by_slice(RefinePrompts(box=box), orientation, SHAPE, (0, 6))
        assert sorted(slices) == expected, (a, b)
        assert all(s.box == (2.0, 3.0, 9.5, 7.0) for s in slices.values())


def test_flipped_axes_keep_the_box_ordered():
    orientation = display_orientation(FLIPPED_LPS, "axial")
    box = BoxPrompt((2, 3, 1), (9, 7, 1))
    (prompt,) = prompts_by_slice(RefinePrompts(box=box), orientation, SHAPE, (0, 6)).values()
    x1, y1, x2, y2 = prompt.box
    assert x1 <= x2 and y1 <= y2
    assert (x1, x2) == (30 - 1 - 9, 30 - 1 - 2)


def test_prompts_outside_the_volume_or_the_segmented_slices_are_refused():
    orientation = display_orientation(np.eye(3), "axial")
    with pytest.raises(InputError, match="outside the volume"):
        prompts_by_slice(RefinePrompts([PointPrompt((40, 2, 2))]), orientation, SHAPE, (0, 6))
    with pytest.raises(InputError, match="outside the segmented slices"):
        prompts_by_slice(RefinePrompts([PointPrompt((4, 2, 5))]), orientation, SHAPE, (1, 4))
    with pytest.raises(InputError, match="finite"):
        prompts_by_slice(RefinePrompts([PointPrompt((float("nan"), 2, 2))]), orientation, SHAPE, (0, 6))


def test_box_mask_holds_the_pixel_centres_inside():
    inside = box_mask((1.5, 2.0, 4.0, 3.4), 6, 8)
    rows, cols = np.nonzero(inside)
    assert sorted(set(rows.tolist())) == [2, 3] and sorted(set(cols.tolist())) == [2, 3, 4]


def test_world_coordinates_and_json_steps():
    lps_to_ijk = np.linalg.inv(np.array([[2.0, 0, 0, 10], [0, 2, 0, 20], [0, 0, 5, -30], [0, 0, 0, 1]]))
    prompts = prompts_from_dict({"points": [{"lps": [14, 24, -20], "positive": False}, {"ijk": [1, 2, 3]},
                                            {"ras": [-14, -24, -20]}],
                                 "box": {"ijk_min": [0, 0, 1], "ras_max": [-16, -26, -15]}}, lps_to_ijk)
    assert prompts.points[0] == PointPrompt((2.0, 2.0, 2.0), False)
    assert prompts.points[1] == PointPrompt((1.0, 2.0, 3.0), True)
    assert prompts.points[2].ijk == (2.0, 2.0, 2.0)
    assert prompts.box == BoxPrompt((0.0, 0.0, 1.0), (3.0, 3.0, 3.0))
    with pytest.raises(InputError, match="ijk"):
        prompts_from_dict({"points": [{"xyz": [1, 2, 3]}]})


def test_slicer_markups_files(tmp_path):
    ijk_to_lps = np.array([[-1.5, 0, 0, 40], [0, 1.5, 0, -30], [0, 0, 4, 50], [0, 0, 0, 1]])
    lps_to_ijk = np.linalg.inv(ijk_to_lps)
    point = ijk_to_lps @ [3, 4, 5, 1]
    points_file = tmp_path / "include.mrk.json"
    points_file.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
        {"position": [-point[0], -point[1], point[2]], "positionStatus": "defined"},
        {"position": [0, 0, 0], "positionStatus": "undefined"}]}]}))
    prompts = prompts_from_markups(points_file, lps_to_ijk, positive=False)
    assert len(prompts.points) == 1 and not prompts.points[0].positive
    assert np.allclose(prompts.points[0].ijk, (3, 4, 5))
    # An ROI rotated by 90 degrees in-plane: its IJK bounding box.
    centre = ijk_to_lps @ [10, 10, 2, 1]
    roi_file = tmp_path / "box.mrk.json"
    roi_file.write_text(json.dumps({"markups": [{"type": "ROI", "coordinateSystem": "LPS", "center": centre[:3].tolist(),
                                                 "size": [6.0, 3.0, 8.0], "orientation": [0, -1, 0, 1, 0, 0, 0, 0, 1]}]}))
    box = prompts_from_markups(roi_file, lps_to_ijk).box
    assert np.allclose(box.corner_a, (9, 8, 1)) and np.allclose(box.corner_b, (11, 12, 3))
    bad = tmp_path / "bad.mrk.json"
    bad.write_text("{}")
    with pytest.raises(InputError, match="markups"):
        prompts_from_markups(bad, lps_to_ijk)


def test_a_box_confines_and_an_exclude_point_never_stays_inside():
    mask = np.zeros((20, 20), bool)
    mask[2:18, 2:12] = True          # the target
    mask[8:12, 12:19] = True         # a leak to the right, joined to it
    boxed = enforce_prompts(mask, SlicePrompt(0, box=(0, 0, 11, 19)))
    assert not boxed[:, 12:].any() and np.array_equal(boxed[:, :12], mask[:, :12])
    # Exclude in the leak, include in the target: the leak goes, the target stays.
    split = enforce_prompts(mask, SlicePrompt(0, points=[(17.0, 10.0, 0), (6.0, 10.0, 1)]))
    assert not split[8:12, 14:].any() and split[2:18, 2:11].all()
    # Exclude in the leak and no include point: split against the region's centre.
    alone = enforce_prompts(mask, SlicePrompt(0, points=[(17.0, 10.0, 0)]))
    assert not alone[10, 17] and alone[10, 6]
    # Exclude at the region's centre: the region goes; another region stays.
    other = np.zeros((20, 20), bool)
    other[2:7, 2:7] = True
    other[12:15, 12:15] = True
    cleared = enforce_prompts(other, SlicePrompt(0, points=[(4.0, 4.0, 0)]))
    assert not cleared[2:7, 2:7].any() and cleared[12:15, 12:15].all()
    # A mask that already obeys is unchanged.
    assert np.array_equal(enforce_prompts(mask, SlicePrompt(0, points=[(0.0, 0.0, 0)])), mask)


def test_history_steps_and_changed_boxes():
    orientation = display_orientation(FLIPPED_LPS, "axial")
    changes = {1: np.zeros((20, 30), bool), 3: np.zeros((20, 30), bool)}
    changes[1][5, 7] = True
    changes[3][10, 2] = True
    box = changed_box(orientation, SHAPE, changes)
    volume = np.zeros(SHAPE, bool)
    for index, changed in changes.items():
        plane = orientation.slice(volume, index) | changed
        orientation.put_slice(volume, index, plane)
    found = np.nonzero(volume)
    assert volume.sum() == 2 and volume[box].sum() == 2
    assert box == tuple(slice(int(a.min()), int(a.max()) + 1) for a in found), "the tight box of the changed voxels"
    assert changed_box(orientation, SHAPE, {0: np.zeros((20, 30), bool)}) is None
    history = History(max_steps=2)
    steps = [MaskChange((0, 0, 0), (1, 1, 2), np.packbits([0, 1]), np.packbits([1, 1]), [0]) for _ in range(3)]
    for step in steps:
        history.record(step)
    assert len(history.done) == 2 and history.version == 3
    assert history.take_undo() is steps[2] and history.take_redo() is steps[2]
    history.take_undo()
    history.record(steps[0])
    assert not history.undone and history.describe()["can_undo"]
    assert steps[0].unpack("before").tolist() == [[[False, True]]]
