"""First-use installation of the bundled backend into its own Python environment, never with Slicer's Python.

Slicer's interpreter (bin/python-real behind the PythonSlicer launcher) cannot build a virtual environment that
starts on its own, and Slicer 5.8's is 3.9; so the backend's environment is made by a separate Python 3.10+:
  1. the Python the user chose (the panel's "Backend Python" field, or CITRUSV_BASE_PYTHON), else
  2. one that `uv` provides (uv is pip-installed into Slicer's Python as slicer.util.pip_install would, then
     `uv python find` / `uv python install` give a standalone CPython), else
  3. a Python 3.10+ found on PATH.
That interpreter runs the backend's own `bootstrap.py setup` (isolated, in Slicer's startup environment), which
creates the environment, picks the torch build for the platform and records what it installed.

Nothing here blocks: the GPU probe and every step are child processes followed by `poll()` from the panel's timer.
A failed install is explained from its log: what went wrong and what to do.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .environment import isolated, startup_environment
from .install_platform import required_machine, tls_environment, uv_python_request, windows_launcher_commands
from .process import StreamingProcess, environment_python

from .requirements import CPU_ENV_GB, GPU_ENV_GB, KNOWN_MODELS, RELEASED_MODEL  # noqa: E402  (one table of sizes)

WEIGHTS_GB = KNOWN_MODELS[RELEASED_MODEL].weights_gb
BACKEND_PYTHON_VERSION = os.environ.get("CITRUSV_BACKEND_PYTHON_VERSION", "3.12")
SYSTEM_CANDIDATES = ("python3.12", "python3.11", "python3.13", "python3.10", "python3", "python")
# Prints the version, the machine (arm64 / x86_64 / AMD64) and the interpreter's own path; argv[1] (if any) is the
# machine it must be (an x86_64 Python on Apple silicon has no torch wheels).
_CHECK = ("import sys, platform, venv, ensurepip; v = sys.version_info; m = platform.machine(); "
          "print('CITRUSV-PYTHON', v[0], v[1], m, sys.executable); "
          "need = sys.argv[1] if len(sys.argv) > 1 else ''; "
          "need and m != need and print('this Python is built for ' + m + ', not ' + need + "
          "' (an x86_64 Python under Rosetta has no PyTorch wheels): skipped'); "
          "sys.exit(0 if v >= (3, 10) and (not need or m == need) else 3)")


def default_environment_dir() -> Path:
    """In the user profile, so it survives Slicer upgrades; CITRUSV_SLICER_ENV moves it."""
    return Path(os.environ.get("CITRUSV_SLICER_ENV", Path.home() / ".citrusv-slicer" / "backend-env"))


def is_installed(env_dir: Path) -> bool:
    return environment_python(env_dir).is_file() and (env_dir / "citrusv-setup.stamp").is_file()


def installed_summary(env_dir: Path) -> str:
    """What bootstrap.py recorded it installed (one line for the panel), or ''."""
    try:
        record = json.loads((Path(env_dir) / "citrusv-setup.json").read_text())
    except (OSError, ValueError):
        return ""
    torch = record.get("torch", {})
    build = f"CUDA {torch['cuda_build']}" if torch.get("cuda_build") else "CPU"
    seen = f", GPU {torch['device']}" if torch.get("cuda_available") else ""
    return f"Python {record.get('python')}, torch {torch.get('version')} ({build} build{seen})"


class GpuProbe(StreamingProcess):
    """`nvidia-smi` as a child (it can take seconds when the driver wakes up): `gpu_name` once it has finished."""

    def __init__(self, log_dir: Path | None = None):
        super().__init__(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], name="gpu-probe",
                         log_dir=log_dir)
        self.available = shutil.which("nvidia-smi") is not None

    def start(self) -> None:
        if self.available:
            super().start()

    @property
    def finished(self) -> bool:
        self.poll()
        return not self.available or (self._process is not None and not self.is_running())

    def _first_gpu(self) -> list[str]:
        if not self.available or self.returncode != 0:
            return []
        lines = [line.strip() for line in self.lines if line.strip()]
        return [part.strip() for part in lines[0].rsplit(",", 1)] if lines else []

    @property
    def gpu_name(self) -> str | None:
        """"NVIDIA GeForce RTX 4090" (the first GPU's name)."""
        parts = self._first_gpu()
        return parts[0] if parts else None

    @property
    def gpu_memory_gb(self) -> float | None:
        """Its memory in GB as cards are labelled (GiB: "12288 MiB" -> 12)."""
        parts = self._first_gpu()
        if len(parts) < 2 or not parts[1].split()[0].replace(".", "").isdigit():
            return None
        return float(parts[1].split()[0]) / 1024


@dataclass
class InstallPlan:
    backend_dir: Path
    env_dir: Path
    base_python: str | None          # chosen by the user; None: uv, then PATH
    gpu_name: str | None
    disk_needed_gb: float
    disk_free_gb: float
    python_version: str = BACKEND_PYTHON_VERSION
    ca_bundle: str = ""               # an organisation's CA bundle (PEM), for proxies that inspect TLS
    update: bool = False              # an older backend is installed: set it up again even if the stamp matches

    @property
    def enough_disk(self) -> bool:
        return self.disk_free_gb >= self.disk_needed_gb

    def describe(self) -> str:
        torch_build = f"PyTorch with CUDA (GPU: {self.gpu_name})" if self.gpu_name else \
            "the CPU build of PyTorch (no NVIDIA GPU found: the model will be slow)"
        python = f"the Python you chose ({self.base_python})" if self.base_python else \
            (f"a Python {self.python_version} provided by uv (installed into Slicer's Python first if needed), or a "
             f"Python 3.10+ found on this computer")
        return (f"CitrusV will create a separate Python environment in\n  {self.env_dir}\n"
                f"with {python}, and install the CitrusV backend with {torch_build}, transformers and SAM2 "
                f"(about {self.disk_needed_gb:.0f} GB, {self.disk_free_gb:.0f} GB free). Slicer's own Python packages are "
                f"not touched{'' if self.base_python else ' (except uv, if it is not there yet)'}. The model weights "
                f"(about {WEIGHTS_GB:.0f} GB) are downloaded later, on first use, unless you choose a local folder.")

    def bootstrap_command(self, python: str) -> list[str]:
        return isolated(python) + [str(self.backend_dir / "bootstrap.py"), "setup", "--extras", ""] + \
            (["--force"] if self.update else [])

    def environment(self) -> dict:
        env = self.network_environment()
        env.update(CITRUSV_VENV=str(self.env_dir), CITRUSV_EDITABLE="0", CITRUSV_EXIT_WITH_PARENT="1")
        return env

    def network_environment(self) -> dict:
        """Slicer's startup environment with the TLS settings for uv and pip."""
        env = startup_environment()
        env.update(tls_environment(self.ca_bundle))
        return env


def plan_install(backend_dir: Path, env_dir: Path | None = None, base_python: str | None = None,
                 gpu_name: str | None = None, ca_bundle: str = "", update: bool = False) -> InstallPlan:
    """No child processes here: `gpu_name` comes from a finished GpuProbe."""
    env_dir = Path(env_dir or default_environment_dir())
    probe = env_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 1e9
    chosen = (base_python or os.environ.get("CITRUSV_BASE_PYTHON") or "").strip() or None
    return InstallPlan(Path(backend_dir), env_dir, chosen, gpu_name, GPU_ENV_GB if gpu_name else CPU_ENV_GB, free,
                       ca_bundle=ca_bundle, update=update)


@dataclass
class _Step:
    name: str
    command: object                           # a list, or a callable giving it when the step starts (None: skip)
    env: dict
    on_success: object = None                 # (process) -> None
    fallback: bool = False                    # a failure moves on to the next way of finding a Python
    process: StreamingProcess | None = field(default=None, repr=False)


class InstallRun:
    """The installation as a chain of child processes; `state`: running, done, failed, cancelled."""

    def __init__(self, plan: InstallPlan, log_dir: Path | None = None, slicer_python: str | None = None,
                 slicer_env: dict | None = None):
        self.plan = plan
        self.log_dir = log_dir
        self.slicer_python = slicer_python or sys.executable   # PythonSlicer inside Slicer
        self.slicer_env = dict(os.environ if slicer_env is None else slicer_env)
        self.state = "idle"
        self.lines: list[str] = []
        self.base_python: str | None = None
        self._new: list[str] = []
        self._steps: list[_Step] = []
        self._current: _Step | None = None

    # ------------------------------------------------------------------------------------------ interface

    def start(self) -> None:
        self.plan.env_dir.parent.mkdir(parents=True, exist_ok=True)
        self.state = "running"
        if self.plan.base_python:
            self._steps = [self._check_step(self.plan.base_python, fallback=False)]
        else:
            self._say(f"looking for a Python {self.plan.python_version} for the backend (uv, then this computer's)")
            self._steps = self._launcher_checks() + self._uv_steps() + self._path_checks()
        self._next()

    def poll(self) -> None:
        if self._current is None or self._current.process is None:
            return
        process = self._current.process
        for line in process.drain():
            self._say(line)
        if process.is_running():
            return
        for line in process.drain():
            self._say(line)
        step, self._current = self._current, None
        if self.state == "cancelled":
            return
        if process.returncode == 0:
            if step.on_success is not None:
                step.on_success(process)
            if step.name == "bootstrap":
                self.state = "done"
                return
            self._next()
        elif step.fallback:
            self._say(f"({step.name} did not work: trying the next way)")
            self._next()
        else:
            self.state = "failed"

    def drain(self) -> list[str]:
        self.poll()
        new, self._new = self._new, []
        return new

    def is_running(self) -> bool:
        """Still installing, or a cancelled step's process not yet gone."""
        current = self._current.process if self._current else None
        return self.state == "running" or (current is not None and current.is_running())

    @property
    def returncode(self) -> int | None:
        return None if self.is_running() else (0 if self.state == "done" else 1)

    def request_stop(self, grace_seconds: float = 5.0) -> None:
        if self.state == "running":
            self.state = "cancelled"
            self._say("installation cancelled")
            if self._current and self._current.process:
                self._current.process.request_stop(grace_seconds)

    def stop(self, grace_seconds: float = 5.0) -> None:
        current = self._current
        self.request_stop(grace_seconds)
        if current and current.process:
            current.process.stop(grace_seconds)

    # ------------------------------------------------------------------------------------------ steps

    def _next(self) -> None:
        while self._steps:
            step = self._steps.pop(0)
            command = step.command() if callable(step.command) else step.command
            if not command:
                continue
            step.process = StreamingProcess(command, env=step.env, name="install", log_dir=self.log_dir,
                                            graceful="stdin", cwd=str(self.plan.env_dir.parent))
            try:
                step.process.start()
            except OSError as error:
                self._say(f"{step.name}: {error}")
                if step.fallback:
                    continue
                self.state = "failed"
                return
            self._current = step
            return
        self.state = "failed"
        self._say("no Python 3.10 or newer was found for the backend. Install one (python.org, or your system's "
                  "package manager), then choose it in the Backend section (Backend Python) and press Install again.")

    def _check_step(self, python: str, fallback: bool, launcher: list[str] | None = None) -> _Step:
        """Is `python` (or the `py -3.X` launcher command) a usable 3.10+ for this machine's architecture?"""
        def found(process: StreamingProcess) -> None:
            for line in process.lines:
                if line.startswith("CITRUSV-PYTHON "):
                    self.base_python = line.split(" ", 4)[4].strip()
            self._say(f"the backend environment will be made with {self.base_python}")
            self._steps = [_Step("bootstrap", self.plan.bootstrap_command(self.base_python), self.plan.environment())]
        command = (launcher + ["-I", "-u", "-X", "utf8"]) if launcher else isolated(python)
        machine = required_machine()
        return _Step(f"check {' '.join(launcher) if launcher else python}",
                     command + ["-c", _CHECK] + ([machine] if machine else []), startup_environment(), found, fallback)

    def _launcher_checks(self) -> list[_Step]:
        """Windows: `py -3.12`, `py -3.11`, `py -3.10` (python.org's launcher) before anything else."""
        path = startup_environment().get("PATH")
        return [self._check_step(command[0], fallback=True, launcher=command)
                for command in windows_launcher_commands(lambda name: shutil.which(name, path=path))]

    def _path_checks(self) -> list[_Step]:
        seen, steps = set(), []
        path = startup_environment().get("PATH")
        for name in SYSTEM_CANDIDATES:
            location = shutil.which(name, path=path)
            if location and os.path.realpath(location) not in seen:
                seen.add(os.path.realpath(location))
                steps.append(self._check_step(location, fallback=True))
        return steps

    def _uv_steps(self) -> list[_Step]:
        """pip install uv into Slicer's Python (if missing); uv finds a CPython, or installs one and finds it."""
        version = self.plan.python_version
        steps = []
        if _uv_binary() is None:
            # As slicer.util.pip_install does (Slicer's launcher environment: this is Slicer's own Python), but as a
            # child process the panel follows, not a call that blocks it.
            slicer_env = dict(self.slicer_env)
            if self.plan.ca_bundle:
                slicer_env["PIP_CERT"] = self.plan.ca_bundle
            steps.append(_Step("pip install uv", [self.slicer_python, "-m", "pip", "install", "uv"], slicer_env,
                               fallback=True))

        def uv(*arguments: str):
            return lambda: [binary, *arguments] if (binary := _uv_binary()) else None

        def found(process: StreamingProcess) -> None:
            paths = [line.strip() for line in process.lines if line.strip() and Path(line.strip()).is_file()]
            if paths:  # the remaining uv steps are not needed; the PATH checks stay as the last resort
                self._steps = [self._check_step(paths[-1], fallback=True)] + self._path_checks()

        env = self.plan.network_environment()
        request = uv_python_request(version)   # an aarch64 CPython on Apple silicon, even under Rosetta
        # --system: never a virtual environment (an active one, or a .venv in the current folder or above).
        find = ("python", "find", "--system", request)
        return steps + [_Step("uv python find", uv(*find), env, found, fallback=True),
                        _Step("uv python install", uv("python", "install", request), env, fallback=True),
                        _Step("uv python find", uv(*find), env, found, fallback=True)]

    def _say(self, line: str) -> None:
        self.lines.append(line)
        self._new.append(line)


def _uv_binary() -> str | None:
    """uv's executable, installed by pip into Slicer's Python (its `uv` module knows where), or on PATH."""
    importlib.invalidate_caches()
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError, AttributeError):
        return shutil.which("uv")


