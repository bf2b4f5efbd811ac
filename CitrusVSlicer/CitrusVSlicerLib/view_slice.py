"""Which slice of a volume a slice view shows, and the reverse: the geometry behind *Ask about this slice*.

numpy only (no MRML, no Qt): the callers pass a slice node's SliceToRAS and the volume's IJK->RAS in world
coordinates (conversation_scene.py reads them from the scene), and, for a volume under a transform, the IJK->RAS
the backend was sent (`naming`: the volume's own), which is what the backend's slice axis names refer to.

The backend names a slice by (axis, index): `axial` slices step along the volume's index axis whose direction is
closest to superior, `coronal` the one closest to anterior, `sagittal` the one closest to right (the same greedy
assignment as the backend's `volume/orientation.dominant_axes`, so oblique and flipped volumes are named alike on
both sides), and the index is the raw array index along that axis. A view shows one such slice only when its
plane is parallel to the volume's slices: across the volume's whole extent it must stay within half a voxel of
one index (`ALIGNED_SPREAD_VOXELS`); Slicer's "Rotate to volume plane" gives exactly that. Any other view (an
axial view on an oblique volume, say) cuts through several slices and is refused with a message saying so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SLICE_AXIS_OF_WORLD_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}   # RAS axes: R, A, S
WORLD_AXIS_OF_SLICE_AXIS = {name: world for world, name in SLICE_AXIS_OF_WORLD_AXIS.items()}
# How far (in voxels along the sliced axis) the view's plane may drift across the volume and still show one slice.
ALIGNED_SPREAD_VOXELS = 0.5


class ViewNotAligned(ValueError):
    """The view does not show one slice of the volume; the message says why and what to do, for the user."""


@dataclass(frozen=True)
class ViewSlice:
    axis: str         # "axial" | "coronal" | "sagittal", as the backend names it
    index: int        # the array index along the volume's index axis of that slice axis
    index_axis: int   # 0 = i, 1 = j, 2 = k


def dominant_world_axes(ijk_to_ras) -> list[int]:
    """For each index axis (i, j, k), the world axis (R, A, S) its direction is closest to (a permutation).
    Greedy on the largest cosines first, as the backend assigns them."""
    axes = np.asarray(ijk_to_ras, float)[:3, :3]
    cosines = np.abs(axes / np.linalg.norm(axes, axis=0))
    assigned: list[int | None] = [None, None, None]
    for flat in np.argsort(-cosines, axis=None, kind="stable"):
        world, index_axis = divmod(int(flat), 3)
        if assigned[index_axis] is None and world not in assigned:
            assigned[index_axis] = world
    return [int(axis) for axis in assigned]


def index_axis_of_slice_axis(ijk_to_ras, axis: str) -> int:
    if axis not in WORLD_AXIS_OF_SLICE_AXIS:
        raise ValueError(f"unknown slice axis {axis!r}; use axial, coronal or sagittal")
    return dominant_world_axes(ijk_to_ras).index(WORLD_AXIS_OF_SLICE_AXIS[axis])


def slice_axis_of_index_axis(ijk_to_ras, index_axis: int) -> str:
    return SLICE_AXIS_OF_WORLD_AXIS[dominant_world_axes(ijk_to_ras)[index_axis]]


def nearest_slice_axis(slice_to_ras) -> str:
    """The slice axis a view is closest to in patient axes (its normal's largest component)."""
    normal = np.asarray(slice_to_ras, float)[:3, 2]
    return SLICE_AXIS_OF_WORLD_AXIS[int(np.argmax(np.abs(normal)))]


def slice_in_view(slice_to_ras, ijk_to_ras, shape_kji, view: str = "The view", volume: str = "the volume",
                  naming=None) -> ViewSlice:
    """The slice of the volume that a view with this SliceToRAS shows; ViewNotAligned when it shows none."""
    slice_to_ras = np.asarray(slice_to_ras, float)
    ijk_to_ras = np.asarray(ijk_to_ras, float)
    sizes = np.asarray(shape_kji, int)[::-1]                       # (i, j, k)
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    # The view's plane in index space: m . q = d (m: the normal seen in index coordinates).
    m = ijk_to_ras[:3, :3].T @ normal
    d = float(m @ (np.linalg.inv(ijk_to_ras) @ np.r_[slice_to_ras[:3, 3], 1.0])[:3])
    spreads = []
    for axis in range(3):
        others = [b for b in range(3) if b != axis]
        spreads.append(np.inf if abs(m[axis]) < 1e-12 else
                       sum(abs(m[b] / m[axis]) * (sizes[b] - 1) for b in others))
    axis = int(np.argmin(spreads))
    if spreads[axis] > ALIGNED_SPREAD_VOXELS:
        crossed = "many" if not np.isfinite(spreads[axis]) else str(int(np.ceil(spreads[axis])) + 1)
        raise ViewNotAligned(
            f"{view} is not aligned with {volume}'s slices (across the volume its plane crosses {crossed} of them): "
            f"use the view's 'Rotate to volume plane' (slice view controls), or ask about a placed ROI instead.")
    others = [b for b in range(3) if b != axis]
    centre = (d - sum(m[b] * (sizes[b] - 1) / 2.0 for b in others)) / m[axis]
    index = int(np.floor(centre + 0.5))
    if not 0 <= index < sizes[axis]:
        raise ViewNotAligned(f"{view} shows no slice of {volume} (it is at index {centre:.1f}; the volume has "
                             f"{sizes[axis]} slices along that axis): move it into the volume first.")
    return ViewSlice(slice_axis_of_index_axis(ijk_to_ras if naming is None else naming, axis), index, axis)


def slice_centre_ras(ijk_to_ras, shape_kji, axis: str, index: int, roi: dict | None = None,
                     naming=None) -> np.ndarray:
    """The world point at the middle of slice `index` along `axis` (or of the ROI's part of it): where the views jump."""
    ijk_to_ras = np.asarray(ijk_to_ras, float)
    sizes = np.asarray(shape_kji, int)[::-1]
    if roi is not None:
        centre = (np.asarray(roi["ijk_min"], float) + np.asarray(roi["ijk_max"], float)) / 2.0
    else:
        centre = (sizes - 1) / 2.0
    centre[index_axis_of_slice_axis(ijk_to_ras if naming is None else naming, axis)] = index
    return (ijk_to_ras @ np.r_[centre, 1.0])[:3]


def roi_voxels(ijk_bounds: dict, shape_kji) -> dict:
    """An ROI's continuous index bounds (refine.roi_box) -> the voxels whose centres lie inside it, clipped to the
    volume: {"ijk_min": [i, j, k], "ijk_max": [i, j, k]} (both inclusive). ValueError when it misses the volume."""
    sizes = np.asarray(shape_kji, int)[::-1]
    low = np.asarray(ijk_bounds["ijk_min"], float)
    high = np.asarray(ijk_bounds["ijk_max"], float)
    first = np.ceil(low - 1e-6).astype(int)
    last = np.floor(high + 1e-6).astype(int)
    thin = first > last          # thinner than a voxel: the voxel its middle lies in
    middle = np.floor((low + high) / 2.0 + 0.5).astype(int)
    first, last = np.where(thin, middle, first), np.where(thin, middle, last)
    first, last = np.maximum(first, 0), np.minimum(last, sizes - 1)
    if np.any(first > last):
        raise ValueError("the ROI lies outside the volume")
    return {"ijk_min": [int(v) for v in first], "ijk_max": [int(v) for v in last]}


def slice_for_roi(roi: dict, ijk_to_ras, axis: str, view_index: int | None = None) -> int:
    """The slice an ROI question is asked on: the view's own slice when it lies in the ROI, else the ROI's middle."""
    index_axis = index_axis_of_slice_axis(ijk_to_ras, axis)
    low, high = roi["ijk_min"][index_axis], roi["ijk_max"][index_axis]
    if view_index is not None and low <= view_index <= high:
        return int(view_index)
    return int((low + high) // 2)
