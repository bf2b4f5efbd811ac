"""POST /v1/volumes (upload once: compressed voxels + IJK->RAS as JSON, raw voxel bytes with the geometry in a header
(see ../raw_upload.py), or a NIfTI/NRRD/MHA file as multipart), GET and DELETE /v1/volumes/{id}."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ...volume.input.dicom_series import series_from_reference
from ...volume.input.io import Volume, case_name
from .. import raw_upload
from ..errors import ApiError
from ..schemas import DicomReference, VolumeInfo, VolumeUpload
from ..uploads import check_file_name, decode_json_upload, read_volume_file
from ..volumes import Reservation
from . import Service

router = APIRouter(tags=["volumes"])

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
            volume, reservation = await _from_json(request, state)
        elif kind == "application/octet-stream":
            volume, reservation = await raw_upload.from_raw(request, state)
        elif kind == "multipart/form-data":
            volume, reservation = await _from_file(request, state)
        else:
            raise ApiError(415, "send the volume as application/json (voxels + ijk_to_ras), as application/octet-stream "
                                "(raw voxels, geometry in the X-CitrusV-Volume header) or as multipart/form-data "
                                "with a NIfTI/NRRD/MHA file in the field 'file'")
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the upload was complete", type="client_disconnected") from None
    with reservation:
        stored = state.volumes.add(volume, reservation)
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


async def _from_json(request: Request, state) -> tuple[Volume, Reservation]:
    body = bytearray()  # not request.body(): that would keep a second reference alive until the response
    async for chunk in request.stream():
        body += chunk
    holder = [body]
    del body
    # Parsing and inflating a large upload takes a while: off the event loop, so other requests go on.
    return await run_in_threadpool(decode_json_upload, holder, state)


async def _from_file(request: Request, state) -> tuple[Volume, Reservation]:
    async with request.form(max_files=1, max_fields=4) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile) or not file.filename:
            raise ApiError(400, "a multipart upload needs the volume file in the field 'file' (with its file name)")
        check_file_name(file.filename)
        name, modality = form.get("name"), form.get("modality")
        if modality is not None and modality not in ("CT", "MR", "PET"):
            raise ApiError(400, f"modality {modality!r}: use CT, MR or PET")
        volume, reservation = await run_in_threadpool(read_volume_file, file.file, file.filename, state)
    base = file.filename.replace("\\", "/").rsplit("/", 1)[-1]
    volume.name = (name if isinstance(name, str) and name.strip() else case_name(Path(base)) or "volume")[:200]
    if modality:
        volume.modality = modality
    return volume, reservation
