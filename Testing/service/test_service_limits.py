"""Limits and hostile clients: eviction, oversized and stalled bodies, a client killed mid-upload."""
from __future__ import annotations

import socket
import time

import pytest

from service_helpers import submit, upload, volume_payload

pytestmark = pytest.mark.service


def test_evicted_volumes_say_so(limits_client, chest):
    first = upload(limits_client, chest)          # 2.1 MiB of a 3 MiB budget
    second = upload(limits_client, chest)         # pushes the first one out (least recently used)
    response = limits_client.post("/v1/jobs", json={"volume_id": first, "task": "segment", "prompt": "segment the lung"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "volume_evicted" and "evicted" in error["message"] and "upload it again" in error["message"]
    assert "memory budget" in error["message"]
    assert limits_client.get(f"/v1/volumes/{second}").status_code == 200
    time.sleep(4.5)                               # the limits server's TTL is 4 s
    expired = limits_client.get(f"/v1/volumes/{second}")
    assert expired.status_code == 404 and "unused for more than 4 s" in expired.json()["error"]["message"]


def test_a_volume_beyond_the_budget_or_the_upload_limit_is_413(limits_client, chest):
    payload = volume_payload(chest)
    payload["shape"] = [68, 128, 128]             # 4.25 MiB: refused before the voxels are even decoded
    response = limits_client.post("/v1/volumes", json=payload)
    assert response.status_code == 413 and "budget" in response.json()["error"]["message"]


def _raw_request(server, head: str, body: bytes = b"", read: bool = True, pause: float = 0.0) -> bytes:
    with socket.create_connection((server.ready["host"], server.ready["port"]), timeout=20) as sock:
        sock.sendall(head.encode() + body)
        time.sleep(pause)
        if not read:
            return b""
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def _head(server, length: int, path: str = "/v1/volumes") -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n")


def test_a_declared_body_beyond_the_limit_is_refused_before_it_is_sent(limits_server):
    reply = _raw_request(limits_server, _head(limits_server, 10 * 2**30))
    assert reply.startswith(b"HTTP/1.1 413") and b"too_large" in reply


def test_a_streamed_body_beyond_the_limit_is_413(limits_client):
    def chunks():
        for _ in range(80):
            yield b"x" * 65536                    # 5 MiB, no Content-Length (chunked)

    response = limits_client.post("/v1/volumes", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "too_large"


def test_a_stalled_body_is_dropped_with_408(limits_server):
    reply = _raw_request(limits_server, _head(limits_server, 1000), b'{"voxels": "')
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply


def test_a_client_killed_mid_upload_leaves_the_service_healthy(server, client, chest):
    for _ in range(3):
        _raw_request(server, _head(server, 200 * 2**20), b'{"voxels": "' + b"A" * 2**20, read=False)
    assert client.get("/healthz").json()["status"] == "ok"
    volume_id = upload(client, chest)
    job_id = submit(client, volume_id, "ask", "What is this?", max_new_tokens=2)
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200


def test_every_error_is_json_even_for_odd_requests(client):
    for response in (client.post("/v1/volumes", content=b"\x00\xff", headers={"content-type": "application/octet-stream"}),
                     client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}),
                     client.post("/v1/jobs", content=b"[1, 2]", headers={"content-type": "application/json"}),
                     client.put("/v1/volumes"), client.get("/v1/jobs/x/result"), client.get("/nowhere")):
        assert 400 <= response.status_code < 500 and set(response.json()["error"]) >= {"type", "message"}
    assert client.get("/healthz").json()["status"] == "ok"
