"""How volume slices become 2D images: for the model (its training convention) and for people (display).

Display orientation (previews): radiological convention, patient right on the image's left; anterior up in
axial slices, superior up in coronal and sagittal ones, anterior on the left in sagittal ones.

Model orientation (what the model is shown): SA-Med2D-20M, the source of Citrus-V's segmentation data,
exported each slice in the voxel array's own order along the sliced axis (`x_`, `y_`, `z_` in its file
names). For a volume stored in the standard order (LPS: i to patient left, j to posterior, k to superior)
that is: axial slices as the radiological display, coronal and sagittal slices with **superior at the
bottom** (the reference's coronal sample `ct_00--MSD_Liver--liver_123--y_0175.png` has the pelvis at the top
and the lungs at the bottom). The model orientation reproduces that array order for any stored direction
(flipped, permuted, oblique), so the model always sees a slice as a standard volume's array would give it.

Both mappings use only axis permutations and flips (no resampling), so every pixel is exactly one voxel and
masks map back without interpolation. For oblique volumes each array axis is assigned the patient axis it is
closest to.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InputError

# World axes in LPS (the frame of ITK/DICOM/NRRD headers): 0 = Left, 1 = Posterior, 2 = Superior.
LPS_LEFT, LPS_POSTERIOR, LPS_SUPERIOR = 0, 1, 2


@dataclass(frozen=True)
class DisplayOrientation:
    """How a numpy volume (k, j, i order, as SimpleITK returns it) becomes 2D slices along one plane."""

    slice_axis: int   # numpy axis stepped through
    row_axis: int     # numpy axis shown top to bottom
    col_axis: int     # numpy axis shown left to right
    flip_rows: bool
    flip_cols: bool

    def slice(self, volume: np.ndarray, index: int) -> np.ndarray:
        """The 2D image of slice `index` (along slice_axis), in this orientation."""
        if not 0 <= index < volume.shape[self.slice_axis]:
            raise InputError(f"slice {index} is outside the volume (0..{volume.shape[self.slice_axis] - 1})")
        return self.arrange(np.take(volume, index, axis=self.slice_axis))

    def arrange(self, plane: np.ndarray) -> np.ndarray:
        """A 2D array over the two in-plane axes (numpy order, e.g. a projection along slice_axis) -> this
        orientation's rows and columns."""
        remaining = [axis for axis in range(3) if axis != self.slice_axis]
        plane = plane if remaining.index(self.row_axis) == 0 else plane.T
        if self.flip_rows:
            plane = plane[::-1, :]
        if self.flip_cols:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)

    def plane_shape(self, volume_shape: tuple[int, int, int]) -> tuple[int, int]:
        return volume_shape[self.row_axis], volume_shape[self.col_axis]

    def display_to_index(self, slice_index: int, rows: np.ndarray, cols: np.ndarray,
                         volume_shape: tuple[int, int, int]) -> np.ndarray:
        """Display pixel (row, col) of slice `slice_index` -> voxel index (k, j, i), as float arrays [N, 3].

        Fractional pixel positions are kept (box corners lie between pixel centres)."""
        height, width = self.plane_shape(volume_shape)
        rows = np.asarray(rows, dtype=float)
        cols = np.asarray(cols, dtype=float)
        rows = (height - 1) - rows if self.flip_rows else rows
        cols = (width - 1) - cols if self.flip_cols else cols
        points = np.zeros((rows.size, 3))
        points[:, self.slice_axis] = slice_index
        points[:, self.row_axis] = rows.ravel()
        points[:, self.col_axis] = cols.ravel()
        return points

    def put_slice(self, volume: np.ndarray, index: int, plane: np.ndarray) -> None:
        """Write a display-oriented 2D array back into slice `index` of `volume`: the exact inverse of `slice`."""
        if self.flip_cols:
            plane = plane[:, ::-1]
        if self.flip_rows:
            plane = plane[::-1, :]
        remaining = [axis for axis in range(3) if axis != self.slice_axis]
        plane = plane if remaining.index(self.row_axis) == 0 else plane.T
        target = [slice(None)] * 3
        target[self.slice_axis] = index
        expected = tuple(volume.shape[axis] for axis in remaining)
        if plane.shape != expected:
            raise InputError(f"slice of shape {plane.shape} does not fit the volume's {expected}")
        volume[tuple(target)] = plane


