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
    before = len(_finished(session_dir))
    for _ in range(2):
        _send_and_hang_up(server, "/v1/images/infer", infer)
        _send_and_hang_up(server, "/v1/chat/completions", chat)
    # Behaviour, not speed: each abandoned 1500-token answer ends as "cancelled" (run to the end, it would be
    # "done"), however slowly a loaded machine gets there.
    abandoned = _wait_for_finished(session_dir, before, count=4)
    assert [line["status"] for line in abandoned] == ["cancelled"] * 4, abandoned
    assert {line["task"] for line in abandoned} == {"image:ask", "chat"}, abandoned
    answer = client.post("/v1/images/infer", json=infer | {"max_new_tokens": 2})
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 60  # the access log line is written when the request ends
    while len([line for line in log_lines(session_dir / "server.log")
               if line.get("message") == "request" and line.get("status") == 499]) < 4:
        assert time.monotonic() < deadline, "the access log should record the abandoned requests as 499 " \
                                            "(client closed request)"
        time.sleep(0.2)


def _finished(session_dir) -> list[dict]:
    """The server's "job finished" log lines of synchronous 2D and chat requests, in order."""
    return [line for line in log_lines(session_dir / "server.log")
            if line.get("message") == "job finished" and line.get("task") in ("image:ask", "chat")]


def _wait_for_finished(session_dir, before: int, count: int, timeout: float = 300) -> list[dict]:
    """The next `count` "job finished" log lines after the first `before` ones."""
    deadline = time.monotonic() + timeout
    while len(lines := _finished(session_dir)[before:]) < count:
        assert time.monotonic() < deadline, f"only {len(lines)} of {count} jobs finished: {lines}"
        time.sleep(0.2)
    return lines[:count]


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
    before = len(_finished(session_dir))
    with socket.create_connection((server.ready["host"], server.ready["port"]), timeout=60) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first, first[:300]
    (stream,) = _wait_for_finished(session_dir, before, count=1)
    assert stream["status"] == "cancelled" and stream["task"] == "chat", stream  # run to the end: "done"
