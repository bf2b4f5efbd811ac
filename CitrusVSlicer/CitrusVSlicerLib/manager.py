"""Everything the module runs outside Slicer's process, owned in one place per Slicer session.

The bundled local backend (installed on first use, started and stopped here), the installer, batch runs and the
HTTP courier all belong to one `BackendManager`, obtained with `session_manager()`: module Reload builds a new
widget and logic but finds the same manager (library modules are not re-imported on Reload), so it never shows
"stopped" while a server runs, and Start never loads a second model. `shutdown()` at Slicer's exit stops all of
it; should Slicer crash, every child sees its stdin close and exits by itself.

Which backend a request goes to is decided per request (`target(remote, url, token)`), from the panel's mode as
it is at that moment: nothing sticks. Nothing here blocks: `poll()` is called from the panel's timer.
"""
from __future__ import annotations

import time
from pathlib import Path

from .batch import BatchRun
from .download import DownloadProcess
from .endpoints import BackendError, Target
from .environment import startup_environment
from .failures import explain_crash, explain_start_failure
from .installer import GpuProbe, InstallPlan, InstallRun, default_environment_dir, is_installed, plan_install
from .logview import readable
from .preflight import total_ram_gb
from .process import BackendProcess, bundled_backend_dir, default_log_dir, environment_python
from .requirements import model_need
from .transport import Call, Transport
from .weights import WeightsCheck, check_weights

SHUTDOWN_WAIT_S = 5.0
_SESSION: dict = {}


def session_manager(module_dir: Path, **options) -> "BackendManager":
    """The one manager of this Slicer session (created on first use; later calls ignore `options`)."""
    if "manager" not in _SESSION:
        _SESSION["manager"] = BackendManager(module_dir, **options)
    return _SESSION["manager"]


def describe_device(info: dict) -> str:
    """One line for the panel from GET /v1/info: GPU name and memory, or a clear CPU warning."""
    device = str(info.get("device", "?"))
    gpu = info.get("gpu") or {}
    warning = " — RANDOM TEST WEIGHTS" if info.get("random_weights") else ""
    if device.startswith("cuda") and gpu:
        total = gpu.get("total_mb")
        memory = f", {total / 1024:.0f} GB" if isinstance(total, (int, float)) else ""
        return f"GPU: {gpu.get('name', device)}{memory}{warning}"
    return f"CPU only: expect minutes per volume (no CUDA GPU in the backend){warning}"


