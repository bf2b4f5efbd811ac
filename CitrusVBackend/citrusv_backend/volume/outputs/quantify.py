"""Measurements of one segment: volume, RECIST diameters, extent, position and intensity statistics.

Conventions (the ITK ones, used across the package):
- voxel arrays are numpy arrays in (k, j, i) order, as SimpleITK's GetArrayFromImage returns them;
- `spacing` and the columns of `direction` are in ITK index order (i, j, k); `origin` is the LPS position of
  voxel (0, 0, 0); the LPS point of index (i, j, k) is origin + direction @ (spacing * (i, j, k));
- RAS is LPS with the first two coordinates negated.
Every distance is measured between voxel centres, in mm.

Speed: only the first and last mask voxel of each image row are ever turned into coordinates. A linear
function along a row peaks at one of its ends, so these points hold every extreme of the mask along any
direction (patient axes, hull vertices, calipers) while being far fewer than the mask's voxels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from ...errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
MIDLINE_FRACTION = 0.05  # of the volume's L-R extent, either side of its centre
_ORTHONORMAL_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class VoxelGeometry:
    """Where a (k, j, i) voxel array lies in patient space. `direction` must be orthonormal (as in ITK images)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        spacing = tuple(float(value) for value in np.ravel(self.spacing))
        origin = tuple(float(value) for value in np.ravel(self.origin))
        direction = np.array(self.direction, dtype=float).reshape(3, 3)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise InputError(f"spacing must be three positive numbers (si, sj, sk), got {self.spacing}")
        if len(origin) != 3 or not all(np.isfinite(origin)):
            raise InputError(f"origin must be three finite numbers, got {self.origin}")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
            raise InputError("the direction matrix is not orthonormal; resample the volume to an orthogonal grid")
        direction.setflags(write=False)  # frozen means frozen, also for the array
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray) -> VoxelGeometry:
        """From a 4x4 IJK->RAS matrix (as Slicer's volume nodes give it)."""
        ijk_to_lps = LPS_TO_RAS @ np.asarray(matrix, dtype=float)[:3, :]
        spacing = np.linalg.norm(ijk_to_lps[:, :3], axis=0)
        return cls(tuple(spacing), tuple(ijk_to_lps[:, 3]), ijk_to_lps[:, :3] / spacing)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    @property
    def spacing_kji(self) -> np.ndarray:
        """Spacing in numpy axis order: entry a is the step of numpy axis a in mm."""
        return np.array(self.spacing[::-1])

    def voxel_projection_mm(self) -> np.ndarray:
        """How far one voxel box reaches along the L, P and S axes (its size for axis-aligned volumes)."""
        return np.abs(self.direction) @ np.array(self.spacing)

    def ijk_to_lps(self) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.array(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps()

    def index_to_lps(self, points_kji: np.ndarray) -> np.ndarray:
        """(N, 3) indices in (k, j, i) order (fractions allowed) -> (N, 3) LPS points in mm."""
        points_ijk = np.atleast_2d(np.asarray(points_kji, dtype=float))[:, ::-1]
        return (points_ijk * np.array(self.spacing)) @ self.direction.T + np.array(self.origin)


@dataclass(frozen=True)
class SegmentMeasurements:
    """One segment's numbers, all plain Python values. Geometric fields are None for an empty mask.

    extent_mm: [L-R, A-P, S-I] size of the mask along the patient axes = (largest - smallest coordinate of the
        voxel centres along that axis) + (the projection of one voxel box on that axis), so a single voxel
        measures its own size and an axis-aligned block of n voxels measures n * spacing.
    bbox_lps / bbox_ras: [min corner, max corner] of the same box: voxel-centre extremes -/+ half a voxel's
        projection on each patient axis (extent_mm = max corner - min corner).
    long_axis_mm / short_axis_mm: RECIST-style, on the slice (along numpy axis `slice_axis`) whose longest
        in-plane diameter is largest (the first such slice on ties); the short axis is that slice's caliper
        width perpendicular to the long axis. Both between voxel centres, so a single voxel gives 0.
    """

    voxel_count: int
    volume_ml: float
    slice_axis: int = 0
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    long_axis_slice: int | None = None
    long_axis_endpoints_lps: list[list[float]] | None = None
    long_axis_endpoints_ras: list[list[float]] | None = None
    extent_mm: list[float] | None = None
    centroid_lps: list[float] | None = None
    centroid_ras: list[float] | None = None
    bbox_lps: list[list[float]] | None = None
    bbox_ras: list[list[float]] | None = None
    intensity_mean: float | None = None
    intensity_std: float | None = None
    intensity_min: float | None = None
    intensity_max: float | None = None
    intensity_median: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_segment(mask: np.ndarray, geometry: VoxelGeometry, intensities: np.ndarray | None = None,
                    slice_axis: int = 0) -> SegmentMeasurements:
    """Measure a boolean (k, j, i) mask. `intensities`, when given, has the mask's shape (e.g. the CT in HU)."""
    mask = np.asarray(mask).astype(bool, copy=False)
    _check_inputs(mask, intensities, slice_axis)
    crop = _bounding_slices(mask)
    if crop is None:
        return SegmentMeasurements(voxel_count=0, volume_ml=0.0, slice_axis=slice_axis)
    cropped = mask[crop]
    offset = np.array([part.start for part in crop])
    voxel_count, mean_index = _count_and_mean_index(cropped)
    line_axis = max(axis for axis in range(3) if axis != slice_axis)
    ends = _row_end_points(cropped, line_axis) + offset
    centroid = geometry.index_to_lps(mean_index + offset)[0]
    fields = dict(
        voxel_count=voxel_count,
        volume_ml=voxel_count * geometry.voxel_volume_mm3 / 1000.0,
        slice_axis=slice_axis,
        centroid_lps=_as_list(centroid),
        centroid_ras=_as_list(LPS_TO_RAS @ centroid),
        **_extent_fields(geometry.index_to_lps(ends), geometry.voxel_projection_mm()),
        **_recist_fields(ends, geometry, slice_axis),
    )
    if intensities is not None:
        fields.update(_intensity_fields(np.asarray(intensities)[crop][cropped]))
    return SegmentMeasurements(**fields)


def laterality_of(centroid_lps, geometry: VoxelGeometry, volume_shape) -> str:
    """"left", "right" or "midline": the centroid's L coordinate against the volume centre's.

    `volume_shape` is the numpy (k, j, i) shape. Midline means within MIDLINE_FRACTION of the volume's L-R
    extent (all voxel boxes projected on the L axis) from the centre. LPS +L is the patient's left.
    """
    shape_kji = np.asarray(volume_shape, dtype=float)
    centre_lps = geometry.index_to_lps((shape_kji - 1.0) / 2.0)[0]
    left_right_extent = float(np.abs(geometry.direction[0]) @ (np.array(geometry.spacing) * shape_kji[::-1]))
    offset = float(np.asarray(centroid_lps, dtype=float)[0]) - centre_lps[0]
    if abs(offset) <= MIDLINE_FRACTION * left_right_extent:
        return "midline"
    return "left" if offset > 0 else "right"


def _check_inputs(mask: np.ndarray, intensities: np.ndarray | None, slice_axis: int) -> None:
    if mask.ndim != 3:
        raise InputError(f"the mask must be a 3D (k, j, i) array, got shape {mask.shape}")
    if slice_axis not in (0, 1, 2):
        raise InputError(f"slice_axis must be a numpy axis 0, 1 or 2, got {slice_axis}")
    if intensities is not None and np.shape(intensities) != mask.shape:
        raise InputError(f"intensities of shape {np.shape(intensities)} do not match the mask's {mask.shape}")


def _bounding_slices(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every mask voxel, or None for an empty mask."""
    any_k = mask.any(axis=(1, 2))
    if not any_k.any():
        return None
    any_ji = mask.any(axis=0)
    return tuple(_true_range(flags) for flags in (any_k, any_ji.any(axis=1), any_ji.any(axis=0)))


def _true_range(flags: np.ndarray) -> slice:
    hits = np.flatnonzero(flags)
    return slice(int(hits[0]), int(hits[-1]) + 1)


def _count_and_mean_index(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """Voxel count and mean (k, j, i) index, from marginal counts instead of every voxel's coordinates."""
    per_k = mask.sum(axis=(1, 2))
    per_ji = mask.sum(axis=0)
    count = int(per_k.sum())
    marginals = (per_k, per_ji.sum(axis=1), per_ji.sum(axis=0))
    mean = np.array([np.dot(np.arange(len(m)), m) for m in marginals], dtype=float) / count
    return count, mean


def _row_end_points(mask: np.ndarray, line_axis: int) -> np.ndarray:
    """(N, 3) (k, j, i) indices of the first and last mask voxel of every line along `line_axis`."""
    present = mask.any(axis=line_axis)
    first = np.argmax(mask, axis=line_axis)
    last = mask.shape[line_axis] - 1 - np.argmax(np.flip(mask, axis=line_axis), axis=line_axis)
    where = np.nonzero(present)
    ends = []
    for along in (first[where], last[where]):
        columns = list(where)
        columns.insert(line_axis, along)
        ends.append(np.stack(columns, axis=1))
    return np.concatenate(ends)


def _extent_fields(end_points_lps: np.ndarray, voxel_projection: np.ndarray) -> dict:
    low = end_points_lps.min(axis=0) - voxel_projection / 2.0
    high = end_points_lps.max(axis=0) + voxel_projection / 2.0
    # Negating L and P swaps which corner is the minimum.
    ras_low = np.array([-high[0], -high[1], low[2]])
    ras_high = np.array([-low[0], -low[1], high[2]])
    return dict(extent_mm=_as_list(high - low), bbox_lps=[_as_list(low), _as_list(high)],
                bbox_ras=[_as_list(ras_low), _as_list(ras_high)])


def _recist_fields(ends_kji: np.ndarray, geometry: VoxelGeometry, slice_axis: int) -> dict:
    """Longest in-plane diameter over all slices, and the perpendicular caliper width on that slice."""
    in_plane = [axis for axis in range(3) if axis != slice_axis]
    points_mm = ends_kji[:, in_plane] * geometry.spacing_kji[in_plane]
    order = np.argsort(ends_kji[:, slice_axis], kind="stable")
    slice_ids, starts = np.unique(ends_kji[order, slice_axis], return_index=True)
    best = None  # (length, slice index, endpoint rows into ends_kji, width)
    for slice_id, rows in zip(slice_ids, np.split(order, starts[1:])):
        length, a, b = _diameter(points_mm[rows])
        if best is None or length > best[0]:
            best = (length, int(slice_id), rows[[a, b]], rows)
    length, slice_id, endpoint_rows, rows = best
    width = _caliper_width(points_mm[rows], points_mm[endpoint_rows[1]] - points_mm[endpoint_rows[0]])
    endpoints_lps = geometry.index_to_lps(ends_kji[endpoint_rows])
    return dict(long_axis_mm=float(length), short_axis_mm=float(width), long_axis_slice=slice_id,
                long_axis_endpoints_lps=[_as_list(p) for p in endpoints_lps],
                long_axis_endpoints_ras=[_as_list(LPS_TO_RAS @ p) for p in endpoints_lps])


def _diameter(points: np.ndarray) -> tuple[float, int, int]:
    """Largest distance between two of the 2D points, and the rows of the pair."""
    candidates = _hull_vertices(points)
    chosen = points[candidates]
    squared = ((chosen[:, None, :] - chosen[None, :, :]) ** 2).sum(axis=-1)
    a, b = np.unravel_index(int(np.argmax(squared)), squared.shape)
    return float(np.sqrt(squared[a, b])), int(candidates[a]), int(candidates[b])


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    """Rows that can be ends of the diameter: the convex hull's vertices, or all rows for tiny/collinear sets.

    A degenerate set here has at most two row ends per image row, so comparing all pairs stays cheap.
    """
    if len(points) <= 3:
        return np.arange(len(points))
    try:
        return ConvexHull(points).vertices
    except QhullError:
        return np.arange(len(points))


def _caliper_width(points: np.ndarray, long_axis: np.ndarray) -> float:
    length = np.linalg.norm(long_axis)
    if length == 0:
        return 0.0
    normal = np.array([-long_axis[1], long_axis[0]]) / length
    return float(np.ptp(points @ normal))


def _intensity_fields(values: np.ndarray) -> dict:
    values = values.astype(np.float64, copy=False)  # float32 sums over millions of voxels drift
    return dict(intensity_mean=float(values.mean()), intensity_std=float(values.std()),
                intensity_min=float(values.min()), intensity_max=float(values.max()),
                intensity_median=float(np.median(values)))


def _as_list(vector: np.ndarray) -> list[float]:
    return [float(value) for value in vector]
