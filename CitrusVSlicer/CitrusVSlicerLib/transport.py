"""The module's HTTP, seen from Slicer's main thread: requests handed to the courier process, answers picked up by polling.

Design (the one way this module does I/O; see courier.py for why it is a process):
  * `Transport.request(target, method, path, ...)` returns a `Call` at once; nothing blocks.
  * `Transport.poll()` (from the panel's timer, on the main thread) reads what the courier answered and completes
    the calls: `call.done`, `call.status`, `call.json()`, `call.error` (a BackendError with a message for the user),
    and the optional `on_done(call)` callback runs right there, on the main thread, where MRML and Qt may be used.
  * Large bodies never cross the pipe: an upload names a file (`body_file`, written by the caller, see
    handover.py) and a large answer comes back in a file that `call.body()` reads.
  * No Python threads on Slicer's side, so nothing depends on PythonQt releasing the GIL.
A new request type (a refinement click, an export) is one `request(...)` call plus an `on_done` callback: see
runner.py for a multi-step one (upload, submit, follow, fetch).

Why a courier process and not Qt's own `QNetworkAccessManager`/`QProcess` behind an injected protocol (the seam
KitwareMedical/SlicerNNUnet uses). Both Qt classes are asynchronous C++ and would not need the GIL while they wait,
so PythonQt's GIL (it is never released while Qt's loop runs) rules out Python threads, not them. What decides is
where the bytes and the Python callbacks run:
  * every byte a `QNetworkReply` delivers reaches Python as a QByteArray converted by PythonQt on the main thread,
    and an upload's bytes would have to be handed to Qt from Python too; the courier sends a volume from its file
    with `socket.sendfile` in another process and returns a large answer as a file that is mapped, not copied.
    Measured (docs/performance.md, bench/results/slicer-loop-vm-20261202*.json, under Testing/module/gil_loop.py's
    loop that holds the GIL as PythonQt does): longest main-thread stall 45 ms / 43.5 ms over upload, job and
    download, Apply as fast as in plain CPython; the previous design that decoded in a Python thread stalled 1.2-2 s.
  * `QProcess.kill()` ends only the direct child (pip's build steps and the server's workers live on) and the process
    group or Windows creation flags are set only from C++ (`setChildProcessModifier`, Qt 6, not wrapped by
    PythonQt); process.StreamingProcess starts each child in its own group and kills the tree, and its output
    stays in a log file the user can open after a crash or a module Reload.
  * the library stays Qt-free, so the real courier, real sockets and the real backend run in the tests under
    plain CPython with slicer-core, where a Qt seam would be tested through mock process objects.
Not measured: a QNetworkAccessManager inside Slicer (the test environment has no PythonQt); the figures above are
the courier's, and the argument against Qt is the PythonQt conversion and the tree kill, not a timing.
"""
from __future__ import annotations

import base64
import itertools
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .endpoints import BackendError, Target
from .process import StreamingProcess

_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from CitrusVSlicerLib.courier import main; main()"
LIB_PARENT = str(Path(__file__).resolve().parent.parent)


