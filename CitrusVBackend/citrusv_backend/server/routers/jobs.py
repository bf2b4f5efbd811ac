"""Jobs on an uploaded volume: POST /v1/jobs, GET /v1/jobs/{id} (status, progress), DELETE (cancel),
GET /v1/jobs/{id}/result (409 until the job is done), GET /v1/jobs/{id}/dicom/{name} (its DICOM SEG / SR)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import ApiError
from ..jobs import CANCELLED, DONE, FAILED, Job
from ..schemas import JobInfo, JobRequest
from ..tasks import validate_volume_job, volume_runner
from . import Service

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202, response_model=JobInfo)
def submit_job(body: JobRequest, request: Request, state: Service) -> dict:
    stored = state.volumes.get(body.volume_id)
    validate_volume_job(body, stored.volume, state.config.max_new_tokens)
    features = state.refine.features_for(stored.id, stored.volume) if body.task == "segment" else None
    job = Job(task=body.task, runner=volume_runner(state.engine, stored.id, stored.volume, body, features),
              volume_id=stored.id, release=state.volumes.hold(stored))
    try:
        state.jobs.submit(job)
    except ApiError:
        job.release()
        raise
    request.scope["state"]["job_id"] = job.id
    return state.jobs.describe(job)


@router.get("/v1/jobs/{job_id}", response_model=JobInfo)
def get_job(job_id: str, state: Service) -> dict:
    return state.jobs.describe(state.jobs.get(job_id))


@router.delete("/v1/jobs/{job_id}", response_model=JobInfo,
               responses={202: {"description": "running: asked to stop at the next slice"}})
def cancel_job(job_id: str, request: Request, state: Service):
    job = state.jobs.cancel(state.jobs.get(job_id))
    request.scope["state"]["job_id"] = job.id
    description = state.jobs.describe(job)
    return JSONResponse(description, status_code=202 if job.status == "running" else 200)


@router.get("/v1/jobs/{job_id}/result")
def job_result(job_id: str, state: Service) -> Response:
    job = state.jobs.get(job_id)
    if job.status == DONE:
        return Response(job.result, media_type="application/json")
    if job.status == FAILED:
        raise ApiError(409, f"job {job_id} failed: {job.error['message']}", type="job_failed")
    if job.status == CANCELLED:
        raise ApiError(409, f"job {job_id} was cancelled; it has no result", type="job_cancelled")
    raise ApiError(409, f"job {job_id} is {job.status} ({job.stage}, {job.fraction:.0%}); poll GET /v1/jobs/{job_id} "
                        f"until its status is 'done'", type="not_ready")


@router.get("/v1/jobs/{job_id}/dicom/{name}", responses={200: {"content": {"application/dicom": {}}}})
def job_dicom(job_id: str, name: str, state: Service) -> Response:
    job = state.jobs.get(job_id)
    if job.status != DONE:
        return job_result(job_id, state)  # the same 409 as the result
    data = job.attachments.get(name)
    if data is None:
        raise ApiError(404, f"job {job_id} has no DICOM object {name!r}"
                            + (f"; it has {', '.join(sorted(job.attachments))}" if job.attachments else
                               "; ask for one with options.dicom_out (or upload the volume with its DICOM reference)"),
                       type="not_found")
    return Response(data, media_type="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{name}.dcm"'})
