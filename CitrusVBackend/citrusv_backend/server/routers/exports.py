"""POST /v1/volumes/{id}/dicom-export (a DICOM SEG + SR of the segments the client holds, e.g. after editing),
GET /v1/exports/{export_id}/{seg|sr} (the objects' bytes). See ../exports.py."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response

from ...volume.outputs.dicom_out import model_name
from ..exports import ExportRequest, run_export
from . import Service

router = APIRouter(tags=["exports"])


@router.post("/v1/volumes/{volume_id}/dicom-export")
def dicom_export(volume_id: str, body: ExportRequest, state: Service) -> dict:
    stored = state.volumes.get(volume_id)
    release = state.volumes.hold(stored)
    try:
        return run_export(state, stored.id, stored.volume, body, model_name(state.engine.loaded.describe()))
    finally:
        release()


@router.get("/v1/exports/{export_id}/{name}", responses={200: {"content": {"application/dicom": {}}}})
def export_object(export_id: str, name: Literal["seg", "sr"], state: Service) -> Response:
    return Response(state.exports.get(export_id, name), media_type="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{name}.dcm"'})