class Call:
    """One request in flight or answered. `state`: pending, done (any HTTP status), failed (no answer), cancelled."""

    def __init__(self, transport: "Transport", number: int, target: Target, method: str, path: str, on_done=None):
        self.transport = transport
        self.number = number
        self.target = target
        self.method = method
        self.path = path
        self.on_done = on_done
        self.on_progress = None
        self.state = "pending"
        self.status: int | None = None
        self.sent = 0
        self.total = 0
        self.started = time.monotonic()
        self._body: bytes | None = None
        self._body_file: str | None = None
        self._mapping = None
        self._failure: str | None = None

    @property
    def done(self) -> bool:
        return self.state != "pending"

    @property
    def ok(self) -> bool:
        return self.state == "done" and self.status is not None and self.status < 400

    @property
    def error(self) -> BackendError | None:
        """Why this call did not succeed, worded for the user (None while pending or when it succeeded)."""
        if self.state == "pending" or self.ok:
            return None
        if self.state == "cancelled":
            return BackendError("cancelled")
        if self._failure is not None:
            return BackendError(self._failure)
        return BackendError(http_error_message(self.status, self.text()))

    def body(self) -> bytes:
        """The response body (a large one is read from the file the courier wrote it into, then the file is removed)."""
        if self._body is None and self._body_file is not None:
            with open(self._body_file, "rb") as handle:
                self._body = handle.read()
            self.release()
        return self._body or b""

    def body_view(self) -> memoryview:
        """The response body without a copy: a large one is the courier's file mapped into memory (call `release()`
        when done with it); a small one, the bytes."""
        if self._body_file is None:
            return memoryview(self.body())
        if self._mapping is None:
            with open(self._body_file, "rb") as handle:
                self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(
                    self._body_file) else b""
        return memoryview(self._mapping)

    def release(self) -> None:
        """Forget a large body's file (and its mapping)."""
        if self._mapping is not None and not isinstance(self._mapping, bytes):
            self._mapping.close()
        self._mapping = None
        if self._body_file is not None:
            try:
                os.unlink(self._body_file)
            except OSError:
                pass
            self._body_file = None

    def text(self) -> str:
        return self.body().decode("utf-8", "replace")

    def json(self):
        if not self.ok:
            raise self.error or BackendError(f"{self.method} {self.path} has not been answered yet")
        try:
            return json.loads(self.body())
        except ValueError:
            raise BackendError(f"the backend's answer to {self.method} {self.path} is not JSON: {self.text()[:200]}") \
                from None

    def cancel(self) -> None:
        if self.state == "pending":
            self.transport._send({"cancel": self.number})


class Transport:
    def __init__(self, work_dir: Path | None = None, python: str | None = None, env: dict | None = None):
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="citrusv-slicer-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir, 0o700)
        # Slicer's own Python in Slicer's own environment: the courier needs nothing else (standard library only).
        self.python = python or sys.executable
        self.env = env
        self._numbers = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self.courier: StreamingProcess | None = None   # the courier child (started by the first request)
        self.courier_lines: list[str] = []     # what the courier printed besides events (its errors)

    # ------------------------------------------------------------------------------------------ requests

    def request(self, target: Target, method: str, path: str, json_body=None, body_file: str | None = None,
                headers: dict | None = None, compress: str | None = None, timeout: float = 30.0,
                on_done=None, large_response: bool = False) -> Call:
        call = Call(self, next(self._numbers), target, method, path, on_done)
        message = {"id": call.number, "method": method, "url": target.url + path,
                   "headers": {**target.headers(), **(headers or {})}, "timeout": timeout,
                   "ca_bundle": target.ca_bundle}
        if json_body is not None:
            message["json"] = json_body
        if body_file is not None:
            message["body_file"] = str(body_file)
            message["compress"] = compress
        if large_response:  # the body comes back in a file (read it with call.body() or call.body_view())
            message["response_file"] = str(self.work_dir / f"response-{call.number}.body")
        self._calls[call.number] = call
        try:
            self._send(message)
        except OSError as error:
            self._fail(call, f"the HTTP helper process could not take the request ({error})")
        return call

    def poll(self) -> None:
        """Complete the calls the courier has answered (call from the main thread, often)."""
        for event in self._read_events():
            call = self._calls.get(event.get("id"))
            if call is None:
                continue
            kind = event.get("event")
            if kind == "progress":
                call.sent, call.total = int(event["sent"]), int(event["total"])
                if call.on_progress:
                    call.on_progress(call)
                continue
            if kind == "response":
                call.status = int(event["status"])
                if "body_file" in event:
                    call._body_file = event["body_file"]
                else:
                    call._body = base64.b64decode(event.get("body_b64", ""))
                self._finish(call, "done")
            elif kind == "error":
                if event.get("kind") == "cancelled":
                    self._finish(call, "cancelled")
                else:
                    self._fail(call, failure_message(call.target, event.get("kind"), event.get("message", "")))
        if self.courier is not None and not self.courier.is_running() and self._calls:
            # The courier died (it never should): whatever was in flight has no answer; the next request restarts it.
            self._read_events()
            for call in list(self._calls.values()):
                self._fail(call, "the HTTP helper process stopped unexpectedly: " + " | ".join(self.courier_lines[-3:]))
            self.courier.close_log()
            self.courier = None

    @property
    def busy(self) -> bool:
        return bool(self._calls)

    def close(self, wait_s: float = 2.0) -> None:
        """End the courier (closing its stdin is its signal); cancel what is in flight."""
        courier, self.courier = self.courier, None
        if courier is not None:
            courier.stop(wait_s)
            courier.close_log()
        for call in list(self._calls.values()):
            self._finish(call, "cancelled")
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ courier

    def _ensure_courier(self) -> StreamingProcess:
        if self.courier is not None and self.courier.is_running():
            return self.courier
        if self.courier is not None:
            self.courier.close_log()
        # Its output (one JSON event per line) goes to a file in the work folder like every child's (process.py);
        # without an `env` it keeps Slicer's own environment, which the courier (Slicer's Python) needs.
        self.courier = StreamingProcess([self.python, "-u", "-c", _BOOT, LIB_PARENT],
                                        env=self.env if self.env is not None else dict(os.environ),
                                        name="courier", log_dir=self.work_dir, graceful="stdin",
                                        keep_lines=0)   # answers can be megabytes: only `drain()` hands them on
        self.courier.start()
        return self.courier

    def _send(self, message: dict) -> None:
        # A few hundred bytes into a pipe whose reader is always reading: never blocks in practice.
        self._ensure_courier().send((json.dumps(message) + "\n").encode("utf-8"))

    def _read_events(self) -> list[dict]:
        if self.courier is None:
            return []
        events = []
        for line in self.courier.drain():
            text = line.strip()
            if not text:
                continue
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                events.append(event)
            else:
                self.courier_lines.append(text)
                del self.courier_lines[:-200]
        return events

    def _fail(self, call: Call, message: str) -> None:
        call._failure = message
        self._finish(call, "failed")

    def _finish(self, call: Call, state: str) -> None:
        call.state = state
        self._calls.pop(call.number, None)
        if call.on_done is not None:
            call.on_done(call)


