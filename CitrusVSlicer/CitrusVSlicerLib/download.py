"""The model's weights as their own step: `citrusv download MODEL [--to DIR]` as a child process the panel follows.

The backend prints one JSON object per line (CONTRACTS.md, issue 22): `download` (bytes done and total, rate, ETA),
`downloaded` (where the weights are now), `failed` (reason, message). This renders them (logview.DownloadProgress:
"Downloading Citrus-V-8B: 3.2 GB / 17.1 GB (19%), 85 MB/s, 2 min 43 s left"), and Cancel stops the process tree;
the hub's partial files stay, so the next Download resumes where this one stopped.
"""
from __future__ import annotations

from pathlib import Path

from .environment import isolated
from .failures import FailureEvent
from .logview import DownloadProgress, format_bytes, parse_json_line
from .process import StreamingProcess


def display_name(model: str) -> str:
    """"jdh-algo/Citrus-V-8B-v1.0" -> "Citrus-V-8B-v1.0"; a folder -> its name."""
    return Path(model.rstrip("/\\")).name or model


def download_command(python: str, model: str, destination: str | None = None) -> list[str]:
    command = isolated(python) + ["-m", "citrusv_backend.cli", "download", model]
    return command + (["--to", str(destination)] if destination else [])


class DownloadProcess(StreamingProcess):
    """`state`: running, done, failed, cancelled. `progress`: the last progress line; `path`: where the weights are
    once done; `failure`: the backend's failed event."""

    def __init__(self, python: str, model: str, destination: str | None = None, env: dict | None = None,
                 log_dir: Path | None = None):
        super().__init__(download_command(python, model, destination), env=env, name="download", log_dir=log_dir,
                         graceful="terminate")
        self.model = model
        self.destination = destination
        self.progress: DownloadProgress | None = None
        self.path: str | None = None
        self.failure: FailureEvent | None = None
        self._cancelled = False

    def on_line(self, line: str) -> None:
        record = parse_json_line(line)
        if record is None:
            return
        event = record.get("event")
        if event == "download":
            self.progress = DownloadProgress.from_event(record, display_name(self.model))
        elif event == "downloaded":
            self.path = str(record.get("path", "")) or None
            total = record.get("bytes_total")
            if isinstance(total, int) and total > 0:
                self.progress = DownloadProgress(bytes_done=total, bytes_total=total, name=display_name(self.model))
        elif event == "failed":
            self.failure = FailureEvent.from_line(line)

    def cancel(self) -> None:
        if self.is_running():
            self._cancelled = True
            self.request_stop(5.0)

    @property
    def state(self) -> str:
        if self._process is None:
            return "idle"
        if self.is_running():
            return "running"
        self.poll()
        if self._cancelled:
            return "cancelled"
        return "done" if self.returncode == 0 and self.path else "failed"

    def status_text(self) -> str:
        """The one line the panel shows for the download, whatever its state."""
        state = self.state
        name = display_name(self.model)
        if state == "running":
            return self.progress.describe() if self.progress else f"Downloading {name}: starting..."
        if state == "done":
            total = self.progress.bytes_total if self.progress else 0
            size = f" ({format_bytes(total)})" if total else ""
            return f"Downloaded {name}{size} into {self.path}. Press Start."
        if state == "cancelled":
            done = f" after {format_bytes(self.progress.bytes_done)}" if self.progress else ""
            return f"Download of {name} cancelled{done}; Download again continues where it stopped."
        if self.failure is not None:
            from .failures import explain_start_failure

            return explain_start_failure(self.failure, self.model, downloading=True)
        from .logview import meaningful_lines

        last = "\n".join(meaningful_lines(list(self.lines), 4)) or "(no output)"
        return f"The download of {name} failed (exit code {self.returncode}):\n{last}"
