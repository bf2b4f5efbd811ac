"""One router per area: health/info, volumes, jobs, 2D images, the OpenAI-compatible endpoints."""
from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request

from ..app import ServiceState
from ..errors import ApiError
from ..jobs import Job, JobEnded


def get_service(request: Request) -> ServiceState:
    return request.app.state.service


Service = Annotated[ServiceState, Depends(get_service)]

JOB_ERROR_STATUS = {"invalid_input": 400, "out_of_memory": 503, "shutdown": 503, "cancelled": 503}


async def run_now(state: ServiceState, job: Job):
    """Queue `job` behind the others and wait for its result (a synchronous request)."""
    state.jobs.submit(job)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(job.future), state.config.request_timeout_s)
    except asyncio.TimeoutError:
        state.jobs.cancel(job)
        raise ApiError(504, f"no result within {state.config.request_timeout_s:g} s (the GPU worker is busy with "
                            f"earlier jobs); try again later") from None
    except JobEnded as ended:
        raise job_failure(ended.job) from None


def job_failure(job: Job) -> ApiError:
    """The HTTP error of a synchronous request whose job failed or was cancelled."""
    error = job.error or {"type": "cancelled", "message": "the request was cancelled"}
    return ApiError(JOB_ERROR_STATUS.get(error["type"], 500), error["message"], type=error["type"])
