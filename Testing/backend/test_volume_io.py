"""Volume I/O: exact geometry in and out, and clear errors for everything that is not a 3D scalar volume."""
from __future__ import annotations

import itertools

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from citrusv_backend.errors import InputError
from citrusv_backend.volume.input.io import Volume, read_volume, write_labelmap

pytestmark = pytest.mark.unit

GEOMETRY_FIELDS = ["pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                   "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "dim", "xyzt_units"]


def oblique_affine(spacing=(0.7, 0.9, 2.5), degrees=17.0, flip=(1, -1, 1), origin=(-80.5, 33.25, 120.0)) -> np.ndarray:
    a = np.radians(degrees)
    rotation = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(np.array(spacing) * np.array(flip))
    affine[:3, 3] = origin
    return affine


def nifti_case(tmp_path, affine, shape=(20, 16, 12), name="case.nii.gz", dtype=np.int16):
    data = np.arange(np.prod(shape), dtype=np.int64).reshape(shape).astype(dtype) - 1000
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    path = tmp_path / name
    nib.save(image, str(path))
    return path, data


@pytest.mark.parametrize("affine", [np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([-0.8, 0.8, 3.0, 1.0]), oblique_affine(),
                                    oblique_affine(flip=(-1, -1, 1), degrees=-31.0)],
                         ids=["ras-identity", "flipped-anisotropic", "oblique", "oblique-lps-like"])
def test_nifti_labelmap_header_is_the_inputs_bit_for_bit(tmp_path, affine):
    path, _ = nifti_case(tmp_path, affine)
    volume = read_volume(path)
    labels = np.zeros(volume.shape, np.uint8)
    labels[3, 5, 7] = 2  # (k, j, i)
    out = write_labelmap(labels, volume, tmp_path / "out_seg.nii.gz")
    original, written = nib.load(str(path)).header, nib.load(str(out)).header
    for field in GEOMETRY_FIELDS:
        assert np.array_equal(original[field], written[field]), field
    data = np.asarray(nib.load(str(out)).dataobj)
    assert data[7, 5, 3] == 2 and data.sum() == 2  # nibabel order (i, j, k)
    # The voxel lands at the same patient position as the input's voxel.
    reread = sitk.ReadImage(str(out))
    ct = sitk.ReadImage(str(path))
    assert reread.TransformIndexToPhysicalPoint((7, 5, 3)) == ct.TransformIndexToPhysicalPoint((7, 5, 3))


def test_nrrd_labelmap_keeps_the_space_fields(tmp_path):
    image = sitk.Image([10, 12, 5], sitk.sitkInt16)
    image.SetSpacing((0.5, 0.75, 4.0))
    image.SetOrigin((12.5, -40.0, 7.25))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, -1))
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    labels = np.zeros(volume.shape, np.uint8)
    labels[4, 11, 9] = 1
    out = write_labelmap(labels, volume, tmp_path / "scan_seg.nrrd")
    original, written = nrrd.read_header(str(path)), nrrd.read_header(str(out))
    for key in ("space", "space origin", "space directions", "sizes"):
        assert np.array_equal(np.asarray(original[key]), np.asarray(written[key])), key
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out)))[4, 11, 9] == 1


def test_real_chest_ct_geometry_round_trip(chest_ct_path, tmp_path):
    volume = read_volume(chest_ct_path)
    assert volume.shape == (34, 128, 128) and volume.modality == "CT" and volume.name == "CTChest4"
    reference = sitk.ReadImage(str(chest_ct_path))
    labels = np.zeros(volume.shape, np.uint8)
    labels[17, 40, 90] = 1
    for name in ("ct_seg.nii.gz", "ct_seg.nrrd"):
        out = sitk.ReadImage(str(write_labelmap(labels, volume, tmp_path / name)))
        assert out.GetSize() == reference.GetSize()
        index = tuple(int(v) for v in np.argwhere(sitk.GetArrayFromImage(out))[0][::-1])
        assert index == (90, 40, 17)
        # NIfTI stores geometry as float32: within 1e-4 mm of the NRRD's positions.
        assert np.allclose(out.TransformIndexToPhysicalPoint(index), reference.TransformIndexToPhysicalPoint(index), atol=1e-4)


