"""POST /v1/volumes (upload once: compressed voxels + IJK->RAS as JSON, raw voxel bytes with the geometry in a header
(see ../raw_upload.py), or a NIfTI/NRRD/MHA file as multipart), GET and DELETE /v1/volumes/{id}."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ...volume.dicom_series import series_from_reference
from ...volume.io import NIFTI_SUFFIXES, Volume, case_name, read_volume
from .. import raw_upload
from ..codec import b64decode, voxels_from_bytes
from ..errors import ApiError
from ..schemas import DicomReference, VolumeInfo, VolumeUpload
from . import Service

router = APIRouter(tags=["volumes"])

# Single-file formats only: a detached header (.nhdr, .mhd) would name a data file the server cannot have.
FILE_SUFFIXES = NIFTI_SUFFIXES + (".nrrd", ".mha")
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VolumeUpload.model_json_schema()},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
        "the little-endian voxel bytes, C order [k, j, i]; geometry in the X-CitrusV-Volume header (JSON: "
        + ", ".join(raw_upload.RawVolumeHeader.model_fields) + ")")}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
        "modality": {"type": "string", "enum": ["CT", "MR", "PET"]}}}}}}}


@router.post("/v1/volumes", status_code=201, response_model=VolumeInfo, openapi_extra=UPLOAD_BODY)
async def upload_volume(request: Request, state: Service) -> dict:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if kind == "application/json":
            volume = await _from_json(request, state)
        elif kind == "application/octet-stream":
            volume = await raw_upload.from_raw(request, state)
        elif kind == "multipart/form-data":
            volume = await _from_file(request, state)
        else:
            raise ApiError(415, "send the volume as application/json (voxels + ijk_to_ras), as application/octet-stream "
                                "(raw voxels, geometry in the X-CitrusV-Volume header) or as multipart/form-data "
                                "with a NIfTI/NRRD/MHA file in the field 'file'")
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the upload was complete", type="client_disconnected") from None
    stored = state.volumes.add(volume)
    request.scope["state"]["volume_id"] = stored.id
    return stored.describe(state.config.volume_ttl_s, state.volumes.clock())


@router.get("/v1/volumes/{volume_id}", response_model=VolumeInfo)
def get_volume(volume_id: str, state: Service) -> dict:
    return state.volumes.get(volume_id).describe(state.config.volume_ttl_s, state.volumes.clock())


@router.put("/v1/volumes/{volume_id}/dicom", response_model=VolumeInfo)
def attach_dicom(volume_id: str, body: DicomReference, state: Service) -> dict:
    """The DICOM series a raw upload's voxels are (the JSON form carries it inline; a header is too small for it)."""
    stored = state.volumes.get(volume_id)
    volume = stored.volume
    volume.dicom = series_from_reference(body.model_dump(), volume.geometry, volume.shape)  # refused unless it fits
    return stored.describe(state.config.volume_ttl_s, state.volumes.clock())


@router.delete("/v1/volumes/{volume_id}")
def delete_volume(volume_id: str, state: Service) -> dict:
    state.volumes.delete(volume_id)
    return {"volume_id": volume_id, "deleted": True}


async def _from_json(request: Request, state) -> Volume:
    body = bytearray()  # not request.body(): that would keep a second reference alive until the response
    async for chunk in request.stream():
        body += chunk
    holder = [body]
    del body
    # Parsing and inflating a large upload takes a while: off the event loop, so other requests go on.
    return await run_in_threadpool(_decode_upload, holder, state)


def _decode_upload(holder: list, state) -> Volume:
    body = holder.pop()  # the only reference: freed as soon as it is parsed
    try:
        upload = VolumeUpload.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_input=False)) from None
    del body
    count = int(np.prod(upload.shape, dtype=np.int64))
    if count > state.config.max_voxels:
        raise ApiError(413, f"the volume has {count:,} voxels, more than the {state.config.max_voxels:,} this server "
                            f"accepts (--max-voxels); crop or resample it first")
    state.volumes.check_fits(count * np.dtype(upload.dtype).itemsize)  # before decoding, not after
    voxels = voxels_from_bytes(b64decode(upload.voxels, "voxels"), upload.compression, upload.dtype, upload.shape)
    volume = Volume.from_ijk_to_ras(voxels, np.array(upload.ijk_to_ras, dtype=float), name=upload.name,
                                    modality=upload.modality)
    if upload.dicom is not None:  # refused unless it describes exactly these slices
        volume.dicom = series_from_reference(upload.dicom.model_dump(), volume.geometry, volume.shape)
    return volume


async def _from_file(request: Request, state) -> Volume:
    async with request.form(max_files=1, max_fields=4) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile) or not file.filename:
            raise ApiError(400, "a multipart upload needs the volume file in the field 'file' (with its file name)")
        suffix = next((s for s in FILE_SUFFIXES if file.filename.lower().endswith(s)), None)
        if suffix is None:
            raise ApiError(400, f"{file.filename!r}: send a single-file NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MHA "
                                f"(.mha) volume (detached headers cannot be uploaded)")
        name, modality = form.get("name"), form.get("modality")
        if modality is not None and modality not in ("CT", "MR", "PET"):
            raise ApiError(400, f"modality {modality!r}: use CT, MR or PET")
        path = state.tmp_dir / f"{uuid.uuid4().hex}{suffix}"
        try:
            await run_in_threadpool(_save, file, path)
            _refuse_detached_data(path, suffix)
            volume = await run_in_threadpool(read_volume, path, state.config.max_voxels)
        finally:
            path.unlink(missing_ok=True)
    base = file.filename.replace("\\", "/").rsplit("/", 1)[-1]
    volume.name = (name if isinstance(name, str) and name.strip() else case_name(Path(base)) or "volume")[:200]
    volume.source_path = None  # the temporary file is gone
    if modality:
        volume.modality = modality
    return volume


def _refuse_detached_data(path: Path, suffix: str) -> None:
    """A NRRD or MHA header may name another file as its data ("data file: /etc/..."): the server would read its
    own files as voxels. Only self-contained files are accepted."""
    if suffix not in (".nrrd", ".mha"):
        return
    with open(path, "rb") as handle:
        header = handle.read(1 << 16).split(b"\n\n", 1)[0].lower()
    for line in header.splitlines():
        key, _, value = line.partition(b":" if suffix == ".nrrd" else b"=")
        key = key.strip()
        if (suffix == ".nrrd" and key in (b"data file", b"datafile")) or \
                (suffix == ".mha" and key == b"elementdatafile" and value.strip() != b"local"):
            raise ApiError(400, f"the uploaded {suffix} header refers to a separate data file; upload a file that "
                                f"holds its own voxels")


def _save(file: UploadFile, path) -> None:
    file.file.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(file.file, out, 1 << 20)