class Fetched:
    """Bodies already downloaded, for code written against a client's `download(path) -> bytes` (dicom_export)."""

    def __init__(self, bodies: dict):
        self.bodies = bodies

    def download(self, path: str) -> bytes:
        if path not in self.bodies:
            raise BackendError(f"{path} was not downloaded")
        return self.bodies[path]


def fetch_all(transport: Transport, target: Target, paths: list[str], on_done) -> list[Call]:
    """GET every path at once; `on_done(bodies, error)` on the main thread when all have answered (bodies: path ->
    bytes), or at the first failure."""
    bodies: dict = {}
    state = {"failed": False}

    def answered(call: Call) -> None:
        if state["failed"]:
            return
        if call.error is not None:
            state["failed"] = True
            on_done(None, call.error)
            return
        bodies[call.path] = call.body()
        if len(bodies) == len(paths):
            on_done(dict(bodies), None)

    if not paths:
        on_done({}, None)
        return []
    return [transport.request(target, "GET", path, timeout=120, large_response=True, on_done=answered)
            for path in paths]


def failure_message(target: Target, kind: str | None, detail: str) -> str:
    if kind == "tls":
        return (f"the backend's TLS certificate could not be verified ({detail}); give the CA bundle of your "
                f"organisation instead of disabling checks")
    if kind == "timeout":
        return f"the backend at {target.url} did not answer in time"
    if kind == "connect":
        hint = "" if target.loopback else " (behind a proxy? set HTTPS_PROXY, or add the host to NO_PROXY)"
        return f"cannot connect to the backend at {target.url}: is it running, and is the address right?{hint} [{detail}]"
    return f"the request to {target.url} failed: {detail}"


def http_error_message(status: int | None, text: str) -> str:
    try:
        error = json.loads(text).get("error", {})
        message = error.get("message") or text
    except (ValueError, AttributeError):
        message = text[:300]
    if status == 401:
        return f"the backend refused the token (401): {message}"
    return f"backend error {status}: {message}"
