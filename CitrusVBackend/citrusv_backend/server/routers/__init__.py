"""One router per area: health/info, volumes, jobs, 2D images, the OpenAI-compatible endpoints."""
from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request

from ..errors import ApiError, job_failure  # noqa: F401  (job_failure: imported from here by the routers)
from ..jobs import Job, JobEnded
from ..state import ServiceState


def get_service(request: Request) -> ServiceState:
    return request.app.state.service


Service = Annotated[ServiceState, Depends(get_service)]


async def client_gone(request: Request) -> None:
    """Returns once the client has closed its connection. Only after the request body has been read: from then
    on the server's receive() has nothing to give but the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_now(state: ServiceState, job: Job, request: Request | None = None):
    """Queue `job` behind the others and wait for its result (a synchronous request). The job is cancelled
    when the wait times out (504) or, given the `request`, when its client hangs up (499): a queued job leaves
    the queue, a running one stops at its next check (`Job.should_cancel`, e.g. between decoded tokens)."""
    state.jobs.submit(job)
    result = asyncio.ensure_future(asyncio.wrap_future(job.future))
    gone = asyncio.ensure_future(client_gone(request)) if request is not None else None
    try:
        done, _ = await asyncio.wait([w for w in (result, gone) if w is not None], timeout=state.config.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        if gone is not None:
            gone.cancel()
    if result not in done:
        result.cancel()
        state.jobs.cancel(job)
        if gone in done:
            raise ApiError(499, "the client closed the connection; its request was cancelled")
        raise ApiError(504, f"no result within {state.config.request_timeout_s:g} s (the GPU worker is busy with "
                            f"earlier jobs); try again later")
    try:
        return result.result()
    except JobEnded as ended:
        raise job_failure(ended.job) from None

