"""The job queue over HTTP: cancel mid-job, cancel while queued, and 8 clients at once."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service_helpers import log_lines, png_base64, submit, upload, wait

pytestmark = pytest.mark.service


def test_cancel_a_running_job_and_the_next_one_still_runs(client, chest):
    volume_id = upload(client, chest)
    long_job = submit(client, volume_id, "segment", "segment the left lung", mode="per-slice")  # 34 slices, one by one
    queued_job = submit(client, volume_id, "segment", "segment the left lung", mode="per-slice")
    wait(client, long_job, until=("running",))
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{long_job}").json()["progress"]["fraction"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)

    # A queued job is cancelled at once, and never runs.
    response = client.delete(f"/v1/jobs/{queued_job}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    asked = time.monotonic()
    response = client.delete(f"/v1/jobs/{long_job}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    status = wait(client, long_job, timeout=10)
    assert status["status"] == "cancelled" and time.monotonic() - asked < 5, status
    assert status["progress"]["fraction"] < 1.0
    result = client.get(f"/v1/jobs/{long_job}/result")
    assert result.status_code == 409 and result.json()["error"]["type"] == "job_cancelled"

    next_job = submit(client, volume_id, "ask", "What organ is this?", max_new_tokens=2)
    assert wait(client, next_job)["status"] == "done"
    assert client.get(f"/v1/jobs/{queued_job}").json()["timings"]["run_s"] == 0


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
