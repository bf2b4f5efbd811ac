"""First-use installation of the bundled backend into its own Python environment (never Slicer's).

The plan says what will be installed and how much disk it needs, so the panel can ask first; the install
itself is the backend's own `bootstrap.py setup`, run as a streaming child process. A failed install is
explained from its log: what went wrong and what to do.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .process import StreamingProcess, environment_python

GPU_ENV_GB = 8.0
CPU_ENV_GB = 3.0
WEIGHTS_GB = 17.0


def default_environment_dir() -> Path:
    """In the user profile, so it survives Slicer upgrades; CITRUSV_SLICER_ENV moves it."""
    return Path(os.environ.get("CITRUSV_SLICER_ENV", Path.home() / ".citrusv-slicer" / "backend-env"))


def nvidia_gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


@dataclass
class InstallPlan:
    backend_dir: Path
    env_dir: Path
    python: str
    gpu_name: str | None
    disk_needed_gb: float
    disk_free_gb: float

    @property
    def enough_disk(self) -> bool:
        return self.disk_free_gb >= self.disk_needed_gb

    def describe(self) -> str:
        torch_build = f"the CUDA build of PyTorch (GPU: {self.gpu_name})" if self.gpu_name else \
            "the CPU build of PyTorch (no NVIDIA GPU found: the model will be slow)"
        return (f"CitrusV will create a separate Python environment in\n  {self.env_dir}\n"
                f"and install the CitrusV backend with {torch_build}, transformers and SAM2 "
                f"(about {self.disk_needed_gb:.0f} GB, {self.disk_free_gb:.0f} GB free). Slicer's own Python packages are "
                f"not touched. The model weights (about {WEIGHTS_GB:.0f} GB) are downloaded later, on first use, "
                f"unless you choose a local folder.")

    def command(self) -> list[str]:
        return [self.python, str(self.backend_dir / "bootstrap.py"), "setup", "--extras", ""]

    def environment(self) -> dict:
        return dict(os.environ, CITRUSV_VENV=str(self.env_dir), CITRUSV_EDITABLE="0", PYTHONUNBUFFERED="1")


def plan_install(backend_dir: Path, env_dir: Path | None = None, python: str | None = None) -> InstallPlan:
    env_dir = Path(env_dir or default_environment_dir())
    gpu = nvidia_gpu_name()
    probe = env_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 1e9
    return InstallPlan(Path(backend_dir), env_dir, python or sys.executable, gpu,
                       GPU_ENV_GB if gpu else CPU_ENV_GB, free)


def is_installed(env_dir: Path) -> bool:
    return environment_python(env_dir).is_file() and (env_dir / "citrusv-setup.stamp").is_file()


def start_install(plan: InstallPlan) -> StreamingProcess:
    plan.env_dir.parent.mkdir(parents=True, exist_ok=True)
    process = StreamingProcess(plan.command(), env=plan.environment())
    process.start()
    return process


# (pattern in the log, what to tell the user)
_FAILURES = [
    ("No space left on device", "The disk is full. Free space (about {gb:.0f} GB are needed) or choose another "
                                "environment folder (setting CITRUSV_SLICER_ENV), then install again."),
    ("Temporary failure in name resolution", "The package index cannot be reached (no network, or a proxy is needed). "
                                             "Set HTTPS_PROXY, or install offline: on a connected machine run "
                                             "`pip download` for the backend into a folder, copy it here and set "
                                             "PIP_FIND_LINKS to that folder with PIP_NO_INDEX=1."),
    ("Could not find a version that satisfies", "A package was not found on the package index (offline or a "
                                                "restricted mirror). See the offline instructions in the README."),
    ("CERTIFICATE_VERIFY_FAILED", "TLS certificates could not be verified (a corporate proxy?). Point "
                                  "PIP_CERT/REQUESTS_CA_BUNDLE at your organisation's CA bundle; never disable checks."),
    ("needs Python 3.10", "Slicer's Python is too old for the backend: use Slicer 5.8 or newer."),
]


def explain_failure(log_lines: list[str], plan: InstallPlan | None = None) -> str:
    text = "\n".join(log_lines[-400:])
    for pattern, advice in _FAILURES:
        if pattern in text:
            return advice.format(gb=plan.disk_needed_gb if plan else CPU_ENV_GB)
    last = next((line for line in reversed(log_lines) if line.strip()), "no output")
    return f"The installation failed: {last.strip()[:300]}. The full log is in the Backend section."
