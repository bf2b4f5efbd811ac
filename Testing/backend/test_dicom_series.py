"""Reading DICOM series folders: the real chest CT as a scanner writes it, oblique series, and every way an
archive breaks one (issue 13 item 7: a broken file, a lost slice, mixed orientations are refused or, if asked,
skipped with a warning; never read silently with wrong geometry)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_series_maker import NOT_TO_COPY, PATIENT, chest_ct_series, rotation, write_ct_series

from citrusv_backend.errors import InputError
from citrusv_backend.volume.input.dicom_series import IDENTITY_KEYWORDS, series_from_reference
from citrusv_backend.volume.input.io import read_volume

pytestmark = pytest.mark.unit
TILT = rotation(20.0, -15.0, 30.0)


@pytest.fixture(scope="module")
def chest_series(chest_ct_path, tmp_path_factory):
    return chest_ct_series(chest_ct_path, tmp_path_factory.mktemp("dicom") / "chest")


def copy_series(series, tmp_path: Path) -> Path:
    folder = tmp_path / "series"
    shutil.copytree(series.folder, folder)
    return folder


def small_series(tmp_path: Path, name: str = "small", depth: int = 6, direction=None, **kwargs):
    voxels = (np.arange(depth * 12 * 10).reshape(depth, 12, 10) % 700 - 300).astype(np.int16)
    return voxels, write_ct_series(voxels, (0.8, 0.7, 2.0), (10.0, -20.0, 30.0),
                                   np.eye(3) if direction is None else direction, tmp_path / name, **kwargs)


def test_chest_ct_series_reads_back_as_the_ct_it_was_made_from(chest_series, chest_ct_path):
    reference = read_volume(chest_ct_path)
    volume = read_volume(chest_series.folder)
    assert volume.shape == reference.shape == (34, 128, 128) and volume.modality == "CT"
    assert np.array_equal(volume.voxels, np.clip(reference.voxels, -1024, 3071))  # 12-bit storage + intercept
    assert np.allclose(volume.geometry.ijk_to_lps(), reference.geometry.ijk_to_lps(), atol=1e-4)
    # Files are named head-to-feet; slice k is the k-th along the normal, whatever the names say.
    series = volume.dicom
    assert [i.sop_instance_uid for i in series.instances] == chest_series.sop_uids
    assert series.frame_of_reference_uid == chest_series.frame_of_reference_uid
    assert series.slice_spacing == pytest.approx(10.0) and series.warnings == []
    assert series.identity == {k: v for k, v in PATIENT.items() if k in IDENTITY_KEYWORDS}
    assert not set(NOT_TO_COPY) & set(series.identity)


def test_an_oblique_tilted_series_keeps_its_exact_geometry(chest_ct_path, tmp_path):
    made = chest_ct_series(chest_ct_path, tmp_path / "tilted", direction=TILT)
    volume = read_volume(made.folder)
    assert np.allclose(volume.geometry.direction, TILT, atol=1e-7)
    for k in (0, 17, 33):
        position = [float(v) for v in pydicom.dcmread(made.files[k]).ImagePositionPatient]
        assert np.allclose(volume.geometry.index_to_lps([[k, 0, 0]])[0], position, atol=1e-5)
    assert [i.sop_instance_uid for i in volume.dicom.instances] == made.sop_uids


def test_one_broken_file_is_refused_not_bridged_with_averaged_spacing(chest_series, tmp_path):
    """Before: GDCM left the file out and ITK averaged the spacing (2.67 mm instead of 2); case marked done."""
    voxels, made = small_series(tmp_path, depth=4)
    made.files[2].write_bytes(made.files[2].read_bytes()[:200] + b"\xff" * 50)  # a damaged copy
    with pytest.raises(InputError, match=r"DICOM series refused, 1 unreadable file\(s\): IM0002.dcm"):
        read_volume(made.folder)
    with pytest.raises(InputError, match="uneven slice positions"):  # leaving it out leaves a gap
        read_volume(made.folder, on_bad_dicom="skip")


def test_a_truncated_file_is_refused(tmp_path):
    _, made = small_series(tmp_path)
    data = made.files[3].read_bytes()
    made.files[3].write_bytes(data[: len(data) - 40])
    with pytest.raises(InputError, match="truncated: pixel data needs"):
        read_volume(made.folder)


def test_a_missing_slice_is_refused_even_when_skipping(tmp_path):
    _, made = small_series(tmp_path)
    made.files[3].unlink()
    for policy in ("refuse", "skip"):
        with pytest.raises(InputError, match=r"uneven slice positions .* 2 mm apart, except .*: 4 mm"):
            read_volume(made.folder, on_bad_dicom=policy)


def test_uneven_positions_are_refused(tmp_path):
    voxels, made = small_series(tmp_path)
    moved = pydicom.dcmread(made.files[4])
    moved.ImagePositionPatient = [10.0, -20.0, 30.0 + 4 * 2.0 + 0.7]
    moved.save_as(made.files[4])
    with pytest.raises(InputError, match="uneven slice positions"):
        read_volume(made.folder)


def test_mixed_orientations_are_refused_or_the_odd_image_skipped_with_a_warning(tmp_path):
    voxels, made = small_series(tmp_path)
    _, scout = small_series(tmp_path, name="scout", depth=1, direction=rotation(90, 0, 0))
    odd = pydicom.dcmread(scout.files[0])
    odd.SeriesInstanceUID = pydicom.dcmread(made.files[0]).SeriesInstanceUID  # a localizer filed in the series
    odd.save_as(made.folder / "SCOUT.dcm")
    with pytest.raises(InputError, match=r"another orientation.*\(mixed orientations\): SCOUT.dcm"):
        read_volume(made.folder)
    volume = read_volume(made.folder, on_bad_dicom="skip")
    assert volume.shape == voxels.shape and np.array_equal(volume.voxels, voxels)
    assert len(volume.dicom.warnings) == 1 and "SCOUT.dcm" in volume.dicom.warnings[0]


def test_gantry_tilt_is_refused_with_what_to_do(tmp_path):
    _, made = small_series(tmp_path, shear_mm=0.5)
    with pytest.raises(InputError, match="gantry tilt about .* degrees.*resample"):
        read_volume(made.folder, on_bad_dicom="skip")


def test_two_series_in_one_folder_are_refused(tmp_path):
    _, first = small_series(tmp_path, name="a")
    _, second = small_series(tmp_path, name="b")
    shutil.copy(second.files[0], first.folder / "other.dcm")
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_volume(first.folder)


def test_copies_and_non_dicom_files_do_not_break_a_series(tmp_path):
    voxels, made = small_series(tmp_path)
    shutil.copy(made.files[2], made.folder / "copy-of-IM0004.dcm")
    (made.folder / "notes.txt").write_text("scanned on tuesday")
    volume = read_volume(made.folder)
    assert np.array_equal(volume.voxels, voxels)
    assert volume.dicom.warnings == ["left out copy-of-IM0004.dcm: a copy of IM0004.dcm"] or \
        volume.dicom.warnings == ["left out IM0004.dcm: a copy of copy-of-IM0004.dcm"]


def test_a_client_reference_must_describe_the_uploaded_slices(chest_series, chest_ct_path):
    volume = read_volume(chest_ct_path)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in chest_series.files]
    reference = {"study_instance_uid": chest_series.study_uid, "series_instance_uid": chest_series.series_uid,
                 "frame_of_reference_uid": chest_series.frame_of_reference_uid,
                 "sop_class_uid": datasets[0].SOPClassUID, "sop_instance_uids": chest_series.sop_uids,
                 "positions": [[float(v) for v in d.ImagePositionPatient] for d in datasets],
                 "identity": {"PatientID": "CVTEST-0042", "PatientAddress": "never kept"}}
    series = series_from_reference(reference, volume.geometry, volume.shape)
    assert series.identity == {"PatientID": "CVTEST-0042"}
    assert [i.sop_instance_uid for i in series.instances] == chest_series.sop_uids
    with pytest.raises(InputError, match="names 33 instance"):
        series_from_reference(reference | {"sop_instance_uids": chest_series.sop_uids[:-1]}, volume.geometry,
                              volume.shape)
    shifted = [list(p) for p in reference["positions"]]
    shifted[5][2] += 3.0
    with pytest.raises(InputError, match="up to 3 mm from where the uploaded volume puts its slices"):
        series_from_reference(reference | {"positions": shifted}, volume.geometry, volume.shape)
