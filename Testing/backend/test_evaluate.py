"""Overlap and surface-distance scores against cases with known answers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from citrusv_backend.errors import InputError
from citrusv_backend.volume.outputs.evaluate import compare_masks, evaluate_labelmaps

pytestmark = pytest.mark.unit


def ball(shape_kji, centre_kji, radius_mm, spacing_ijk) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape_kji)]
    spacing_kji = spacing_ijk[::-1]
    return sum(((grid[a] - centre_kji[a]) * spacing_kji[a]) ** 2 for a in range(3)) <= radius_mm ** 2


def sphere_overlap_dice(radius: float, shift: float) -> float:
    """Dice of two equal spheres whose centres are `shift` apart (lens volume formula)."""
    lens = math.pi * (4 * radius + shift) * (2 * radius - shift) ** 2 / 12
    return lens / (4 / 3 * math.pi * radius ** 3)


def cube(shape, corner_kji, size) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + size) for c in corner_kji)] = True
    return mask


def test_identical_masks_score_perfectly():
    mask = ball((25, 25, 25), (12, 12, 12), 8.0, (1.0, 1.0, 1.0))
    result = compare_masks(mask, mask.copy(), (0.8, 0.8, 2.5))
    assert result["dice"] == 1.0
    assert result["hausdorff95_mm"] == 0.0 and result["hausdorff_mm"] == 0.0 and result["assd_mm"] == 0.0
    assert result["volume_error_ml"] == 0.0 and result["volume_error_percent"] == 0.0
    assert result["volume_pred_ml"] == pytest.approx(mask.sum() * 0.8 * 0.8 * 2.5 / 1000)
    assert result["note"] is None


def test_spheres_shifted_in_plane():
    # For a small shift d, a surface point's distance to the other sphere is about d |cos(theta)|, which is
    # uniform on [0, d] over the sphere: HD95 about 0.95 d, ASSD about d / 2.
    shift_voxels, spacing = 3, (1.0, 1.0, 1.0)
    truth = ball((31, 31, 31), (15, 15, 14), 10.0, spacing)
    pred = ball((31, 31, 31), (15, 15, 14 + shift_voxels), 10.0, spacing)
    result = compare_masks(pred, truth, spacing)
    assert abs(result["hausdorff95_mm"] - shift_voxels) <= 1.0
    assert abs(result["hausdorff_mm"] - shift_voxels) <= 1.0
    assert abs(result["assd_mm"] - shift_voxels / 2) <= 0.5
    assert result["dice"] == pytest.approx(sphere_overlap_dice(10.0, shift_voxels), abs=0.02)


def test_spheres_shifted_across_slices_use_the_slice_spacing():
    spacing = (0.8, 0.8, 2.5)
    truth = ball((16, 40, 40), (6, 20, 20), 12.0, spacing)
    pred = ball((16, 40, 40), (8, 20, 20), 12.0, spacing)  # two slices = 5 mm
    result = compare_masks(pred, truth, spacing)
    assert abs(result["hausdorff95_mm"] - 5.0) <= 0.8
    assert abs(result["assd_mm"] - 2.5) <= 0.8
    assert result["dice"] == pytest.approx(sphere_overlap_dice(12.0, 5.0), abs=0.02)


def test_disjoint_masks():
    truth = cube((8, 8, 30), (1, 1, 1), 5)    # i 1..5
    pred = cube((8, 8, 30), (1, 1, 12), 5)    # i 12..16: facing faces 7 voxels apart
    result = compare_masks(pred, truth, (0.5, 1.0, 1.0))
    assert result["dice"] == 0.0
    # Farthest pred face (i = 16) to the nearest truth surface (i = 5 at the same j, k): 11 voxels of 0.5 mm.
    assert result["hausdorff_mm"] == pytest.approx(11 * 0.5)
    assert 7 * 0.5 <= result["hausdorff95_mm"] <= result["hausdorff_mm"]


def test_both_empty():
    empty = np.zeros((4, 5, 6), bool)
    result = compare_masks(empty, empty, (1, 1, 1))
    assert result["dice"] == 1.0
    assert result["hausdorff95_mm"] == 0.0 and result["assd_mm"] == 0.0
    assert result["volume_error_ml"] == 0.0 and result["volume_error_percent"] == 0.0
    assert "empty" in result["note"]


@pytest.mark.parametrize("empty_side", ["pred", "truth"])
def test_one_empty_gives_zero_dice_and_no_distances(empty_side):
    full, empty = cube((6, 6, 6), (1, 1, 1), 3), np.zeros((6, 6, 6), bool)
    pred, truth = (empty, full) if empty_side == "pred" else (full, empty)
    result = compare_masks(pred, truth, (1, 1, 1))
    assert result["dice"] == 0.0
    assert result["hausdorff95_mm"] is None and result["hausdorff_mm"] is None and result["assd_mm"] is None
    assert ("predicted" if empty_side == "pred" else "reference") in result["note"]
    expected_percent = -100.0 if empty_side == "pred" else None
    assert result["volume_error_percent"] == expected_percent
    json.dumps(result, allow_nan=False)


def test_volume_errors():
    truth = cube((10, 10, 10), (1, 1, 1), 4)
    pred = truth.copy()
    pred[5:9, 1:5, 1:5] = True  # twice the volume, containing the truth
    result = compare_masks(pred, truth, (1.0, 1.0, 2.0))
    assert result["volume_truth_ml"] == pytest.approx(64 * 2.0 / 1000)
    assert result["volume_error_ml"] == pytest.approx(64 * 2.0 / 1000)
    assert result["volume_error_percent"] == pytest.approx(100.0)
    assert result["dice"] == pytest.approx(2 * 64 / (64 + 128))


def test_array_edge_counts_as_boundary_and_padding_changes_nothing():
    truth = np.ones((6, 7, 8), bool)
    pred = truth.copy()
    pred[:, :, -2:] = False
    bare = compare_masks(pred, truth, (1.0, 1.0, 1.0))
    padded = compare_masks(np.pad(pred, 3), np.pad(truth, 3), (1.0, 1.0, 1.0))
    assert bare == padded
    assert bare["hausdorff_mm"] == pytest.approx(2.0)


def test_bad_input_raises():
    with pytest.raises(InputError, match="shape"):
        compare_masks(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), (1, 1, 1))
    with pytest.raises(InputError, match="spacing"):
        compare_masks(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), bool), (1, -1, 1))


def test_labelmaps_default_pairs_cover_labels_in_either_map():
    truth = np.zeros((6, 10, 10), np.int16)
    truth[1:4, 1:4, 1:4] = 1
    truth[1:4, 6:9, 6:9] = 3
    pred = np.zeros_like(truth)
    pred[1:4, 1:4, 1:4] = 1
    pred[1:4, 6:9, 1:4] = 2
    rows = evaluate_labelmaps(pred, truth, (1, 1, 1), names={1: "liver", 3: "spleen"})
    by_label = {row["truth_label"]: row for row in rows}
    assert [(row["pred_label"], row["truth_label"]) for row in rows] == [(1, 1), (2, 2), (3, 3)]
    assert by_label[1]["name"] == "liver" and by_label[1]["dice"] == 1.0
    assert by_label[2]["name"] == "label 2" and by_label[2]["dice"] == 0.0 and by_label[2]["assd_mm"] is None
    assert by_label[3]["name"] == "spleen" and by_label[3]["volume_pred_ml"] == 0.0


def test_labelmaps_explicit_pairs_match_different_values():
    truth = np.zeros((6, 10, 10), np.uint8)
    truth[1:4, 6:9, 6:9] = 3
    pred = np.where(truth == 3, 7, 0).astype(np.uint8)
    rows = evaluate_labelmaps(pred, truth, (1, 1, 1), pairs=[(7, 3)], names={7: "kidney"})
    assert len(rows) == 1
    assert rows[0]["name"] == "kidney" and rows[0]["dice"] == 1.0 and rows[0]["hausdorff95_mm"] == 0.0
