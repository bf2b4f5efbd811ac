"""Radiological display of volume slices by axis permutations and flips only (numpy + SimpleITK geometry)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from citrusv_backend.errors import InputError
from citrusv_backend.volume.orientation import axial_display_orientation, dominant_axes
from citrusv_backend.volume.windowing import CT_PRESETS, Window, parse_window, percentile_window, window_for_prompt

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
    assert parse_window(None, "segment the lung") == CT_PRESETS["lung"]
    with pytest.raises(InputError, match="CENTER,WIDTH"):
        parse_window("wide", "x")
    with pytest.raises(InputError, match="positive"):
        parse_window("10,0", "x")
    mr = np.concatenate([np.zeros(1000), np.linspace(100, 200, 1000)])
    window = parse_window("auto", "x", modality="MR", values=mr)
    assert 99 < window.center - window.width / 2 < 102 and 198 < window.center + window.width / 2 < 201
    assert percentile_window(mr).name.startswith("percentile")
