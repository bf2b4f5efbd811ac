"""Interactive refinement of a segment of an uploaded volume:

PUT    /v1/volumes/{id}/segments/{segment}          start (or restart) a session: from a job and/or a mask
GET    /v1/volumes/{id}/segments/{segment}          its state and current mask (to resynchronise a client)
POST   /v1/volumes/{id}/segments/{segment}/refine   points / a box -> the changed crop
POST   /v1/volumes/{id}/segments/{segment}/undo     one step back  -> the changed crop
POST   /v1/volumes/{id}/segments/{segment}/redo     one step again -> the changed crop
DELETE /v1/volumes/{id}/segments/{segment}          end the session
GET    /v1/volumes/{id}/segments                    the volume's sessions
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool

from ...refine.server_schemas import SEGMENT_NAME, RefineRequest, SessionInfo, SessionRequest, StepRequest, StepResult
from ...refine.server_service import refine_runner, run_step, session_payload, start_session
from ..errors import ApiError
from ..jobs import Job
from . import Service, run_now

router = APIRouter(tags=["refine"])
SegmentName = Annotated[str, Path(pattern=SEGMENT_NAME, description="the client's name for the segment")]
PATH = "/v1/volumes/{volume_id}/segments/{segment}"


@router.put(PATH, status_code=201, response_model=SessionInfo)
async def start(volume_id: str, segment: SegmentName, body: SessionRequest, request: Request, state: Service) -> dict:
    stored = state.volumes.get(volume_id)
    request.scope["state"]["volume_id"] = volume_id
    entry = await run_in_threadpool(start_session, state, volume_id, segment, stored.volume, body)
    return session_payload(entry)


@router.get(PATH, response_model=SessionInfo)
async def get(volume_id: str, segment: SegmentName, state: Service) -> dict:
    state.volumes.get(volume_id)
    entry = state.refine.get(volume_id, segment)
    return await run_in_threadpool(session_payload, entry, True)


@router.get("/v1/volumes/{volume_id}/segments")
def list_sessions(volume_id: str, state: Service) -> dict:
    state.volumes.get(volume_id)
    return {"volume_id": volume_id, "segments": state.refine.list(volume_id)}


@router.delete(PATH)
def end(volume_id: str, segment: SegmentName, state: Service) -> dict:
    state.refine.close(volume_id, segment)
    return {"volume_id": volume_id, "segment": segment, "deleted": True}


@router.post(PATH + "/refine", response_model=StepResult)
async def refine(volume_id: str, segment: SegmentName, body: RefineRequest, state: Service) -> dict:
    state.volumes.get(volume_id)  # refreshes the volume's TTL: a session in use keeps its volume
    entry = state.refine.get(volume_id, segment)
    job = Job(task="refine", runner=refine_runner(entry, body), volume_id=volume_id, kept=False, urgent=True)
    return _answer(await run_now(state, job))


@router.post(PATH + "/undo", response_model=StepResult)
async def undo(volume_id: str, segment: SegmentName, state: Service, body: StepRequest | None = None) -> dict:
    return await _step(volume_id, segment, "undo", body, state)


@router.post(PATH + "/redo", response_model=StepResult)
async def redo(volume_id: str, segment: SegmentName, state: Service, body: StepRequest | None = None) -> dict:
    return await _step(volume_id, segment, "redo", body, state)


async def _step(volume_id: str, segment: str, kind: str, body: StepRequest | None, state) -> dict:
    state.volumes.get(volume_id)
    entry = state.refine.get(volume_id, segment)
    # No model involved: the session's lock orders it with the clicks, the GPU worker is not needed.
    return _answer(await run_in_threadpool(run_step, entry, kind, body.expected_version if body else None))


def _answer(payload: dict) -> dict:
    if "conflict" in payload:
        raise ApiError(409, payload["conflict"], type="version_conflict")
    if "nothing" in payload:
        raise ApiError(409, payload["nothing"], type=f"nothing_to_{payload['kind']}")
    return payload
