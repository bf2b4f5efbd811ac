"""The job queue and the one GPU worker thread that runs jobs in submission order.

Any number of clients may submit; each job is taken from the queue exactly once, under one lock, so nothing
submitted is lost or run twice. A queued job is cancelled at once; a running one stops at the next check
between slices (the pipeline's `should_cancel` hook). A failing job — bad input found late, GPU out of
memory, a bug — fails alone: the worker frees what it can and goes on with the next job.
"""
from __future__ import annotations

import concurrent.futures
import gc
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import CitrusVError
from ..volume.pipeline import JobCancelled
from .errors import ApiError
from .logs import log_event

log = logging.getLogger("citrusv.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
REMEMBERED_EXPIRED = 10_000


@dataclass
class Job:
    task: str
    runner: Callable[["Job"], Any]      # runs on the worker thread; its return value is the result
    volume_id: str | None = None
    kept: bool = True                   # False: a synchronous request answers it directly, nothing is stored
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = QUEUED
    stage: str = "queued"
    fraction: float = 0.0
    message: str = ""
    error: dict | None = None
    result: Any = None
    attachments: dict = field(default_factory=dict)   # name -> bytes served beside the result (DICOM objects)
    cancel_requested: bool = False
    created_at: float = field(default_factory=time.time)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    # hooks for the runner (VolumePipeline's progress / should_cancel)
    def progress(self, stage: str, fraction: float, message: str) -> None:
        self.stage, self.fraction, self.message = stage, float(min(max(fraction, 0.0), 1.0)), message

    def should_cancel(self) -> bool:
        return self.cancel_requested

    def timings(self) -> dict:
        now = time.monotonic()
        queued = (self.started or self.finished or now) - self.created
        run = ((self.finished or now) - self.started) if self.started else 0.0
        return {"queued_s": round(queued, 3), "run_s": round(run, 3)}

    def describe(self, queue_position: int | None = None) -> dict:
        return {"job_id": self.id, "task": self.task, "volume_id": self.volume_id, "status": self.status,
                "progress": {"stage": self.stage, "fraction": round(self.fraction, 4), "message": self.message},
                "queue_position": queue_position, "cancel_requested": self.cancel_requested, "error": self.error,
                "created_at": self.created_at, "timings": self.timings(),
                "result_url": f"/v1/jobs/{self.id}/result" if self.status == DONE else None}


class JobQueue:
    """FIFO of jobs waiting for the worker, and the kept jobs by id until their results expire."""

    def __init__(self, max_queued: int, result_ttl_s: float, max_kept: int = 1000, clock=time.monotonic):
        self.max_queued = max_queued
        self.result_ttl_s = result_ttl_s
        self.max_kept = max_kept
        self.clock = clock
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._expired: OrderedDict[str, str] = OrderedDict()
        self._changed = threading.Condition()
        self._stopping = False

    # ------------------------------------------------------------------------------------------ clients

    def submit(self, job: Job) -> Job:
        with self._changed:
            if self._stopping:
                raise ApiError(503, "the server is shutting down")
            if len(self._waiting) >= self.max_queued:
                raise ApiError(429, f"{len(self._waiting)} jobs are already waiting (the most the server queues); "
                                    f"try again when some have finished", headers={"Retry-After": "5"})
            self._expire()
            self._waiting.append(job)
            if job.kept:
                self._jobs[job.id] = job
            self._changed.notify_all()
        log_event(log, "job queued", job_id=job.id, task=job.task, volume_id=job.volume_id, kept=job.kept)
        return job

    def get(self, job_id: str) -> Job:
        with self._changed:
            self._expire()
            job = self._jobs.get(job_id)
            if job is None:
                raise self._missing(job_id)
            return job

    def describe(self, job: Job) -> dict:
        with self._changed:
            position = next((n for n, waiting in enumerate(self._waiting) if waiting is job), None)
            return job.describe(position)

    def cancel(self, job: Job) -> Job:
        """A queued job is cancelled at once; a running one is asked to stop; a finished one is forgotten."""
        with self._changed:
            if job.status == QUEUED:
                self._waiting.remove(job)
                self._finish(job, CANCELLED, error=None)
            elif job.status == RUNNING:
                job.cancel_requested = True
                job.message = "cancelling"
            else:
                self._jobs.pop(job.id, None)
                self._remember(job.id, "deleted by a client")
        return job

    def stats(self) -> dict:
        with self._changed:
            return {"waiting": len(self._waiting), "kept": len(self._jobs), "max_queued": self.max_queued,
                    "result_ttl_s": self.result_ttl_s,
                    "running": next((j.id for j in self._jobs.values() if j.status == RUNNING), None)}

    # ------------------------------------------------------------------------------------------ worker

    def take(self) -> Job | None:
        """The next job, now running; None once the queue is stopped."""
        with self._changed:
            while not self._waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return None
            job = self._waiting.popleft()
            job.status, job.started, job.stage, job.message = RUNNING, self.clock(), "starting", ""
            return job

    def finish(self, job: Job, status: str, result: Any = None, error: dict | None = None) -> None:
        with self._changed:
            self._finish(job, status, result, error)

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            for job in list(self._waiting):
                self._finish(job, CANCELLED, error={"type": "shutdown", "message": "the server shut down"})
            self._waiting.clear()
            for job in self._jobs.values():
                job.cancel_requested = True
            self._changed.notify_all()

    # ------------------------------------------------------------------------------------------ internals

    def _finish(self, job: Job, status: str, result: Any = None, error: dict | None = None) -> None:
        job.status, job.finished, job.error = status, self.clock(), error
        job.result = result if job.kept else None
        job.stage = {DONE: "done", FAILED: "failed", CANCELLED: "cancelled"}[status]
        job.fraction = 1.0 if status == DONE else job.fraction
        if not job.future.done():
            if status == DONE:
                job.future.set_result(result)
            else:
                job.future.set_exception(JobEnded(job))
        self._changed.notify_all()
        log_event(log, "job finished", job_id=job.id, task=job.task, status=status, **job.timings(),
                  **({"error_type": error["type"]} if error else {}))

    def _expire(self) -> None:
        now = self.clock()
        finished = [j for j in self._jobs.values() if j.status in FINISHED]
        for job in finished:
            if now - job.finished > self.result_ttl_s:
                self._jobs.pop(job.id)
                self._remember(job.id, f"its result was kept for {self.result_ttl_s:g} s after it finished")
        for job in finished[: max(0, len(self._jobs) - self.max_kept)]:
            if job.id in self._jobs:
                self._jobs.pop(job.id)
                self._remember(job.id, f"the server keeps at most {self.max_kept} jobs")

    def _remember(self, job_id: str, reason: str) -> None:
        self._expired[job_id] = reason
        while len(self._expired) > REMEMBERED_EXPIRED:
            self._expired.popitem(last=False)

    def _missing(self, job_id: str) -> ApiError:
        reason = self._expired.get(job_id)
        if reason is not None:
            return ApiError(404, f"job {job_id} is gone ({reason})", type="job_expired")
        return ApiError(404, f"no job {job_id!r}", type="job_not_found")


class JobEnded(Exception):
    """Set on a job's future when it did not finish with a result (failed or cancelled)."""

    def __init__(self, job: Job):
        super().__init__(job.error["message"] if job.error else job.status)
        self.job = job


class GpuWorker:
    """One thread: takes jobs in order and runs them; the model is only ever used from this thread."""

    def __init__(self, jobs: JobQueue, free_memory: Callable[[], None] = lambda: None):
        self.jobs = jobs
        self.free_memory = free_memory
        self._thread = threading.Thread(target=self._loop, name="citrusv-gpu-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.jobs.stop()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while (job := self.jobs.take()) is not None:
            log_event(log, "job started", job_id=job.id, task=job.task, **job.timings())
            try:
                self.jobs.finish(job, *self._run(job))
            except Exception:  # never let the worker thread die: the next job must still run
                log.exception("worker error", extra={"fields": {"job_id": job.id}})

    def _run(self, job: Job) -> tuple:
        outcome = self._attempt(job)
        if outcome[0] != DONE:
            self._release()  # after the except blocks: their tracebacks no longer hold the job's tensors
        return outcome

    def _attempt(self, job: Job) -> tuple:
        import torch

        try:
            return DONE, job.runner(job)
        except JobCancelled:
            return CANCELLED, None, None
        except CitrusVError as error:
            return FAILED, None, {"type": "invalid_input", "message": str(error)}
        except (torch.cuda.OutOfMemoryError, MemoryError) as error:
            where = "GPU" if isinstance(error, torch.cuda.OutOfMemoryError) else "server"
            log.warning("job ran out of memory", extra={"fields": {"job_id": job.id, "where": where}})
            return FAILED, None, {"type": "out_of_memory", "message": (
                f"the {where} ran out of memory during this job; it was stopped and the memory freed. Try a "
                f"smaller slice range or max_pixels, or close other programs using the {where}")}
        except Exception as error:
            log.exception("job failed unexpectedly", extra={"fields": {"job_id": job.id}})
            return FAILED, None, {"type": "internal_error",
                                  "message": f"unexpected error ({type(error).__name__}); see the server log for job {job.id}"}

    def _release(self) -> None:
        """Free what a failed or cancelled job left behind, so the GPU is free again within a second."""
        gc.collect()
        self.free_memory()