class BackendManager:
    def __init__(self, module_dir: Path, env_dir: Path | None = None, python: str | None = None,
                 log_dir: Path | None = None, work_dir: Path | None = None):
        self.module_dir = Path(module_dir)
        self.env_dir = Path(env_dir or default_environment_dir())
        self.log_dir = Path(log_dir) if log_dir else default_log_dir()
        self._python_override = python          # tests and developers: an existing environment's python
        self.process: BackendProcess | None = None
        self.installer: InstallRun | None = None
        self.gpu_probe: GpuProbe | None = None
        self.batch: BatchRun | None = None
        self.download: DownloadProcess | None = None
        self.transport = Transport(work_dir)
        self.extra_env: dict = {}               # for every child: an organisation's CA bundle (settings)
        self._explained: tuple = (None, None)   # (ended process, its failure message)
        self._restart_pending = False

    # ------------------------------------------------------------------------------------------ install

    @property
    def backend_dir(self) -> Path | None:
        return bundled_backend_dir(self.module_dir)

    def needs_install(self) -> bool:
        return self._python_override is None and not is_installed(self.env_dir)

    def probe_gpu(self) -> GpuProbe:
        """Start `nvidia-smi` as a child; the panel shows the install dialog once `probe.finished`."""
        self.gpu_probe = GpuProbe(self.log_dir)
        self.gpu_probe.start()
        return self.gpu_probe

    def install_plan(self, gpu_name: str | None = None, base_python: str | None = None, ca_bundle: str = "",
                     update: bool = False) -> InstallPlan:
        if self.backend_dir is None:
            raise BackendError("the CitrusV backend is not bundled with this module (CitrusVBackend folder missing); "
                               "reinstall the extension")
        return plan_install(self.backend_dir, self.env_dir, base_python=base_python, gpu_name=gpu_name,
                            ca_bundle=ca_bundle, update=update)

    def start_install(self, plan: InstallPlan, slicer_python: str | None = None,
                      slicer_env: dict | None = None) -> InstallRun:
        if not plan.enough_disk:
            raise BackendError(f"not enough disk space: about {plan.disk_needed_gb:.0f} GB are needed in "
                               f"{plan.env_dir.parent}, {plan.disk_free_gb:.0f} GB are free")
        if self.installer is not None and self.installer.is_running():
            raise BackendError("the installation is already running")
        if self.process is not None and self.process.is_running():
            raise BackendError("stop the backend before installing it again")
        self.installer = InstallRun(plan, self.log_dir, slicer_python, slicer_env)
        self.installer.start()
        return self.installer

    # ------------------------------------------------------------------------------------------ local

    @property
    def python(self) -> str:
        return self._python_override or str(environment_python(self.env_dir))

    def start_local(self, model: str, device: str = "auto") -> BackendProcess:
        if self.needs_install():
            raise BackendError("the backend is not installed yet: press Install (it asks before installing anything)")
        if self.process is not None and self.process.is_running():
            if self.process.stopping:
                raise BackendError("the backend is still stopping; press Start again in a moment")
            raise BackendError("the backend is already running (Stop or Restart it first)")
        if self.download is not None and self.download.is_running():
            raise BackendError("the model is still downloading: wait for it, or Cancel it")
        self.process = BackendProcess(self.python, model, device, extra_env=self.extra_env, log_dir=self.log_dir)
        self.process.start()
        return self.process

    def weights(self, model: str) -> WeightsCheck:
        """Are `model`'s weights here (a folder, or the Hugging Face cache the backend will look in)?"""
        env = startup_environment()
        env.update(self.extra_env)
        return check_weights(model, env)

    @property
    def failure(self) -> str | None:
        """Why the local backend is not running, as the panel says it (None while nothing went wrong)."""
        process = self.process
        if process is None or process.is_running() or self._restart_pending:
            return None
        if self._explained[0] is not process:   # worked out once per ended process (the panel asks every tick)
            process.poll()
            self._explained = (process, self._explain(process))
        return self._explained[1]

    @staticmethod
    def _explain(process: BackendProcess) -> str | None:
        if process.failure is not None:
            return explain_start_failure(process.failure, process.model, total_ram_gb(),
                                         model_need(process.model).cpu_ram_gb, device=process.device)
        if process.stop_requested or (process.returncode == 0 and process.ready_info):
            return None   # stopped from the panel (or at Slicer's exit): nothing to explain
        return explain_crash(process.lines, process.returncode, bool(process.ready_info), process.log_path)

    # ------------------------------------------------------------------------------------------ download

    def start_download(self, model: str, destination: str | None = None) -> DownloadProcess:
        """`citrusv download` as a child (the environment must be installed: the backend does the download)."""
        if self.needs_install():
            raise BackendError("install the backend first: it downloads the model")
        if self.download is not None and self.download.is_running():
            raise BackendError("the model is already downloading")
        env = startup_environment()
        env.update(self.extra_env)
        self.download = DownloadProcess(self.python, model, destination, env=env, log_dir=self.log_dir)
        self.download.start()
        return self.download

    def cancel_download(self) -> None:
        if self.download is not None:
            self.download.cancel()

    def stop(self) -> None:
        """Ask the local backend to stop; returns at once (the tree is killed later if it does not exit)."""
        self._restart_pending = False
        if self.process is not None:
            self.process.request_stop()

    def restart(self) -> None:
        if self.process is None:
            raise BackendError("the backend was never started")
        self.process.request_stop()
        self._restart_pending = True  # started again by poll() once the old one has exited

    @property
    def state(self) -> str:
        """stopped / starting / running / stopping / exited / crashed (the local backend)."""
        if self._restart_pending:
            return "restarting"
        return self.process.state if self.process else "stopped"

    def local_target(self) -> Target:
        if self.process is None or self.process.state != "running":
            state = self.state
            hint = " (see the log in the Backend section)" if state == "crashed" else ""
            raise BackendError(f"the local backend is {state}{hint}: press Start")
        return Target(self.process.url, self.process.token, handover_dir=self.process.handover_dir)

    # ------------------------------------------------------------------------------------------ targets

    def target(self, remote: bool, url: str = "", token: str = "", ca_bundle: str | None = None) -> Target:
        """Where the next request goes, decided now from the panel's mode (nothing is remembered)."""
        if remote:
            if not url.strip():
                raise BackendError("no remote backend configured: enter its URL and token")
            return Target.remote(url, token, ca_bundle)
        return self.local_target()

    @staticmethod
    def needs_consent(target: Target) -> bool:
        """Image data leaves this computer only after the user agreed (loopback URLs stay on it)."""
        return not target.loopback

    def request_status(self, target: Target, on_done) -> Call:
        """GET /v1/info without waiting: `on_done(text, error)` on the main thread (one of them is None)."""
        def done(call: Call) -> None:
            if call.ok:
                try:
                    on_done(describe_device(call.json()), None)
                    return
                except BackendError as error:
                    on_done(None, error)
                    return
            on_done(None, call.error)

        return self.transport.request(target, "GET", "/v1/info", timeout=10, on_done=done)

    # ------------------------------------------------------------------------------------------ batch

    def batch_conflict(self, device: str) -> str | None:
        """A warning when a batch would load a second model beside the interactive one on the same GPU."""
        if device == "cpu" or self.process is None or self.process.state != "running":
            return None
        running_on = str((self.process.ready_info or {}).get("device", ""))
        if not running_on.startswith("cuda"):
            return None
        need = model_need(self.process.model).gpu_gb
        return (f"The interactive backend already holds the model on {running_on}. The batch would load a second "
                f"copy of the model (about {need:.0f} GB) beside it on the same GPU, which may not fit and slows both "
                f"down. Stop the interactive backend first, or run the batch on another device.")

    def start_batch(self, input_folder: str, output_folder: str, task: str, prompt: str, model: str, device: str,
                    options: dict) -> BatchRun:
        if self.needs_install():
            raise BackendError("install the backend first (Backend section)")
        if self.batch is not None and self.batch.is_running():
            raise BackendError("a batch is already running")
        run = BatchRun(self.python, input_folder, output_folder, task, prompt, model, device, options,
                       log_dir=self.log_dir)
        run.start()
        self.batch = run
        return run

    # ------------------------------------------------------------------------------------------ session

    def poll(self) -> None:
        """Advance everything that runs outside Slicer (cheap; from the panel's timer)."""
        for child in (self.process, self.batch, self.gpu_probe, self.download):
            if child is not None:
                child.poll()
        if self.installer is not None:
            self.installer.poll()
        self.transport.poll()
        if self._restart_pending and self.process is not None and not self.process.is_running():
            self._restart_pending = False
            old, self.process = self.process, None
            self.start_local(old.model, old.device)

    def drain_logs(self) -> list[str]:
        """New lines for the log pane, readable (time, level, message), not the raw JSON lines of the log files."""
        lines = []
        if self.installer is not None:
            lines.extend(self.installer.drain())
        for source in (self.process, self.batch, self.download):
            if source is not None:
                lines.extend(text for text in map(readable, source.drain()) if text)
        return lines

    def shutdown(self) -> None:
        """Stop everything (Slicer is exiting): ask all at once, wait a few seconds in total, kill what is left."""
        self._restart_pending = False
        children = [c for c in (self.process, self.batch, self.installer, self.gpu_probe, self.download)
                    if c is not None]
        for child in children:
            child.request_stop(SHUTDOWN_WAIT_S)
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        while time.monotonic() < deadline and any(child.is_running() for child in children):
            for child in children:
                child.poll()
            time.sleep(0.05)
        for child in children:
            child.stop(0.5)
        self.transport.close()