def dominant_axes(direction: np.ndarray) -> list[int]:
    """For each index axis (i, j, k), the LPS world axis its direction is closest to (a permutation)."""
    matrix = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))
    assigned: list[int | None] = [None, None, None]
    # Greedy on the largest cosines first, so strongly oblique volumes still get a permutation.
    for flat in np.argsort(-matrix, axis=None):
        world, index_axis = divmod(int(flat), 3)
        if assigned[index_axis] is None and world not in assigned:
            assigned[index_axis] = world
    return [int(a) for a in assigned]


# plane -> (world axis sliced through, (world axis down the rows, sign), (world axis along the columns, sign)).
# Radiological display convention: patient right on the image's left; anterior up (axial); superior up
# (coronal, sagittal); anterior on the left (sagittal).
PLANES = {
    "axial": (LPS_SUPERIOR, (LPS_POSTERIOR, +1), (LPS_LEFT, +1)),
    "coronal": (LPS_POSTERIOR, (LPS_SUPERIOR, -1), (LPS_LEFT, +1)),
    "sagittal": (LPS_LEFT, (LPS_SUPERIOR, -1), (LPS_POSTERIOR, +1)),
}


# The model's input (SA-Med2D's array order of a standard LPS volume): rows and columns run along increasing
# i, j, k; only coronal and sagittal rows differ from the display (superior at the bottom).
MODEL_PLANES = {
    "axial": PLANES["axial"],
    "coronal": (LPS_POSTERIOR, (LPS_SUPERIOR, +1), (LPS_LEFT, +1)),
    "sagittal": (LPS_LEFT, (LPS_SUPERIOR, +1), (LPS_POSTERIOR, +1)),
}


def display_orientation(direction: np.ndarray, plane: str = "axial") -> DisplayOrientation:
    """`direction`: the 3x3 ITK direction (columns = LPS directions of index axes i, j, k)."""
    return _orientation(direction, plane, PLANES)


def model_orientation(direction: np.ndarray, plane: str = "axial") -> DisplayOrientation:
    """How slices along `plane` are shown to the model: the training data's (SA-Med2D's) convention."""
    return _orientation(direction, plane, MODEL_PLANES)


def convert_pixels(source: DisplayOrientation, target: DisplayOrientation, rows: np.ndarray, cols: np.ndarray,
                   volume_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (fractional allowed) in one orientation's slice -> the same voxels in another's (same
    slice axis)."""
    if source.slice_axis != target.slice_axis:
        raise InputError("both orientations must slice along the same axis")
    points = source.display_to_index(0, rows, cols, volume_shape)
    height, width = target.plane_shape(volume_shape)
    new_rows, new_cols = points[:, target.row_axis], points[:, target.col_axis]
    new_rows = (height - 1) - new_rows if target.flip_rows else new_rows
    new_cols = (width - 1) - new_cols if target.flip_cols else new_cols
    return new_rows, new_cols


def _orientation(direction: np.ndarray, plane: str, table: dict) -> DisplayOrientation:
    if plane not in table:
        raise InputError(f"unknown slice plane {plane!r}; use one of {', '.join(table)}")
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    world_of_index = dominant_axes(matrix)
    index_of_world = {world: index for index, world in enumerate(world_of_index)}
    to_numpy = lambda index_axis: 2 - index_axis  # noqa: E731  numpy order is (k, j, i)
    slice_world, (row_world, row_sign), (col_world, col_sign) = table[plane]
    row_index, col_index = index_of_world[row_world], index_of_world[col_world]
    return DisplayOrientation(
        slice_axis=to_numpy(index_of_world[slice_world]), row_axis=to_numpy(row_index), col_axis=to_numpy(col_index),
        # Flip an axis when its index direction runs against the wanted display direction.
        flip_rows=bool(matrix[row_world, row_index] * row_sign < 0),
        flip_cols=bool(matrix[col_world, col_index] * col_sign < 0))


def axial_display_orientation(direction: np.ndarray) -> DisplayOrientation:
    return display_orientation(direction, "axial")
