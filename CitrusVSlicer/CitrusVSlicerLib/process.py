"""Child processes the panel follows without ever blocking: the backend server, the installer's steps, batch runs.

No reader threads (inside Slicer they would barely run: PythonQt holds the GIL while Qt's loop runs): a child
writes its output into a log file, and `poll()`, called from the panel's timer, reads what is new. The log stays
on disk for troubleshooting. Every child:
  * starts from Slicer's startup environment (environment.py), in a process group of its own, without a console
    window on Windows;
  * gets a pipe as stdin that the module keeps open and never writes to: closing it is the graceful stop (the
    backend and batch run with `--exit-with-parent`), and when Slicer exits or crashes the operating system
    closes it, so nothing is left holding a GPU;
  * is stopped without waiting: `request_stop()` closes the pipe and returns; `poll()` kills the whole tree if it
    is still alive after the grace period. `stop()` is the waiting variant for Slicer's exit and for scripts.
The one child-process primitive of the module: the backend, the installer's steps, the GPU probe, downloads,
batch runs and the HTTP courier (transport.py) are all a StreamingProcess. Standard library only.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from . import environment
from .environment import isolated, popen_options, startup_environment
from .failures import FAILED_EVENT, FailureEvent

READY_EVENT = "ready"
KEEP_LOGS = 10


def default_log_dir() -> Path:
    return Path(os.environ.get("CITRUSV_SLICER_LOGS", Path.home() / ".citrusv-slicer" / "logs"))


class StreamingProcess:
    """A child whose output lines are picked up by `poll()`; `graceful` says how it is asked to stop:
    "stdin" (it watches its stdin and exits on end-of-file) or "terminate" (SIGTERM to its group; on Windows
    there is no such signal, so the tree is killed at once)."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: str | None = None, name: str = "process",
                 log_dir: Path | None = None, graceful: str = "terminate", keep_lines: int = 5000):
        self.command = [str(part) for part in command]
        self.env = env if env is not None else startup_environment()
        self.cwd = cwd
        self.name = name
        self.log_dir = Path(log_dir) if log_dir else default_log_dir()
        self.graceful = graceful
        self.lines: deque[str] = deque(maxlen=keep_lines)
        self.log_path: Path | None = None
        self._new: list[str] = []
        self._process: subprocess.Popen | None = None
        self._log = None
        self._partial = b""
        self._kill_at: float | None = None
        self._stop_requested = False
        self.progress_line = ""   # the latest state of a "\r" progress bar on the unfinished last line

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def stopping(self) -> bool:
        return self._stop_requested and self.is_running()

    def start(self) -> None:
        if self.is_running():
            raise RuntimeError("already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._prune_logs()
        self.log_path = self.log_dir / f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.log"
        self.close_log()
        with open(self.log_path, "wb") as sink:
            self._process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=sink,
                                             stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, **popen_options())
        self._log = open(self.log_path, "rb")
        self._partial = b""
        self._kill_at = None
        self._stop_requested = False

    # ------------------------------------------------------------------------------------------ output

    def poll(self) -> None:
        """Pick up new output; finish a requested stop. Cheap: call it from a timer."""
        if self._log is not None:
            data = self._log.read()
            if data:
                lines = (self._partial + data).split(b"\n")
                self._partial = lines.pop()
                for raw in lines:
                    line = _last_state(raw.decode("utf-8", "replace"))
                    self.lines.append(line)
                    self._new.append(line)
                    self.on_line(line)
                # A progress bar redraws its line with "\r" and ends it only when done: its latest state.
                if b"\r" in self._partial:
                    self.progress_line = _last_state(self._partial.decode("utf-8", "replace"))
        if self._kill_at is not None and self.is_running() and time.monotonic() >= self._kill_at:
            environment.kill_tree(self._process.pid)
            self._kill_at = None

    def send(self, data: bytes) -> None:
        """Write to the child's stdin (a child that reads requests there, like the HTTP courier); OSError when it
        is gone."""
        if self._process is None or self._process.stdin is None or self._process.stdin.closed:
            raise OSError(f"{self.name} is not running")
        self._process.stdin.write(data)
        self._process.stdin.flush()

    def close_log(self) -> None:
        """Let go of the output file (before its folder is removed); output written after this is not read."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def on_line(self, line: str) -> None:
        """Hook for subclasses (called on the main thread, from poll)."""

    def drain(self) -> list[str]:
        """New output lines since the last call."""
        self.poll()
        new, self._new = self._new, []
        return new

    # ------------------------------------------------------------------------------------------ stopping

    def request_stop(self, grace_seconds: float = 10.0) -> None:
        """Ask the child (and everything it started) to stop; returns at once. The tree is killed after the grace
        period by the next `poll()` past it."""
        if not self.is_running():
            return
        self._stop_requested = True
        self._close_stdin()
        if self.graceful == "terminate":
            if environment.platform_name() == "nt":  # no SIGTERM (and CTRL_BREAK_EVENT fails without a console)
                grace_seconds = 0.0
            else:
                try:
                    os.killpg(self._process.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        self._kill_at = time.monotonic() + grace_seconds

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop and wait (Slicer's exit, scripts, tests): at most about `grace_seconds` + 5 s."""
        if self.is_running():
            self.request_stop(grace_seconds)
            try:
                self._process.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                environment.kill_tree(self._process.pid)
                self._process.wait(5)
        self.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to exit (scripts, tests; the panel never waits)."""
        if self._process is None:
            return None
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.poll()
        return code

    def _close_stdin(self) -> None:
        if self._process is not None and self._process.stdin is not None and not self._process.stdin.closed:
            try:
                self._process.stdin.close()
            except OSError:
                pass

    def _prune_logs(self) -> None:
        logs = sorted(self.log_dir.glob(f"{self.name}-*.log"), key=lambda path: path.stat().st_mtime)
        for old in logs[:-KEEP_LOGS]:
            try:
                old.unlink()
            except OSError:
                pass


def _last_state(text: str) -> str:
    """A line a progress bar redrew with carriage returns ("\r 10%\r 20%\r 30%") as its last state."""
    if "\r" not in text:
        return text
    parts = [part for part in text.split("\r") if part.strip()]
    return parts[-1] if parts else ""


def backend_command(python: str, model: str, device: str = "auto", host: str = "127.0.0.1", port: int = 0) -> list[str]:
    # --no-download: Start never fetches 17 GB silently; a missing model is a `failed` event (model_missing) and the
    # panel offers its own Download step.
    return isolated(python) + ["-m", "citrusv_backend.cli", "serve", "--model", model, "--host", host, "--port",
                               str(port), "--device", device, "--exit-with-parent", "--no-download"]


class BackendProcess(StreamingProcess):
    """`citrusv serve` on 127.0.0.1 with a fresh token per launch (passed in the environment, never logged)."""

    def __init__(self, python: str, model: str, device: str = "auto", extra_env: dict | None = None,
                 log_dir: Path | None = None):
        self.token = secrets.token_urlsafe(32)
        env = startup_environment()
        env.update(extra_env or {})
        env["CITRUSV_TOKEN"] = self.token
        super().__init__(backend_command(python, model, device), env=env, name="backend", log_dir=log_dir,
                         graceful="stdin")
        self.model = model
        self.device = device
        self.ready_info: dict | None = None
        self.failure: FailureEvent | None = None   # the backend's own `failed` event, if it printed one

    def on_line(self, line: str) -> None:
        if line.startswith("{") and '"event"' in line:
            try:
                info = json.loads(line)
            except ValueError:
                return
            if not isinstance(info, dict):
                return
            if info.get("event") == READY_EVENT:
                self.ready_info = info
            elif info.get("event") == FAILED_EVENT:
                self.failure = FailureEvent.from_line(line)

    @property
    def url(self) -> str | None:
        if not self.ready_info:
            return None
        host = self.ready_info.get("host", "127.0.0.1")
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.ready_info['port']}"

    @property
    def handover_dir(self) -> str | None:
        return (self.ready_info or {}).get("handover_dir")

    @property
    def state(self) -> str:
        """stopped / starting / running / stopping / exited / crashed."""
        if self._process is None:
            return "stopped"
        if self.is_running():
            if self._stop_requested:
                return "stopping"
            return "running" if self.ready_info else "starting"
        return "exited" if self.returncode == 0 or self._stop_requested else "crashed"

    def start(self) -> None:
        self.ready_info = None
        self.failure = None
        super().start()

    def wait_ready(self, timeout: float) -> bool:
        """Poll until the ready line (scripts, tests; the panel polls `state` from its timer instead)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if self.ready_info:
                return True
            if not self.is_running():
                self.poll()
                return bool(self.ready_info)
            time.sleep(0.05)
        return False


def bundled_backend_dir(module_dir: Path) -> Path | None:
    """CitrusVBackend shipped beside the module (installed extension) or beside its folder (source checkout)."""
    for candidate in (module_dir / "CitrusVBackend", module_dir.parent / "CitrusVBackend"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def environment_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
