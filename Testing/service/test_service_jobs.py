"""The job queue over HTTP: cancel mid-job, cancel while queued, and 8 clients at once."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service_helpers import log_lines, png_base64, submit, upload, wait

pytestmark = pytest.mark.service


def _job_events(log_path, job_ids) -> list[tuple[str, str, str | None]]:
    """(message, job id, status) of the server's job log lines for these jobs, in the order they were logged."""
    return [(line["message"], line["job_id"], line.get("status")) for line in log_lines(log_path)
            if line.get("job_id") in job_ids and line.get("message") in ("job started", "job finished")]


def test_cancel_a_running_job_and_the_next_one_still_runs(client, chest, session_dir):
    """Behaviour, not speed (a loaded CI machine may take seconds per slice; bench/ measures how fast): a queued
    job is cancelled by the request itself and never starts; a running one stops part-way with status
    cancelled and no result; the worker then runs the next job."""
    volume_id = upload(client, chest)
    long_job = submit(client, volume_id, "segment", "segment the left lung", mode="per-slice")  # 34 slices, one by one
    queued_job = submit(client, volume_id, "segment", "segment the left lung", mode="per-slice")
    wait(client, long_job, until=("running",), timeout=120)
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{long_job}").json()["progress"]["fraction"] == 0:
        assert time.monotonic() < deadline, "the long job never reported progress"
        time.sleep(0.05)

    # A queued job is cancelled at once, and never runs.
    response = client.delete(f"/v1/jobs/{queued_job}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    response = client.delete(f"/v1/jobs/{long_job}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    status = wait(client, long_job, timeout=120)
    assert status["status"] == "cancelled", status
    assert status["progress"]["fraction"] < 1.0, status  # stopped part-way, not run to the end
    result = client.get(f"/v1/jobs/{long_job}/result")
    assert result.status_code == 409 and result.json()["error"]["type"] == "job_cancelled"

    next_job = submit(client, volume_id, "ask", "What organ is this?", max_new_tokens=2)
    assert wait(client, next_job, timeout=120)["status"] == "done"
    assert client.get(f"/v1/jobs/{queued_job}").json()["timings"]["run_s"] == 0

    expected = [("job started", long_job, None), ("job finished", long_job, "cancelled"),
                ("job started", next_job, None), ("job finished", next_job, "done")]
    jobs = {long_job, queued_job, next_job}
    deadline = time.monotonic() + 60
    while [event for event in _job_events(session_dir / "server.log", jobs) if event[1] != queued_job] != expected:
        assert time.monotonic() < deadline, _job_events(session_dir / "server.log", jobs)
        time.sleep(0.1)
    assert ("job started", queued_job, None) not in _job_events(session_dir / "server.log", jobs)


def test_eight_clients_at_once_each_job_runs_once_with_the_sequential_result(server, chest, ct_slice_rgb, session_dir):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=180) as setup:
        volume_id = upload(setup, chest)
    image = png_base64(ct_slice_rgb)
    requests = [(15 + n % 4, f"What is at position {n}?") for n in range(8)]

    def one_client(item):
        slice_index, question = item
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=180) as http:
            job_id = submit(http, volume_id, "segment", "segment the left lung", mode="per-slice",
                            slice_range=[slice_index, slice_index + 1])
            answer = http.post("/v1/images/infer", json={"image": image, "prompt": question, "max_new_tokens": 3,
                                                         "min_pixels": 3136, "max_pixels": 12544})
            assert answer.status_code == 200, answer.text
            assert wait(http, job_id, timeout=180)["status"] == "done"
            result = http.get(f"/v1/jobs/{job_id}/result").json()
            return job_id, _essence(result), answer.json()["generated_ids"]

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one_client, requests))
    sequential = [one_client(item) for item in requests]

    assert len({job_id for job_id, _, _ in concurrent + sequential}) == 16
    for (_, together, text_together), (_, alone, text_alone) in zip(concurrent, sequential):
        assert together == alone and text_together == text_alone
    time.sleep(0.3)
    started = [line["job_id"] for line in log_lines(session_dir / "server.log") if line.get("message") == "job started"]
    for job_id, _, _ in concurrent + sequential:
        assert started.count(job_id) == 1


def _essence(result: dict) -> tuple:
    return tuple((s["label"], s["name"], s["slices"], s["mask"] and (s["mask"]["offset"], s["mask"]["shape"],
                                                                    s["mask"]["data"])) for s in result["segments"])
