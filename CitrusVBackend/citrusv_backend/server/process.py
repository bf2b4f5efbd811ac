"""Starting `citrusv serve` as a child process and waiting for its ready line — for launchers, tests and
benchmarks. The child gets its own process group, so `stop()` ends it and anything it started."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class ServerStartError(RuntimeError):
    pass


@dataclass
class ServerProcess:
    process: subprocess.Popen
    ready: dict
    token: str
    log_path: Path | None

    @property
    def url(self) -> str:
        return self.ready["url"]

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(timeout)
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the child leads its own group (start_new_session)
    except ProcessLookupError:
        pass


def start_server(model: str | Path, *extra_args: str, env: dict | None = None, log_path: Path | None = None,
                 timeout: float = 300.0) -> ServerProcess:
    """`citrusv serve --model MODEL --port 0 EXTRA...`; returns once its ready line has arrived."""
    command = [sys.executable, "-m", "citrusv_backend.cli", "serve", "--model", str(model), "--port", "0", *extra_args]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
    finally:
        if log_path:
            log.close()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            line = None
        if line is None:
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    _signal_group(process, signal.SIGKILL)
                raise ServerStartError(f"`citrusv serve` did not become ready (exit code {process.poll()}); "
                                       f"see {log_path or 'its stderr'}")
            continue
        try:
            ready = json.loads(line)
        except ValueError:
            continue
        if isinstance(ready, dict) and ready.get("event") == "ready":
            break
    token = _token(ready, env)
    return ServerProcess(process, ready, token, log_path)


def _pump(stream, lines: queue.Queue) -> None:
    """Read the child's stdout to the end (so it never blocks on a full pipe)."""
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode("utf-8", "replace"))
    lines.put(None)


def _token(ready: dict, env: dict | None) -> str:
    if ready.get("token_source") == "none":  # --reference-compatible: any token is accepted
        return "EMPTY"
    if ready.get("token_file"):
        return Path(ready["token_file"]).read_text().strip()
    return (env if env is not None else os.environ)["CITRUSV_TOKEN"].strip()
