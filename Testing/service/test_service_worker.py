"""The job queue and the worker in-process, with stand-in runners: order, exactly-once, cancel, failures
(including GPU out-of-memory) that fail one job and leave the worker running."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from citrusv_backend.errors import InputError
from citrusv_backend.errors import JobCancelled
from citrusv_backend.server.jobs import GpuWorker, Job, JobQueue

pytestmark = pytest.mark.service


@pytest.fixture
def worker():
    freed = []
    queue = JobQueue(max_queued=1000, result_ttl_s=60)
    running = GpuWorker(queue, free_memory=lambda: freed.append(time.monotonic()))
    running.freed = freed
    running.start()
    yield running
    running.stop()


def _done(job: Job, timeout: float = 10) -> Job:
    deadline = time.monotonic() + timeout
    while job.status not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return job


def test_jobs_from_many_threads_run_once_each_in_submission_order(worker):
    ran: list[int] = []
    lock = threading.Lock()

    def runner_for(n):
        def run(job):
            with lock:
                ran.append(n)
            return n
        return run

    jobs: list[Job] = []
    def submit_many(start):
        for n in range(start, start + 50):
            job = Job(task="t", runner=runner_for(n))
            with lock:
                jobs.append(job)
                worker.jobs.submit(job)

    threads = [threading.Thread(target=submit_many, args=(k * 50,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in jobs:
        assert _done(job).status == "done" and job.result == job.future.result()
    assert sorted(ran) == list(range(400)) and ran == [job.result for job in jobs]


def test_out_of_memory_fails_one_job_frees_memory_and_the_next_runs(worker):
    def oom(job):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    failed = _done(worker.jobs.submit(Job(task="t", runner=oom)))
    assert failed.status == "failed" and failed.error["type"] == "out_of_memory"
    assert "ran out of memory" in failed.error["message"] and worker.freed
    assert _done(worker.jobs.submit(Job(task="t", runner=lambda job: "fine"))).result == "fine"


@pytest.mark.parametrize("error, kind", [(InputError("slice range 9:2"), "invalid_input"),
                                         (ZeroDivisionError("bug"), "internal_error")])
def test_errors_fail_the_job_with_a_type(worker, error, kind):
    def broken(job):
        raise error

    job = _done(worker.jobs.submit(Job(task="t", runner=broken)))
    assert job.status == "failed" and job.error["type"] == kind and "Traceback" not in job.error["message"]
    assert worker.alive


def test_cancel_queued_at_once_and_running_at_the_next_check(worker):
    """A queued job is cancelled by the call itself; a running one stops at the first check after the request,
    however long the machine takes to get there (the runner is held between two checks while we cancel)."""
    between_checks, go_on = threading.Event(), threading.Event()
    answers: list[bool] = []

    def stepwise(job):
        for step in range(100):
            answers.append(job.should_cancel())
            if answers[-1]:
                raise JobCancelled("cancelled by the user")
            if step == 2:
                between_checks.set()
                assert go_on.wait(60)
        return "finished"

    running = worker.jobs.submit(Job(task="t", runner=stepwise))
    queued = worker.jobs.submit(Job(task="t", runner=lambda job: pytest.fail("a cancelled job ran")))
    assert between_checks.wait(60), "the first job never started"
    assert worker.jobs.cancel(queued).status == "cancelled"  # at once: no waiting on the worker
    assert worker.jobs.cancel(running).status == "running" and running.cancel_requested
    go_on.set()
    assert _done(running, timeout=60).status == "cancelled"
    assert answers == [False, False, False, True], answers  # stopped at the very next check, not later
    assert running.result is None
    assert _done(worker.jobs.submit(Job(task="t", runner=lambda job: 1)), timeout=60).result == 1


def test_urgent_jobs_run_before_queued_volume_jobs_in_their_own_order(worker):
    """Refinement clicks are urgent: they wait for the running job only, then go in the order they came."""
    gate = threading.Event()
    ran: list[str] = []
    blocker = worker.jobs.submit(Job(task="segment", runner=lambda job: gate.wait(120)))
    while blocker.status != "running":
        time.sleep(0.01)
    for name, urgent in (("volume-1", False), ("click-1", True), ("volume-2", False), ("click-2", True)):
        worker.jobs.submit(Job(task=name, runner=lambda job, name=name: ran.append(name), urgent=urgent))
    assert [w.task for w in worker.jobs._waiting] == ["click-1", "click-2", "volume-1", "volume-2"]
    gate.set()
    deadline = time.monotonic() + 120
    while len(ran) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ran == ["click-1", "click-2", "volume-1", "volume-2"]
