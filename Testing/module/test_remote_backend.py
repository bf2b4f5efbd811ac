"""A remote backend beside the local one: the mode follows the panel, and proxies are used for remote hosts only."""
from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

from module_helpers import run_until


# ---------------------------------------------------------------------------------------------- remote mode

def _ask(manager, target, voxels):
    from CitrusVSlicerLib.runner import ApplyRunner
    from CitrusVSlicerLib.upload import VolumeUpload

    upload = VolumeUpload(manager.transport, target, voxels, np.diag([-1.0, -1.0, 2.0, 1.0]), "CT")
    runner = ApplyRunner(upload, "ask", "What?", {"max_new_tokens": 2})
    runner.start()
    events = []
    run_until(lambda: (manager.poll(), runner.poll(), events.extend(runner.events())), lambda: not runner.active, 120)
    return runner, events + runner.events()


@pytest.mark.service
def test_the_mode_follows_the_panel_and_testing_a_remote_leaves_the_local_backend(module_backend):
    """Before: one remote Apply switched the manager to remote for good, and Test connection stopped the local
    backend. Now every request's target comes from the panel's mode at that moment."""
    manager = module_backend
    process = manager.process
    voxels = np.random.default_rng(3).integers(-1000, 400, (6, 32, 32)).astype(np.int16)
    remote = manager.target(True, "127.0.0.1:9", "token")   # a remote backend that is down
    runner, events = _ask(manager, remote, voxels)
    assert runner.state == "failed" and "cannot connect to the backend at http://127.0.0.1:9" in events[-1].message
    local = manager.target(False)                             # the user switches back to Local
    assert local.url == process.url and local.handover_dir
    runner, events = _ask(manager, local, voxels)
    assert runner.state == "done", events[-1].message
    answers = []
    manager.request_status(manager.target(True, "127.0.0.1:9", "token"), lambda text, error: answers.append(error))
    run_until(manager.poll, lambda: answers, 30)
    assert "cannot connect" in str(answers[0])
    assert manager.process is process and manager.state == "running", "testing a remote touched the local backend"


# ---------------------------------------------------------------------------------------------- proxies

class RecordingProxy:
    """A plain HTTP proxy on 127.0.0.1 that records request lines and forwards absolute-URI requests for the hosts
    it is given (the only way to reach a name that does not resolve)."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.seen: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client):
        with client:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            request_line = head.split(b"\r\n")[0].decode()
            self.seen.append(request_line)
            method, url, version = request_line.split(" ")
            host_port = url.split("//", 1)[1].split("/", 1)[0]
            path = "/" + url.split("//", 1)[1].split("/", 1)[1]
            target = self.routes.get(host_port)
            if target is None:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            headers = [line for line in head.split(b"\r\n")[1:] if not line.lower().startswith((b"connection", b"proxy-"))]
            with socket.create_connection(target) as upstream:
                upstream.sendall(f"{method} {path} {version}\r\n".encode() + b"\r\n".join(headers)
                                 + b"\r\nConnection: close\r\n\r\n" + rest)
                while chunk := upstream.recv(65536):
                    client.sendall(chunk)

    def close(self):
        self.listener.close()


@pytest.mark.service
def test_loopback_never_goes_through_a_proxy_and_a_remote_does(module_backend, tmp_path):
    """A remote name that does not resolve is reachable only through the proxy (which forwards it to the test backend);
    the local backend must be reached directly, whatever the proxy settings say."""
    from CitrusVSlicerLib.endpoints import Target
    from CitrusVSlicerLib.transport import Transport

    local_target = module_backend.local_target()
    remote_port = int(local_target.url.rsplit(":", 1)[1])
    proxy = RecordingProxy({f"citrusv-remote.invalid:{remote_port}": ("127.0.0.1", remote_port)})
    env = dict(os.environ, HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, ALL_PROXY=proxy.url, http_proxy=proxy.url,
               https_proxy=proxy.url, NO_PROXY="", no_proxy="")
    transport = Transport(tmp_path / "io", env=env)
    try:
        local = transport.request(local_target, "GET", "/v1/info")
        remote = transport.request(Target(f"http://citrusv-remote.invalid:{remote_port}", local_target.token),
                                   "GET", "/v1/info")
        run_until(transport.poll, lambda: local.done and remote.done, 60)
        assert local.ok and local.json()["random_weights"], local.error
        assert remote.ok, remote.error
        assert proxy.seen == [f"GET http://citrusv-remote.invalid:{remote_port}/v1/info HTTP/1.1"]
    finally:
        transport.close()
        proxy.close()
