"""Radiological display of volume slices by axis permutations and flips only (numpy + SimpleITK geometry)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from citrusv_backend.errors import InputError
from citrusv_backend.volume.slices.orientation import (axial_display_orientation, convert_pixels, display_orientation,
                                                       dominant_axes, model_orientation)
from citrusv_backend.volume.slices.windowing import (CT_PRESETS, Window, parse_window, percentile_window,
                                                     window_for_prompt)

pytestmark = pytest.mark.unit


def rotation_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def permuted_directions():
    """Every axis permutation with every sign pattern (48 directions), plus oblique ones."""
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            matrix = np.zeros((3, 3))
            for index_axis, world_axis in enumerate(perm):
                matrix[world_axis, index_axis] = signs[index_axis]
            yield matrix
    yield rotation_z(20)
    yield rotation_z(-35) @ np.diag([1, -1, 1])


def marked_volume(direction: np.ndarray, world_offset_lps: np.ndarray) -> tuple[np.ndarray, sitk.Image]:
    """A 24x20x16 volume with one bright voxel at centre + `world_offset_lps` (mm)."""
    image = sitk.Image([24, 20, 16], sitk.sitkInt16)
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetDirection(tuple(direction.flatten()))
    centre_index = np.array(image.GetSize()) / 2.0
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index.tolist()))
    image.SetOrigin(tuple(-centre))  # centre of the volume at the world origin
    marker = image.TransformPhysicalPointToIndex(tuple(world_offset_lps.astype(float)))
    voxels = np.zeros(image.GetSize()[::-1], np.int16)
    voxels[marker[2], marker[1], marker[0]] = 1000
    return voxels, image


@pytest.mark.parametrize("direction", list(permuted_directions()), ids=lambda d: str(np.round(d, 2).tolist()))
def test_patient_left_is_image_right_and_anterior_is_up(direction):
    # Patient left (+L) and anterior (-P) of the centre, in the slice through the centre.
    voxels, image = marked_volume(direction, np.array([9.0, -9.0, 0.0]))
    orientation = axial_display_orientation(np.array(image.GetDirection()))
    index = int(np.argwhere(voxels)[0][orientation.slice_axis])
    plane = orientation.slice(voxels, index)
    row, col = np.argwhere(plane == 1000)[0]
    assert col > plane.shape[1] / 2, "patient left must be on the image's right"
    assert row < plane.shape[0] / 2, "anterior must be at the top"
    # The slice axis is the one closest to superior.
    assert orientation.slice_axis == 2 - int(np.argmax(np.abs(np.asarray(direction)[2])))


def test_identity_lps_needs_no_flip_and_ras_needs_two():
    identity = axial_display_orientation(np.eye(3))
    assert (identity.slice_axis, identity.row_axis, identity.col_axis) == (0, 1, 2)
    assert not identity.flip_rows and not identity.flip_cols
    ras = axial_display_orientation(np.diag([-1.0, -1.0, 1.0]))
    assert ras.flip_rows and ras.flip_cols


def test_put_slice_is_the_exact_inverse_of_slice():
    rng = np.random.default_rng(0)
    for direction in list(permuted_directions())[::5]:
        volume = rng.integers(0, 1000, (7, 9, 11))
        orientation = axial_display_orientation(direction)
        rebuilt = np.zeros_like(volume)
        for index in range(volume.shape[orientation.slice_axis]):
            orientation.put_slice(rebuilt, index, orientation.slice(volume, index))
        assert np.array_equal(rebuilt, volume)


def test_slice_out_of_range_and_wrong_shape():
    orientation = axial_display_orientation(np.eye(3))
    with pytest.raises(InputError, match="outside the volume"):
        orientation.slice(np.zeros((3, 4, 5)), 3)
    with pytest.raises(InputError, match="does not fit"):
        orientation.put_slice(np.zeros((3, 4, 5)), 0, np.zeros((5, 4)))


def test_strongly_oblique_directions_still_give_a_permutation():
    assert sorted(dominant_axes(rotation_z(45.0))) == [0, 1, 2]


def test_real_chest_ct_orientation(chest_ct_path):
    image = sitk.ReadImage(str(chest_ct_path))
    orientation = axial_display_orientation(np.array(image.GetDirection()))
    assert orientation.slice_axis == 0 and orientation.slice(sitk.GetArrayViewFromImage(image), 17).shape == (128, 128)


def test_window_arithmetic():
    window = Window(40, 400)
    assert window.apply(np.array([-160, 40, 240, -1000, 3000])).tolist() == [0, 128, 255, 0, 255]
    assert CT_PRESETS["lung"].apply(np.array([-600])).tolist() == [128]


@pytest.mark.parametrize("prompt, preset", [
    ("Please segment the left lung.", "lung"), ("segment the pulmonary nodule", "lung"),
    ("Find the rib fracture", "bone"), ("segment the liver", "liver"), ("the spleen", "soft_tissue"),
    ("intracranial hemorrhage", "brain"),
])
def test_window_from_prompt(prompt, preset):
    assert window_for_prompt(prompt) == CT_PRESETS[preset]


def test_parse_window_forms():
    assert parse_window("bone", "x") == CT_PRESETS["bone"]
    assert parse_window("50,350", "x") == Window(50.0, 350.0)
    assert parse_window("clinical", "segment the lung") == CT_PRESETS["lung"]
    ct = np.concatenate([np.full(100, -3024), np.linspace(-1000, 1000, 10000)])
    assert parse_window(None, "segment the lung", values=ct).name == "training"
    with pytest.raises(InputError, match="needs the volume"):
        parse_window("auto", "segment the lung")
    with pytest.raises(InputError, match="CENTER,WIDTH"):
        parse_window("wide", "x")
    with pytest.raises(InputError, match="positive"):
        parse_window("10,0", "x")
    mr = np.concatenate([np.zeros(1000), np.linspace(100, 200, 1000)])
    window = parse_window("auto", "x", modality="MR", values=mr)
    assert 99 < window.center - window.width / 2 < 102 and 198 < window.center + window.width / 2 < 201
    assert percentile_window(mr).name.startswith("percentile")


# ---------------------------------------------------------------------------------------------- model orientation
# SA-Med2D-20M exported slices in the voxel array's own order (`x_`/`y_`/`z_` in its names): its coronal sample
# `ct_00--MSD_Liver--liver_123--y_0175.png` (jdh-algo/Citrus-V asset/) has the pelvis at the top and the lungs at
# the bottom. The model orientation gives a standard (LPS) volume's array order; previews keep the display.

def test_model_slices_of_a_standard_volume_are_its_array_order():
    volume = np.arange(5 * 6 * 7).reshape(5, 6, 7)  # (k, j, i)
    assert np.array_equal(model_orientation(np.eye(3), "axial").slice(volume, 2), volume[2])
    assert np.array_equal(model_orientation(np.eye(3), "coronal").slice(volume, 3), volume[:, 3, :])
    assert np.array_equal(model_orientation(np.eye(3), "sagittal").slice(volume, 4), volume[:, :, 4])


@pytest.mark.parametrize("direction", list(permuted_directions())[::3], ids=lambda d: str(np.round(d, 2).tolist()))
@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_model_puts_superior_at_the_bottom_and_display_at_the_top(direction, plane):
    voxels, image = marked_volume(direction, np.array([0.0, 0.0, 12.0]))  # superior of the centre
    for orientation, superior_at_bottom in ((model_orientation(direction, plane), True),
                                            (display_orientation(direction, plane), False)):
        index = int(np.argwhere(voxels)[0][orientation.slice_axis])
        row = np.argwhere(orientation.slice(voxels, index) == 1000)[0][0]
        height = orientation.plane_shape(voxels.shape)[0]
        assert bool(row > height / 2) is superior_at_bottom, (plane, superior_at_bottom)
    model, display = model_orientation(direction, plane), display_orientation(direction, plane)
    assert (model.slice_axis, model.row_axis, model.col_axis, model.flip_cols) == \
           (display.slice_axis, display.row_axis, display.col_axis, display.flip_cols)
    assert model.flip_rows != display.flip_rows, "only the superior-inferior direction differs"


def test_axial_model_slices_are_the_radiological_display():
    for direction in permuted_directions():
        assert model_orientation(direction, "axial") == display_orientation(direction, "axial")


def test_model_orientation_maps_back_exactly_and_converts_pixels():
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 1000, (7, 9, 11))
    for direction in list(permuted_directions())[::7]:
        model, display = model_orientation(direction, "coronal"), display_orientation(direction, "coronal")
        rebuilt = np.zeros_like(volume)
        for index in range(volume.shape[model.slice_axis]):
            model.put_slice(rebuilt, index, model.slice(volume, index))
        assert np.array_equal(rebuilt, volume)
        plane_m, plane_d = model.slice(volume, 2), display.slice(volume, 2)
        rows, cols = np.array([0, 3, plane_m.shape[0] - 1]), np.array([1, 0, 4])
        new_rows, new_cols = convert_pixels(model, display, rows, cols, volume.shape)
        assert np.array_equal(plane_d[new_rows.astype(int), new_cols.astype(int)], plane_m[rows, cols])


def test_real_chest_ct_coronal_model_slice_has_the_neck_at_the_bottom(chest_ct_path, chest_ct_segmentation_path):
    import slicerio

    labels = slicerio.read_segmentation(str(chest_ct_segmentation_path))["voxels"].transpose(2, 1, 0)
    direction = np.array(sitk.ReadImage(str(chest_ct_path)).GetDirection())
    cervical, lumbar = (labels == 2), (labels == 4)  # cervical / lumbar vertebral column
    for orientation, neck_below in ((model_orientation(direction, "coronal"), True),
                                    (display_orientation(direction, "coronal"), False)):
        rows = lambda mask: np.argwhere(orientation.arrange(mask.any(axis=orientation.slice_axis)))[:, 0].mean()  # noqa: E731
        assert bool(rows(cervical) > rows(lumbar)) is neck_below
