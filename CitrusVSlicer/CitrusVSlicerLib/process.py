"""Child processes that never block the UI: the backend server and the first-use installer.

A reader thread collects the child's output lines into a queue; the panel drains it from a timer on the
main thread. The child runs in its own process group (session), so stopping it stops everything it
started (pip, uvicorn workers...). Standard library only.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

READY_EVENT = "ready"


def drain_queue(items: queue.Queue) -> list:
    """Everything queued so far, without waiting (the panel's timer calls this on the main thread)."""
    out = []
    while True:
        try:
            out.append(items.get_nowait())
        except queue.Empty:
            return out


class StreamingProcess:
    """A child process whose stdout+stderr lines are collected by a thread, with a tree-wide stop."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: str | None = None, keep_lines: int = 5000):
        self.command = command
        self.env = env
        self.cwd = cwd
        self.lines: deque[str] = deque(maxlen=keep_lines)
        self._queue: queue.Queue[str] = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.is_running():
            raise RuntimeError("already running")
        options = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, encoding="utf-8", bufsize=1, env=self.env, cwd=self.cwd,
                                         errors="replace", **options)
        self._reader = threading.Thread(target=self._read, name="citrusv-process-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
            self.on_line(line)

    def on_line(self, line: str) -> None:
        """Hook for subclasses (called on the reader thread)."""

    def drain(self) -> list[str]:
        """New output lines since the last call (call from the main thread's timer)."""
        return drain_queue(self._queue)

    def wait(self, timeout: float | None = None) -> int | None:
        if self._process is None:
            return None
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Terminate the child and everything it started; kill what is left after the grace period."""
        if self._process is None or self._process.poll() is not None:
            return
        self._signal_group(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)
        try:
            self._process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL if os.name != "nt" else None)
        self._process.wait(5)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _signal_group(self, sig) -> None:
        if os.name == "nt":
            if sig is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True)
            else:
                self._process.send_signal(sig)
            return
        try:
            os.killpg(self._process.pid, sig)
        except ProcessLookupError:
            pass


def backend_command(python: str, model: str, device: str = "auto", host: str = "127.0.0.1", port: int = 0) -> list[str]:
    return [python, "-m", "citrusv_backend.cli", "serve", "--model", model, "--host", host, "--port", str(port),
            "--device", device]


class BackendProcess(StreamingProcess):
    """`citrusv serve` on 127.0.0.1 with a fresh token per launch (passed in the environment, never logged)."""

    def __init__(self, python: str, model: str, device: str = "auto", extra_env: dict | None = None):
        self.token = secrets.token_urlsafe(32)
        env = dict(os.environ, **(extra_env or {}))
        env["CITRUSV_TOKEN"] = self.token
        env.setdefault("PYTHONUNBUFFERED", "1")
        super().__init__(backend_command(python, model, device), env=env)
        self.ready_info: dict | None = None
        self._ready = threading.Event()
        self._stopped_by_us = False

    def on_line(self, line: str) -> None:
        if line.startswith("{") and '"ready"' in line:
            try:
                info = json.loads(line)
            except ValueError:
                return
            if info.get("event") == READY_EVENT:
                self.ready_info = info
                self._ready.set()

    @property
    def url(self) -> str | None:
        if not self.ready_info:
            return None
        return f"http://{self.ready_info.get('host', '127.0.0.1')}:{self.ready_info['port']}"

    @property
    def state(self) -> str:
        if self._process is None:
            return "stopped"
        if self.is_running():
            return "running" if self._ready.is_set() else "starting"
        return "exited" if self.returncode == 0 or self._stopped_by_us else "crashed"

    def start(self) -> None:
        self._ready.clear()
        self.ready_info = None
        self._stopped_by_us = False
        super().start()

    def stop(self, grace_seconds: float = 5.0) -> None:
        self._stopped_by_us = True
        super().stop(grace_seconds)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the ready line (tests, scripts); the panel polls `state` instead."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.2):
                return True
            if not self.is_running():
                return False
        return False

    def restart(self, timeout: float | None = None) -> None:
        self.stop()
        self.start()
        if timeout is not None:
            self.wait_ready(timeout)


def bundled_backend_dir(module_dir: Path) -> Path | None:
    """CitrusVBackend shipped beside the module (installed extension) or beside its folder (source checkout)."""
    for candidate in (module_dir / "CitrusVBackend", module_dir.parent / "CitrusVBackend"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def environment_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
