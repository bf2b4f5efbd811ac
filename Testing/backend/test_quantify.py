"""Segment measurements against shapes whose answers are known analytically or by hand."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from citrusv_backend.errors import InputError
from citrusv_backend.volume.outputs.quantify import SegmentMeasurements, VoxelGeometry, laterality_of, measure_segment

pytestmark = pytest.mark.unit

# Index axes i -> posterior, j -> patient right, k -> inferior: a 90 degree rotation plus a flipped axis.
ROTATED_FLIPPED = np.column_stack([(0, 1, 0), (-1, 0, 0), (0, 0, -1)]).astype(float)
# Index axes i -> superior, j -> left, k -> posterior: a pure permutation.
PERMUTED = np.column_stack([(0, 0, 1), (1, 0, 0), (0, 1, 0)]).astype(float)


def ball(shape_kji, centre_kji, radius_mm, spacing_ijk) -> np.ndarray:
    """Voxels whose centres lie within `radius_mm` of the centre voxel's centre."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape_kji)]
    spacing_kji = spacing_ijk[::-1]
    return sum(((grid[a] - centre_kji[a]) * spacing_kji[a]) ** 2 for a in range(3)) <= radius_mm ** 2


def sphere_case(radius_mm, spacing_ijk):
    """A ball centred on a voxel, with a margin of two voxels around it."""
    shape = [2 * math.ceil(radius_mm / s) + 5 for s in spacing_ijk[::-1]]
    centre = [n // 2 for n in shape]
    return ball(shape, centre, radius_mm, spacing_ijk), centre


def box_mask(shape_kji, k_range, j_range, i_range) -> np.ndarray:
    mask = np.zeros(shape_kji, bool)
    mask[slice(*k_range), slice(*j_range), slice(*i_range)] = True
    return mask


# --- geometry ------------------------------------------------------------------------------------------

def test_geometry_matrices_follow_the_itk_convention():
    geometry = VoxelGeometry((1.0, 2.0, 3.0), (10.0, -20.0, 30.0), ROTATED_FLIPPED)
    expected_lps = np.array([[0, -2, 0, 10], [1, 0, 0, -20], [0, 0, -3, 30], [0, 0, 0, 1]], float)
    np.testing.assert_allclose(geometry.ijk_to_lps(), expected_lps)
    np.testing.assert_allclose(geometry.ijk_to_ras(), np.diag([-1, -1, 1, 1]) @ expected_lps)
    # Index (i, j, k) = (2, 5, 1), given in (k, j, i) order.
    np.testing.assert_allclose(geometry.index_to_lps(np.array([[1, 5, 2]])), [[0.0, -18.0, 27.0]])


def test_geometry_round_trips_through_ijk_to_ras_and_rejects_shear():
    geometry = VoxelGeometry((0.5, 0.7, 2.0), (1.0, 2.0, 3.0), PERMUTED)
    again = VoxelGeometry.from_ijk_to_ras(geometry.ijk_to_ras())
    np.testing.assert_allclose(again.spacing, geometry.spacing)
    np.testing.assert_allclose(again.origin, geometry.origin)
    np.testing.assert_allclose(again.direction, geometry.direction)
    with pytest.raises(InputError, match="orthonormal"):
        VoxelGeometry((1, 1, 1), direction=[[1, 0.3, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(InputError, match="spacing"):
        VoxelGeometry((1, 0, 1))


# --- spheres -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing, radius_mm", [((1.0, 1.0, 1.0), 10.0), ((0.8, 0.8, 2.5), 20.0)])
def test_sphere_volume_diameters_and_extent(spacing, radius_mm):
    mask, centre = sphere_case(radius_mm, spacing)
    result = measure_segment(mask, VoxelGeometry(spacing))
    assert result.volume_ml == pytest.approx(4 / 3 * math.pi * radius_mm ** 3 / 1000, rel=0.03)
    in_plane_voxel = max(spacing[:2])
    assert abs(result.long_axis_mm - 2 * radius_mm) <= in_plane_voxel
    assert abs(result.short_axis_mm - 2 * radius_mm) <= in_plane_voxel
    assert result.long_axis_slice == centre[0]
    for extent, voxel in zip(result.extent_mm, spacing):  # identity direction: L-R = i, A-P = j, S-I = k
        assert abs(extent - 2 * radius_mm) <= voxel
    np.testing.assert_allclose(result.centroid_lps, np.array(centre[::-1]) * spacing, atol=1e-9)


def test_anisotropic_sphere_long_axis_endpoints_lie_on_the_centre_slice():
    spacing = (0.8, 0.8, 2.5)
    mask, centre = sphere_case(20.0, spacing)
    result = measure_segment(mask, VoxelGeometry(spacing))
    ends = np.array(result.long_axis_endpoints_lps)
    np.testing.assert_allclose(ends[:, 2], centre[0] * 2.5)  # both on the S coordinate of the centre slice
    assert np.linalg.norm(ends[0] - ends[1]) == pytest.approx(result.long_axis_mm)
    np.testing.assert_allclose(result.long_axis_endpoints_ras, ends * [-1, -1, 1])


# --- boxes and ellipses --------------------------------------------------------------------------------

def test_box_long_axis_is_the_in_plane_diagonal_and_short_axis_its_perpendicular_caliper():
    spacing = (0.5, 0.7, 2.0)
    mask = box_mask((6, 13, 23), (1, 5), (1, 12), (1, 22))  # 4 slices of 11 x 21 voxels
    result = measure_segment(mask, VoxelGeometry(spacing))
    width, height = 20 * 0.5, 10 * 0.7  # between the outermost voxel centres
    diagonal = math.hypot(width, height)
    assert result.long_axis_mm == pytest.approx(diagonal)
    assert result.short_axis_mm == pytest.approx(2 * width * height / diagonal)
    assert result.long_axis_slice == 1  # every slice ties; the first one wins
    assert result.voxel_count == 4 * 11 * 21
    assert result.volume_ml == pytest.approx(4 * 11 * 21 * 0.5 * 0.7 * 2.0 / 1000)
    np.testing.assert_allclose(result.extent_mm, [21 * 0.5, 11 * 0.7, 4 * 2.0])
    np.testing.assert_allclose(result.bbox_lps, [[0.25, 0.35, 1.0], [10.75, 8.05, 9.0]])
    corners = {(x, y) for x in (0.5, 10.5) for y in (0.7, 7.7)}
    ends = {(round(p[0], 9), round(p[1], 9)) for p in result.long_axis_endpoints_lps}
    assert ends <= corners and len(ends) == 2


@pytest.mark.parametrize("slice_axis, in_plane_mm", [(0, (20 * 0.5, 10 * 0.7)), (1, (3 * 2.0, 20 * 0.5)),
                                                     (2, (3 * 2.0, 10 * 0.7))])
def test_slice_axis_chooses_the_measured_plane(slice_axis, in_plane_mm):
    mask = box_mask((6, 13, 23), (1, 5), (1, 12), (1, 22))
    result = measure_segment(mask, VoxelGeometry((0.5, 0.7, 2.0)), slice_axis=slice_axis)
    assert result.slice_axis == slice_axis
    assert result.long_axis_mm == pytest.approx(math.hypot(*in_plane_mm))
    assert result.long_axis_slice == 1


@pytest.mark.parametrize("angle_degrees", [0.0, 30.0, 90.0])
def test_ellipse_axes_are_twice_its_semi_axes(angle_degrees):
    a, b = 20.0, 8.0
    angle = math.radians(angle_degrees)
    j, i = np.mgrid[-25:26, -25:26].astype(float)
    along, across = i * math.cos(angle) + j * math.sin(angle), -i * math.sin(angle) + j * math.cos(angle)
    mask = np.zeros((3, 51, 51), bool)
    mask[1] = (along / a) ** 2 + (across / b) ** 2 <= 1
    result = measure_segment(mask, VoxelGeometry((1.0, 1.0, 5.0)))
    assert abs(result.long_axis_mm - 2 * a) <= 1.0
    assert abs(result.short_axis_mm - 2 * b) <= 1.0
    ends = np.array(result.long_axis_endpoints_lps)
    direction = (ends[1] - ends[0])[:2] / result.long_axis_mm
    assert abs(np.dot(direction, [math.cos(angle), math.sin(angle)])) > math.cos(math.radians(5))


def test_anisotropic_in_plane_spacing_uses_millimetres_not_voxels():
    # 41 x 11 voxels at 0.25 x 2.0 mm: 10 mm along i, 20 mm along j, so the long axis runs along j.
    j, i = np.mgrid[-5:6, -20:21].astype(float)
    mask = np.zeros((1, 11, 41), bool)
    mask[0] = (i / 20) ** 2 + (j / 5) ** 2 <= 1
    result = measure_segment(mask, VoxelGeometry((0.25, 2.0, 3.0)))
    assert result.long_axis_mm == pytest.approx(20.0)
    assert abs(result.short_axis_mm - 10.0) <= 0.25


@pytest.mark.parametrize("step", [(0, 1), (1, 1)])
def test_collinear_voxels_fall_back_from_the_hull(step):
    mask = np.zeros((3, 12, 12), bool)
    for n in range(10):
        mask[1, 1 + n * step[0], 1 + n * step[1]] = True
    result = measure_segment(mask, VoxelGeometry((0.6, 0.9, 1.0)))
    assert result.long_axis_mm == pytest.approx(9 * math.hypot(0.6 * step[1], 0.9 * step[0]))
    assert result.short_axis_mm == pytest.approx(0.0, abs=1e-9)


# --- single voxel, empty -------------------------------------------------------------------------------

def test_single_voxel_measures_its_own_size_under_a_permuted_direction():
    mask = np.zeros((4, 5, 6), bool)
    mask[2, 3, 4] = True  # k, j, i
    geometry = VoxelGeometry((0.5, 0.7, 2.0), (1.0, 2.0, 3.0), PERMUTED)
    result = measure_segment(mask, geometry)
    assert result.voxel_count == 1
    assert result.volume_ml == pytest.approx(0.5 * 0.7 * 2.0 / 1000)
    assert result.long_axis_mm == 0.0 and result.short_axis_mm == 0.0
    np.testing.assert_allclose(result.extent_mm, [0.7, 2.0, 0.5])  # L-R = j, A-P = k, S-I = i
    # L = 1 + 3 * 0.7, P = 2 + 2 * 2.0, S = 3 + 4 * 0.5
    np.testing.assert_allclose(result.centroid_lps, [3.1, 6.0, 5.0])
    np.testing.assert_allclose(result.centroid_ras, [-3.1, -6.0, 5.0])


def test_empty_mask_gives_zeros_and_nones_without_raising():
    result = measure_segment(np.zeros((4, 5, 6), bool), VoxelGeometry((1, 1, 1)), np.ones((4, 5, 6)))
    data = result.to_dict()
    assert data["voxel_count"] == 0 and data["volume_ml"] == 0.0
    geometric = [name for name in data if name not in ("voxel_count", "volume_ml", "slice_axis")]
    assert geometric and all(data[name] is None for name in geometric)
    json.dumps(data, allow_nan=False)


# --- placement under non-identity geometry -------------------------------------------------------------

def test_centroid_bbox_and_extent_under_rotation_flip_and_origin():
    # Index box i 2..4, j 5..7, k 1..3 with spacing (1, 2, 3), origin (10, -20, 30):
    # L = 10 - 2j in [-4, 0], P = -20 + i in [-18, -16], S = 30 - 3k in [21, 27].
    geometry = VoxelGeometry((1.0, 2.0, 3.0), (10.0, -20.0, 30.0), ROTATED_FLIPPED)
    mask = box_mask((5, 9, 6), (1, 4), (5, 8), (2, 5))
    result = measure_segment(mask, geometry)
    np.testing.assert_allclose(result.centroid_lps, [-2.0, -17.0, 24.0])
    np.testing.assert_allclose(result.centroid_ras, [2.0, 17.0, 24.0])
    # One voxel reaches 2 mm along L (j), 1 mm along P (i), 3 mm along S (k).
    np.testing.assert_allclose(result.extent_mm, [6.0, 3.0, 9.0])
    np.testing.assert_allclose(result.bbox_lps, [[-5.0, -18.5, 19.5], [1.0, -15.5, 28.5]])
    np.testing.assert_allclose(result.bbox_ras, [[-1.0, 15.5, 19.5], [5.0, 18.5, 28.5]])
    assert result.long_axis_mm == pytest.approx(math.hypot(2 * 1.0, 2 * 2.0))


def test_extent_follows_patient_axes_under_a_permuted_direction():
    geometry = VoxelGeometry((0.5, 0.7, 2.0), (0.0, 0.0, 0.0), PERMUTED)  # i -> S, j -> L, k -> P
    mask = box_mask((10, 10, 10), (2, 5), (1, 8), (3, 9))  # 3 k, 7 j, 6 i voxels
    result = measure_segment(mask, geometry)
    np.testing.assert_allclose(result.extent_mm, [7 * 0.7, 3 * 2.0, 6 * 0.5])


# --- intensities, JSON, laterality, speed --------------------------------------------------------------

def test_intensity_statistics_match_numpy():
    rng = np.random.default_rng(7)
    intensities = rng.normal(40.0, 25.0, size=(8, 20, 20)).astype(np.float32)
    mask = ball((8, 20, 20), (4, 10, 10), 3.5, (1.0, 1.0, 1.0))
    result = measure_segment(mask, VoxelGeometry((1, 1, 1)), intensities)
    inside = intensities[mask].astype(np.float64)
    assert result.intensity_mean == pytest.approx(inside.mean())
    assert result.intensity_std == pytest.approx(inside.std())
    assert result.intensity_min == pytest.approx(inside.min())
    assert result.intensity_max == pytest.approx(inside.max())
    assert result.intensity_median == pytest.approx(np.median(inside))
    assert measure_segment(mask, VoxelGeometry((1, 1, 1))).intensity_mean is None
    with pytest.raises(InputError, match="do not match"):
        measure_segment(mask, VoxelGeometry((1, 1, 1)), intensities[:-1])


def test_to_dict_is_plain_json():
    mask, _ = sphere_case(5.0, (1.0, 1.0, 1.0))
    result = measure_segment(mask, VoxelGeometry((1, 1, 1)), mask.astype(np.int16))
    assert isinstance(result, SegmentMeasurements)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data == result.to_dict()
    assert isinstance(data["voxel_count"], int) and isinstance(data["long_axis_slice"], int)


@pytest.mark.parametrize("i_index, flip_i, expected", [(35, False, "left"), (2, False, "right"), (20, False, "midline"),
                                                       (35, True, "right"), (2, True, "left")])
def test_laterality_from_the_centroid(i_index, flip_i, expected):
    direction = np.diag([-1.0 if flip_i else 1.0, 1.0, 1.0])
    geometry = VoxelGeometry((1.0, 1.0, 1.0), (5.0, 0.0, 0.0), direction)
    mask = np.zeros((10, 20, 40), bool)
    mask[4:6, 8:12, i_index:i_index + 2] = True
    centroid = measure_segment(mask, geometry).centroid_lps
    assert laterality_of(centroid, geometry, mask.shape) == expected


def test_large_volume_is_measured_quickly():
    spacing = (0.7, 0.7, 1.0)
    mask = np.zeros((300, 512, 512), bool)
    mask[85:216, 160:353, 160:353] = ball((131, 193, 193), (65, 96, 96), 60.0, spacing)
    started = time.perf_counter()
    result = measure_segment(mask, VoxelGeometry(spacing))
    elapsed = time.perf_counter() - started
    assert abs(result.long_axis_mm - 120.0) <= 0.7
    assert elapsed < 5.0, f"measuring a 512 x 512 x 300 mask took {elapsed:.1f} s"