_CERTIFICATE = ("A certificate failure: the connection to the package index was intercepted by a proxy that "
                "inspects TLS (usual in hospitals and companies), whose certificate this computer's Python does not "
                "trust. Ask IT for the organisation's CA bundle (a .pem file) and choose it in the Backend section "
                "(CA bundle), then install again. uv and pip already use the system's certificate store; checks are "
                "never disabled.")
_PROXY = ("A proxy failure: the package index is only reachable through a proxy that refused or needs a login. Set "
          "HTTPS_PROXY (for example http://user:password@proxy:8080) in the environment Slicer starts with, then "
          "install again.")
_TORCH_BUILD = ("No PyTorch build for this machine was found on the package index ({line}). If the log shows a CUDA "
                "build (+cu...), the index or mirror does not serve it: set-up tries the builds it supports in turn; "
                "update the NVIDIA driver, or install the CPU build (set CITRUSV_FORCE_CPU=1) and use Device: cpu.")

_BOOTSTRAP_VERDICTS = ("could not install ", "the NVIDIA driver supports CUDA")

# (pattern in the log, what to tell the user)
_FAILURES = [
    ("No space left on device", "The disk is full. Free space (about {gb:.0f} GB are needed) or choose another "
                                "environment folder (setting CITRUSV_SLICER_ENV), then install again."),
    # Before the generic "not found": a proxy or a TLS-inspecting proxy makes every index look empty.
    ("CERTIFICATE_VERIFY_FAILED", _CERTIFICATE),
    ("invalid peer certificate", _CERTIFICATE),             # uv (rustls): UnknownIssuer, BadSignature...
    ("self-signed certificate", _CERTIFICATE),
    ("SSLError", _CERTIFICATE),
    ("ProxyError", _PROXY),
    ("407 Proxy Authentication Required", _PROXY),
    ("Tunnel connection failed", _PROXY),
    ("Temporary failure in name resolution", "The package index could not be reached (offline, or a proxy is needed). "
                                             "Set HTTPS_PROXY, or install offline: on a connected machine run "
                                             "`pip download` for the backend into a folder, copy it here and set "
                                             "PIP_FIND_LINKS to that folder with PIP_NO_INDEX=1."),
    ("satisfies the requirement torch", _TORCH_BUILD),
    ("Could not find a version that satisfies", "A package was not found on the package index (offline or a "
                                                "restricted mirror). See the offline instructions in the README."),
    ("needs Python 3.10", "The chosen Python is too old for the backend: choose a Python 3.10 or newer as Backend "
                          "Python (Slicer's own Python is never used for it), or leave the field empty."),
    ("no Python 3.10 or newer was found", "No Python 3.10+ was found for the backend: install one (python.org or "
                                          "your package manager), choose it as Backend Python and install again."),
    ("python3-venv", "This Python cannot create virtual environments: install your system's python3-venv package, "
                     "or choose another Python as Backend Python."),
]


def explain_failure(log_lines: list[str], plan: InstallPlan | None = None) -> str:
    # bootstrap.py names what it knows itself (a CUDA build with no wheel after its fall-backs, a certificate, a
    # proxy, the driver, an x86_64 Python under Rosetta): its own last line comes first.
    own = next((line.strip() for line in reversed(log_lines) if line.strip().startswith(_BOOTSTRAP_VERDICTS)), None)
    if own:
        return f"The installation failed: {own[:600]}"
    text = "\n".join(log_lines[-400:])
    for pattern, advice in _FAILURES:
        if pattern in text:
            line = next((entry.strip()[:200] for entry in reversed(log_lines) if pattern in entry), "")
            return advice.format(gb=plan.disk_needed_gb if plan else CPU_ENV_GB, line=line)
    last = next((line for line in reversed(log_lines) if line.strip()), "no output")
    return f"The installation failed: {last.strip()[:300]}. The full log is in the Backend section."

