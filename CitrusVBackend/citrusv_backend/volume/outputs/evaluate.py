"""Agreement between a predicted and a reference segmentation: overlap, surface distances, volumes.

Arrays are in numpy (k, j, i) order; `spacing` is ITK's (si, sj, sk) in mm.

Definitions:
- boundary of a mask = the mask minus its binary erosion (6-connected); voxels on the array's edge count
  as boundary, as if the volume were surrounded by background;
- surface distances = for every boundary voxel of one mask, the distance in mm to the nearest boundary voxel
  of the other, both directions pooled;
- hausdorff95_mm = 95th percentile of the pooled distances; hausdorff_mm = their maximum;
  assd_mm = their mean, i.e. (sum over pred boundary + sum over truth boundary) / (number of both);
- volume_error = pred - truth; volume_error_percent is relative to truth.
Empty masks: both empty -> dice 1.0, distances 0.0; exactly one empty -> dice 0.0 and the distances are
infinite, reported as None (JSON has no infinity) with an explanatory `note`.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ...errors import InputError

NOTE_BOTH_EMPTY = "both masks are empty"
NOTE_ONE_EMPTY = "{} mask is empty: surface distances are infinite and reported as None"


def compare_masks(pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """Dice, HD95, Hausdorff, ASSD and volume differences of two boolean (k, j, i) masks of the same shape."""
    pred, truth = np.asarray(pred).astype(bool, copy=False), np.asarray(truth).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise InputError(f"the masks differ in shape: prediction {pred.shape}, reference {truth.shape}")
    sampling_kji = _sampling_kji(spacing)
    pred_count, truth_count = int(pred.sum()), int(truth.sum())
    return {"dice": _dice(pred, truth, pred_count, truth_count),
            **_distance_fields(pred, truth, sampling_kji, pred_count, truth_count),
            **_volume_fields(pred_count, truth_count, float(np.prod(sampling_kji)))}


def evaluate_labelmaps(pred_labels: np.ndarray, truth_labels: np.ndarray, spacing,
                       pairs: list[tuple[int, int]] | None = None, names: dict | None = None) -> list[dict]:
    """`compare_masks` for each (pred label, truth label) pair.

    Default pairs: every non-zero label value present in either map, compared with itself. `names` maps a
    label value to a name, looked up by the truth label first, then by the pred label.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    if pred_labels.shape != truth_labels.shape:
        raise InputError(f"the labelmaps differ in shape: prediction {pred_labels.shape}, "
                         f"reference {truth_labels.shape}")
    if pairs is None:
        present = np.union1d(np.unique(pred_labels), np.unique(truth_labels))
        pairs = [(int(value), int(value)) for value in present if value != 0]
    names = names or {}
    rows = []
    for pred_value, truth_value in pairs:
        name = names.get(truth_value, names.get(pred_value, f"label {truth_value}"))
        scores = compare_masks(pred_labels == pred_value, truth_labels == truth_value, spacing)
        rows.append({"name": name, "pred_label": int(pred_value), "truth_label": int(truth_value), **scores})
    return rows


def _sampling_kji(spacing) -> tuple[float, float, float]:
    values = [float(value) for value in np.ravel(spacing)]
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise InputError(f"spacing must be three positive numbers (si, sj, sk), got {spacing}")
    return tuple(values[::-1])


def _volume_fields(pred_count: int, truth_count: int, voxel_mm3: float) -> dict:
    pred_ml, truth_ml = pred_count * voxel_mm3 / 1000.0, truth_count * voxel_mm3 / 1000.0
    if truth_count:
        percent = 100.0 * (pred_count - truth_count) / truth_count  # from counts: exact for whole ratios
    else:
        percent = 0.0 if pred_count == 0 else None  # any volume is an infinite error against nothing
    return {"volume_pred_ml": pred_ml, "volume_truth_ml": truth_ml, "volume_error_ml": pred_ml - truth_ml,
            "volume_error_percent": percent}


def _dice(pred: np.ndarray, truth: np.ndarray, pred_count: int, truth_count: int) -> float:
    if pred_count + truth_count == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / (pred_count + truth_count)


def _distance_fields(pred, truth, sampling_kji, pred_count: int, truth_count: int) -> dict:
    if pred_count == 0 and truth_count == 0:
        return {"hausdorff95_mm": 0.0, "hausdorff_mm": 0.0, "assd_mm": 0.0, "note": NOTE_BOTH_EMPTY}
    if pred_count == 0 or truth_count == 0:
        which = "the predicted" if pred_count == 0 else "the reference"
        return {"hausdorff95_mm": None, "hausdorff_mm": None, "assd_mm": None, "note": NOTE_ONE_EMPTY.format(which)}
    distances = _symmetric_surface_distances(pred, truth, sampling_kji)
    return {"hausdorff95_mm": float(np.percentile(distances, 95)), "hausdorff_mm": float(distances.max()),
            "assd_mm": float(distances.mean()), "note": None}


def _symmetric_surface_distances(pred: np.ndarray, truth: np.ndarray, sampling_kji) -> np.ndarray:
    """Pooled boundary-to-boundary distances in mm, both directions (both masks non-empty)."""
    # Cropping to the union's box changes nothing (outside it all is background, as beyond the array's
    # edge) and keeps the distance transforms small for small structures in large volumes.
    box = _union_box(pred, truth)
    pred_boundary, truth_boundary = _boundary(pred[box]), _boundary(truth[box])
    to_truth = ndimage.distance_transform_edt(~truth_boundary, sampling=sampling_kji)
    to_pred = ndimage.distance_transform_edt(~pred_boundary, sampling=sampling_kji)
    return np.concatenate([to_truth[pred_boundary], to_pred[truth_boundary]])


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _union_box(pred: np.ndarray, truth: np.ndarray) -> tuple[slice, ...]:
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(other for other in range(union.ndim) if other != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
