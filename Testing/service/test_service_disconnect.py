"""Synchronous 2D and chat requests whose client hangs up are cancelled: their jobs leave the queue, or stop
at the next decoded token, instead of keeping the one GPU worker busy for nobody."""
from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from service_helpers import log_lines, png_base64

pytestmark = pytest.mark.service

LONG = 1500  # tokens: the random tiny model rarely stops early, so one such answer keeps the worker ~15 s busy


def _send_and_hang_up(server, path: str, body: dict) -> None:
    data = json.dumps(body).encode()
    with socket.create_connection((server.ready["host"], server.ready["port"]), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(0.3)  # the server has the whole request and has queued or started it


def test_abandoned_image_and_chat_requests_are_cancelled(server, client, session_dir):
    image = png_base64(np.random.default_rng(1).integers(0, 255, size=(32, 32, 3)).astype(np.uint8))
    infer = {"image": image, "prompt": "Describe this image.", "task": "ask", "max_new_tokens": LONG,
             "min_pixels": 784, "max_pixels": 3136}
    chat = {"model": "CitrusV_8B", "max_tokens": LONG, "citrusv": {"task": "ask", "min_pixels": 784, "max_pixels": 3136},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": "Describe this image."}]}]}
    started = time.monotonic()
    for _ in range(2):
        _send_and_hang_up(server, "/v1/images/infer", infer)
        _send_and_hang_up(server, "/v1/chat/completions", chat)
    # Four abandoned answers of 1500 tokens would keep the worker busy for a minute; cancelled, it is idle at once.
    deadline = started + 20
    while (jobs := client.get("/v1/info").json()["jobs"])["running"] or jobs["waiting"]:
        assert time.monotonic() < deadline, f"the worker is still busy with abandoned requests: {jobs}"
        time.sleep(0.2)
    answer = client.post("/v1/images/infer", json=infer | {"max_new_tokens": 2})
    assert answer.status_code == 200, answer.text
    time.sleep(0.5)  # the access log line is written when the request ends
    lines = log_lines(session_dir / "server.log")
    cancelled = [line for line in lines if line.get("message") == "job finished" and line.get("status") == "cancelled"
                 and line.get("task") in ("image:ask", "chat")]
    assert len(cancelled) >= 4, [line for line in lines if line.get("message") == "job finished"][-6:]
    gone = [line for line in lines if line.get("message") == "request" and line.get("status") == 499]
    assert len(gone) >= 4, "the access log should record the abandoned requests as 499 (client closed request)"


@pytest.mark.model
def test_decoding_stops_at_the_token_after_cancel(tiny_engine, ct_slice_rgb):
    """The shared mechanism: `should_cancel` is asked after every decoded token (streaming and non-streaming
    requests alike) and before the model runs at all."""
    from citrusv_backend.errors import JobCancelled

    asked = []

    def cancel_at_the_third_check() -> bool:
        asked.append(True)
        return len(asked) >= 3

    with pytest.raises(JobCancelled):
        tiny_engine.run(ct_slice_rgb, "Describe this image.", task="ask", max_new_tokens=200, min_pixels=784,
                        max_pixels=3136, should_cancel=cancel_at_the_third_check)
    assert len(asked) == 3, "decoding went on after the cancel"
    with pytest.raises(JobCancelled):
        tiny_engine.run(ct_slice_rgb, "x", task="segment", answer="Sure, it is [SEG].", should_cancel=lambda: True)
    done = tiny_engine.run(ct_slice_rgb, "Describe this image.", task="ask", max_new_tokens=3, min_pixels=784,
                           max_pixels=3136, should_cancel=lambda: False)
    assert len(done.generated_ids) <= 3


def test_a_streamed_answer_stops_when_its_client_leaves(server, client, session_dir):
    """stream: true — the client reads the first chunk and hangs up: the answer stops at its next token."""
    image = png_base64(np.random.default_rng(2).integers(0, 255, size=(32, 32, 3)).astype(np.uint8))
    chat = {"model": "CitrusV_8B", "max_tokens": LONG, "stream": True,
            "citrusv": {"task": "ask", "min_pixels": 784, "max_pixels": 3136},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": "Describe this image."}]}]}
    data = json.dumps(chat).encode()
    before = sum(1 for line in log_lines(session_dir / "server.log")
                 if line.get("message") == "job finished" and line.get("status") == "cancelled")
    with socket.create_connection((server.ready["host"], server.ready["port"]), timeout=60) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first, first[:300]
    deadline = time.monotonic() + 15
    while (jobs := client.get("/v1/info").json()["jobs"])["running"] or jobs["waiting"]:
        assert time.monotonic() < deadline, f"the abandoned stream still keeps the worker busy: {jobs}"
        time.sleep(0.2)
    time.sleep(0.3)
    after = sum(1 for line in log_lines(session_dir / "server.log")
                if line.get("message") == "job finished" and line.get("status") == "cancelled")
    assert after == before + 1