def test_volume_from_ijk_to_ras_matches_simpleitk(chest_ct_path):
    reference = sitk.ReadImage(str(chest_ct_path))
    volume = read_volume(chest_ct_path)
    rebuilt = Volume.from_ijk_to_ras(volume.voxels, volume.geometry.ijk_to_ras())
    image = rebuilt.to_sitk()
    for corner in itertools.product((0, 127), (0, 127), (0, 33)):
        assert np.allclose(image.TransformIndexToPhysicalPoint(corner), reference.TransformIndexToPhysicalPoint(corner))
    with pytest.raises(InputError, match="4x4"):
        Volume.from_ijk_to_ras(volume.voxels, np.eye(3))
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(InputError, match="orthonormal"):
        Volume.from_ijk_to_ras(volume.voxels, sheared)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08 this is not a gzip stream")
    with pytest.raises(InputError, match="not a readable volume"):
        read_volume(path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match="not a readable volume"):
        read_volume(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "nowhere.nii.gz")


def test_2d_image_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), str(path))
    with pytest.raises(InputError, match="2D image; a 3D volume is needed.*citrusv infer"):
        read_volume(path)


def test_4d_and_rgb_volumes_are_refused(tmp_path):
    path4d = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.int16), np.eye(4)), str(path4d))
    with pytest.raises(InputError, match="4D image"):
        read_volume(path4d)
    rgb = sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3)
    path_rgb = tmp_path / "colour.nrrd"
    sitk.WriteImage(rgb, str(path_rgb))
    with pytest.raises(InputError, match="3 components per voxel"):
        read_volume(path_rgb)


def test_single_time_point_4d_is_taken_as_3d(tmp_path):
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 1), np.int16), np.eye(4)), str(path))
    assert read_volume(path).shape == (4, 8, 8)


def test_memory_budget_is_checked_before_reading(tmp_path):
    path, _ = nifti_case(tmp_path, np.eye(4), shape=(40, 40, 40))
    with pytest.raises(InputError, match="more than the 10,000 allowed"):
        read_volume(path, max_voxels=10_000)


@pytest.mark.parametrize("dtype, refused", [(np.int16, False), (np.int32, True), (np.float32, True),
                                             (np.float64, True)])
def test_max_voxels_is_counted_in_bytes_of_the_stored_type(tmp_path, dtype, refused):
    """8,000 voxels under a 10,000-voxel limit: as int16 they fit; as int32, float32 (32 KB) or float64 (64 KB)
    they take more memory than 10,000 int16 voxels (20 KB), and are refused before they are read."""
    path, _ = nifti_case(tmp_path, np.eye(4), shape=(20, 20, 20), dtype=dtype)
    if refused:
        with pytest.raises(InputError, match="counted in 2-byte voxels"):
            read_volume(path, max_voxels=10_000)
    else:
        assert read_volume(path, max_voxels=10_000).voxels.dtype == dtype


def test_dicom_series_folder(tmp_path):
    image = sitk.Image([16, 16, 6], sitk.sitkInt16) - 1000
    image.SetSpacing((0.8, 0.8, 2.0))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(6):
        plane = image[:, :, z]
        plane.SetMetaData("0008|0060", "CT")
        plane.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))))
        plane.SetMetaData("0020|0013", str(z))
        plane.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        writer.SetFileName(str(folder / f"{z}.dcm"))
        writer.Execute(plane)
    volume = read_volume(folder)
    assert volume.shape == (6, 16, 16) and volume.modality == "CT"
    assert np.isclose(volume.geometry.spacing[2], 2.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(empty)


def test_truncated_nifti_is_refused_not_zero_filled(tmp_path):
    path, _ = nifti_case(tmp_path, np.eye(4), shape=(32, 32, 16), name="full.nii")
    truncated = tmp_path / "cut.nii"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        read_volume(truncated)
    gz, _ = nifti_case(tmp_path, np.eye(4), shape=(32, 32, 16), name="full.nii.gz")
    cut_gz = tmp_path / "cut.nii.gz"
    cut_gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated|damaged|not a readable"):
        read_volume(cut_gz)
