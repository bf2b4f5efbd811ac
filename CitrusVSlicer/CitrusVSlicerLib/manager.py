"""The backend the panel talks to: the bundled local one (installed on first use, started and stopped here)
or a remote one (URL + token). No Qt: the panel calls these methods and polls `state` / `drain_logs()`.
"""
from __future__ import annotations

from pathlib import Path

from .client import BackendClient, BackendError, is_loopback, normalise_url
from .installer import InstallPlan, default_environment_dir, is_installed, plan_install, start_install
from .process import BackendProcess, StreamingProcess, bundled_backend_dir, environment_python

LOCAL, REMOTE = "local", "remote"


class BackendManager:
    def __init__(self, module_dir: Path, env_dir: Path | None = None, python: str | None = None):
        self.module_dir = Path(module_dir)
        self.env_dir = Path(env_dir or default_environment_dir())
        self._python_override = python         # tests and developers: an existing environment's python
        self.mode = LOCAL
        self.process: BackendProcess | None = None
        self.installer: StreamingProcess | None = None
        self._remote: tuple[str, str, str | None] | None = None
        self._logs: list[str] = []

    # ------------------------------------------------------------------------------------------ install

    @property
    def backend_dir(self) -> Path | None:
        return bundled_backend_dir(self.module_dir)

    def needs_install(self) -> bool:
        return self._python_override is None and not is_installed(self.env_dir)

    def install_plan(self) -> InstallPlan:
        if self.backend_dir is None:
            raise BackendError("the CitrusV backend is not bundled with this module (CitrusVBackend folder missing); "
                               "reinstall the extension")
        return plan_install(self.backend_dir, self.env_dir)

    def start_install(self, plan: InstallPlan) -> StreamingProcess:
        if not plan.enough_disk:
            raise BackendError(f"not enough disk space: about {plan.disk_needed_gb:.0f} GB are needed in "
                               f"{plan.env_dir.parent}, {plan.disk_free_gb:.0f} GB are free")
        self.installer = start_install(plan)
        return self.installer

    # ------------------------------------------------------------------------------------------ local

    @property
    def python(self) -> str:
        return self._python_override or str(environment_python(self.env_dir))

    def start_local(self, model: str, device: str = "auto") -> BackendProcess:
        if self.needs_install():
            raise BackendError("the backend is not installed yet: press Install (it asks before installing anything)")
        self.stop()
        self.mode = LOCAL
        self.process = BackendProcess(self.python, model, device)
        self.process.start()
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def restart(self) -> BackendProcess:
        if self.process is None:
            raise BackendError("the backend was never started")
        self.process.restart()
        return self.process

    @property
    def state(self) -> str:
        """stopped / starting / running / crashed / exited (local), or remote."""
        if self.mode == REMOTE:
            return REMOTE
        return self.process.state if self.process else "stopped"

    def drain_logs(self) -> list[str]:
        lines = []
        for source in (self.installer, self.process):
            if source is not None:
                lines.extend(source.drain())
        return lines

    # ------------------------------------------------------------------------------------------ remote

    def use_remote(self, url: str, token: str, ca_bundle: str | None = None) -> None:
        self.stop()
        self.mode = REMOTE
        self._remote = (normalise_url(url), token, ca_bundle or None)

    def remote_needs_consent(self) -> bool:
        """Image data leaves this computer only after the user agreed (loopback URLs stay on it)."""
        return self.mode == REMOTE and self._remote is not None and not is_loopback(self._remote[0])

    # ------------------------------------------------------------------------------------------ client

    def client(self) -> BackendClient:
        if self.mode == REMOTE:
            if self._remote is None:
                raise BackendError("no remote backend configured: enter its URL and token")
            url, token, ca_bundle = self._remote
            return BackendClient(url, token, ca_bundle=ca_bundle)
        if self.process is None or self.process.state != "running":
            state = self.process.state if self.process else "stopped"
            hint = " (see the log in the Backend section)" if state == "crashed" else ""
            raise BackendError(f"the local backend is {state}{hint}: press Start")
        return BackendClient(self.process.url, self.process.token)

    def device_status(self) -> str:
        """One line for the panel: GPU name and memory, or a clear CPU warning."""
        info = self.client().info()
        device = str(info.get("device", "?"))
        gpu = info.get("gpu") or {}
        warning = " — RANDOM TEST WEIGHTS" if info.get("random_weights") else ""
        if device.startswith("cuda") and gpu:
            total = gpu.get("total_mb")
            return f"GPU: {gpu.get('name', device)}" + (f", {total / 1024:.0f} GB" if isinstance(total, (int, float)) else "") + warning
        return f"CPU only: expect minutes per volume (no CUDA GPU in the backend){warning}"
