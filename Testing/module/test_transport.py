"""The module's HTTP path (transport.py on the main thread, courier.py in its own process) with real sockets: bytes
arrive unchanged inline and through files, compressed uploads reach the real backend, cancel and a dead courier
leave no call hanging."""
from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from module_helpers import run_until



@pytest.fixture
def http_server():
    """A plain HTTP server on 127.0.0.1: /bytes/N answers N bytes 0..255 repeated; /slow waits 30 s."""
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/slow":
                time.sleep(30)
            size = int(self.path.rsplit("/", 1)[1]) if self.path.startswith("/bytes/") else 0
            body = (bytes(range(256)) * (size // 256 + 1))[:size]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def transport(tmp_path):
    from CitrusVSlicerLib.transport import Transport

    transport = Transport(tmp_path / "io")
    yield transport
    transport.close()


@pytest.mark.unit
def test_binary_bodies_arrive_unchanged_inline_and_through_a_file(http_server, transport):
    from CitrusVSlicerLib.endpoints import Target

    target = Target(http_server, "unused")
    calls = {(size, large): transport.request(target, "GET", f"/bytes/{size}", large_response=large)
             for size in (0, 1, 300, 70_000, 3_000_000) for large in (False, True)}
    run_until(transport.poll, lambda: all(call.done for call in calls.values()), 60)
    for (size, large), call in calls.items():
        expected = (bytes(range(256)) * (size // 256 + 1))[:size]
        assert call.ok, call.error
        body = bytes(call.body_view()) if large else call.body()
        assert body == expected, (size, large)
        call.release()
    assert not list(transport.work_dir.glob("response-*")), "the response files must be removed"


@pytest.mark.service
def test_a_gzip_compressed_raw_upload_reaches_the_backend_intact(module_backend, tmp_path):
    """What goes to a remote server (compressed on the fly, chunked), sent here to the test backend."""
    from CitrusVSlicerLib.client import upload_headers
    from CitrusVSlicerLib.endpoints import Target

    voxels = np.random.default_rng(5).integers(-1024, 3000, (7, 33, 29)).astype(np.int16)
    path = tmp_path / "volume.raw"
    path.write_bytes(voxels.tobytes())
    target = Target(module_backend.local_target().url, module_backend.local_target().token)
    transport = module_backend.transport
    call = transport.request(target, "POST", "/v1/volumes", body_file=str(path), compress="gzip",
                             headers=upload_headers(voxels, np.eye(4), "gzip test"))
    progress = []
    call.on_progress = lambda c: progress.append((c.sent, c.total))
    run_until(module_backend.poll, lambda: call.done, 60)
    assert call.ok, call.error
    volume_id = call.json()["volume_id"]
    ask = transport.request(target, "POST", "/v1/jobs", json_body={
        "volume_id": volume_id, "task": "ask", "prompt": "What?", "options": {"max_new_tokens": 1, "slice": 3}})
    run_until(module_backend.poll, lambda: ask.done, 60)
    info = transport.request(target, "GET", f"/v1/volumes/{volume_id}")
    run_until(module_backend.poll, lambda: info.done, 30)
    assert info.json()["shape"] == [7, 33, 29] and info.json()["bytes"] == voxels.nbytes
    assert progress and progress[-1] == (voxels.nbytes, voxels.nbytes)


@pytest.mark.unit
def test_cancel_ends_a_call_in_flight(http_server, transport):
    from CitrusVSlicerLib.endpoints import Target

    call = transport.request(Target(http_server, "unused"), "GET", "/slow", timeout=60)
    time.sleep(0.3)
    started = time.monotonic()
    call.cancel()
    run_until(transport.poll, lambda: call.done, 10)
    assert call.state == "cancelled" and time.monotonic() - started < 5
    assert str(call.error) == "cancelled"


@pytest.mark.unit
def test_a_dead_courier_fails_its_calls_and_the_next_request_starts_a_new_one(http_server, transport):
    from CitrusVSlicerLib.endpoints import Target

    target = Target(http_server, "unused")
    stuck = transport.request(target, "GET", "/slow", timeout=60)
    time.sleep(0.3)
    os.kill(transport.courier.pid, signal.SIGKILL)
    run_until(transport.poll, lambda: stuck.done, 20)
    assert stuck.state == "failed" and "stopped unexpectedly" in str(stuck.error)
    fresh = transport.request(target, "GET", "/bytes/10")
    run_until(transport.poll, lambda: fresh.done, 20)
    assert fresh.ok and fresh.body() == bytes(range(10))


@pytest.mark.service
def test_json_answers_and_http_errors_are_worded_for_the_user(module_backend):
    from CitrusVSlicerLib.endpoints import Target

    transport, target = module_backend.transport, module_backend.local_target()
    missing = transport.request(target, "GET", "/v1/volumes/nope")
    info = transport.request(target, "GET", "/v1/info")
    run_until(module_backend.poll, lambda: missing.done and info.done, 30)
    assert info.json()["random_weights"] is True and json.loads(info.body())["device"] == "cpu"
    assert missing.status == 404 and str(missing.error).startswith("backend error 404: no volume 'nope'")
    with pytest.raises(Exception, match="404"):
        missing.json()
    assert Target(target.url, "secret-token").__repr__().count("secret") == 0
