"""From an upload's bytes to a volume, with nothing of its claimed size allocated before it is checked.

`admit` is the one size check every kind of upload passes (JSON voxels, volume files, raw bytes): `--max-voxels`
counted in bytes of the stored type, then the memory budget, which is reserved for the volume until it is
stored. A volume file is read only from the bytes received: its whole header is parsed, any reference to
another file is refused, the voxel bytes it claims must be there, and the image reader is given a copy with a
header written here (see `volume.input.headers`), read with the reader of the format the content has.
"""
from __future__ import annotations

import math
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..errors import TooLargeError
from ..volume.input.dicom_series import series_from_reference
from ..volume.input.headers import (DETACHED_SUFFIXES, read_header, refuse_external, require_voxel_bytes,
                                    write_self_contained)
from ..volume.input.io import NIFTI_SUFFIXES, Volume, case_name, check_volume_size, read_volume
from .codec import b64decode, voxels_from_bytes
from .errors import ApiError
from .schemas import VolumeUpload
from .volumes import Reservation

FILE_SUFFIXES = NIFTI_SUFFIXES + (".nrrd", ".mha")


def admit(state, shape, itemsize: int, what: str = "the volume") -> Reservation:
    """Room for a volume of `shape` x `itemsize` bytes: 413 beyond --max-voxels or the whole budget, 503 while
    the budget is held by volumes in use. Use it as `with admit(...) as reservation:` and pass the reservation
    to `state.volumes.add`; whatever is not stored is given back when the block ends."""
    size = " x ".join(str(int(n)) for n in shape)
    state.volumes.check_fits(math.prod(int(n) for n in shape) * itemsize, f"{what} ({size} voxels)")
    try:
        nbytes = check_volume_size(shape, itemsize, state.config.max_voxels, what)
    except TooLargeError as error:
        raise ApiError(413, str(error)) from None
    return state.volumes.reserve(nbytes)


# ---------------------------------------------------------------------------------------------- JSON voxels

def decode_json_upload(holder: list, state) -> tuple[Volume, Reservation]:
    """`holder`: a one-item list with the request body, taken out so it is freed as soon as it is parsed."""
    body = holder.pop()
    try:
        upload = VolumeUpload.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_input=False)) from None
    del body
    reservation = admit(state, upload.shape, np.dtype(upload.dtype).itemsize)
    try:
        voxels = voxels_from_bytes(b64decode(upload.voxels, "voxels"), upload.compression, upload.dtype, upload.shape)
        volume = Volume.from_ijk_to_ras(voxels, np.array(upload.ijk_to_ras, dtype=float), name=upload.name,
                                        modality=upload.modality)
        if upload.dicom is not None:  # refused unless it describes exactly these slices
            volume.dicom = series_from_reference(upload.dicom.model_dump(), volume.geometry, volume.shape)
    except BaseException:
        reservation.release()
        raise
    return volume, reservation


# ---------------------------------------------------------------------------------------------- volume files

def check_file_name(filename: str) -> str:
    lower = filename.lower()
    if lower.endswith(DETACHED_SUFFIXES):
        raise ApiError(400, f"{filename!r} is one half of a detached header/data pair (its voxels are in another file); "
                            f"upload a single-file volume instead: .nrrd, .mha, .nii or .nii.gz")
    if not lower.endswith(FILE_SUFFIXES):
        raise ApiError(400, f"{filename!r}: send a single-file NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MHA (.mha) "
                            f"volume (detached headers cannot be uploaded)")
    return filename


def read_volume_file(upload, filename: str, state) -> tuple[Volume, Reservation]:
    """A volume from an uploaded file object (the bytes received, nothing else)."""
    what = filename.replace("\\", "/").rsplit("/", 1)[-1][:120]
    header = read_header(upload, what)
    refuse_external(header, what)
    state.volumes.check_fits(header.data_bytes, f"{what} ({' x '.join(map(str, header.shape))} voxels)")
    check_volume_size(header.shape + (header.components,), header.itemsize, state.config.max_voxels, what)
    require_voxel_bytes(header, upload, what)
    folder = Path(state.tmp_dir) / uuid.uuid4().hex  # named like the upload, so messages name the user's file
    copy = folder / (re.sub(r"[^A-Za-z0-9._-]", "_", case_name(Path(what)))[:100] + header.suffix)
    reservations: list[Reservation] = []
    try:
        folder.mkdir()
        write_self_contained(header, upload, copy)
        volume = read_volume(copy, state.config.max_voxels, image_io=header.image_io,
                             before_reading=lambda nbytes: reservations.append(state.volumes.reserve(nbytes)))
    except BaseException:
        for reservation in reservations:
            reservation.release()
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    volume.source_path = None  # the copy is gone
    return volume, reservations[0]
