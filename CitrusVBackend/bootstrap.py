#!/usr/bin/env python3
"""Set up CitrusV's Python environment (first time only) and run the main job or the test suite.

Standard library only, so it runs on a fresh machine with nothing but Python 3.10+:

    python3 CitrusVBackend/bootstrap.py run [--model tiny|HUB_ID|FOLDER] [citrusv options]
    python3 CitrusVBackend/bootstrap.py test [pytest options]
    python3 CitrusVBackend/bootstrap.py setup

The environment is a virtualenv at <repo>/.venv (override with CITRUSV_VENV). It gets the torch
build that fits the machine (CUDA when `nvidia-smi` finds a GPU, CPU otherwise), the backend
package in editable mode, and `sam2` without its dependency metadata (which would pull a CUDA
torch through torchvision). A stamp file records what was installed; later calls skip set-up
unless the package definition or this script changed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BACKEND_DIR = Path(__file__).resolve().parent
REPO_DIR = BACKEND_DIR.parent
VENV_DIR = Path(os.environ.get("CITRUSV_VENV", REPO_DIR / ".venv"))
TORCH_VERSION = os.environ.get("CITRUSV_TORCH_VERSION", "2.13.0")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SAM2_VERSION = "1.1.0"
STAMP_NAME = "citrusv-setup.stamp"
MIN_PYTHON = (3, 10)


def log(message: str) -> None:
    print(f"[citrusv setup] {message}", flush=True)


def venv_python() -> Path:
    return VENV_DIR / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_nvidia_gpu() -> bool:
    if os.environ.get("CITRUSV_FORCE_CPU") == "1" or shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def setup_fingerprint(gpu: bool) -> str:
    digest = hashlib.sha256()
    for path in (BACKEND_DIR / "pyproject.toml", Path(__file__).resolve()):
        digest.update(path.read_bytes())
    digest.update(f"{TORCH_VERSION} gpu={gpu} {sys.version_info[:2]}".encode())
    return digest.hexdigest()


def pip(*args: str, env: dict | None = None) -> None:
    command = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log(" ".join(command[3:]))
    started = time.monotonic()
    subprocess.run(command, check=True, env=env)
    log(f"  done in {time.monotonic() - started:.0f} s")


def install_torch(gpu: bool) -> None:
    if gpu:
        # PyPI's Linux torch wheels are the CUDA builds.
        pip(f"torch=={TORCH_VERSION}")
        return
    spec = f"torch=={TORCH_VERSION}+cpu"
    try:
        pip(spec)  # a local wheel or a configured index may already serve the CPU build
    except subprocess.CalledProcessError:
        log(f"CPU torch not found on the default index; trying {TORCH_CPU_INDEX}")
        pip(spec, "--extra-index-url", TORCH_CPU_INDEX)


def installed_torch_version() -> str:
    out = subprocess.run([str(venv_python()), "-c", "import torch; print(torch.__version__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def setup(extras: str = "test", force: bool = False) -> None:
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"CitrusV needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is {sys.version.split()[0]}.")
    gpu = has_nvidia_gpu()
    stamp = VENV_DIR / STAMP_NAME
    fingerprint = setup_fingerprint(gpu) + extras
    if not force and stamp.exists() and stamp.read_text() == fingerprint and venv_python().exists():
        return
    free_gb = shutil.disk_usage(VENV_DIR.parent if VENV_DIR.parent.exists() else REPO_DIR).free / 1e9
    log(f"setting up {VENV_DIR} ({'CUDA' if gpu else 'CPU'} build of torch; needs about "
        f"{'8' if gpu else '3'} GB of disk, {free_gb:.0f} GB free)")
    if not venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
    pip("--upgrade", "pip", "setuptools", "wheel")
    install_torch(gpu)
    # Pin the torch just installed so no dependency can swap it for another build.
    constraints = VENV_DIR / "citrusv-constraints.txt"
    constraints.write_text(f"torch=={installed_torch_version()}\n")
    target = f"{BACKEND_DIR}[{extras}]" if extras else str(BACKEND_DIR)
    # Editable for a source checkout; a copy for Slicer's installer, whose bundled source moves on upgrades.
    editable = ["-e"] if os.environ.get("CITRUSV_EDITABLE", "1") != "0" else []
    pip("-c", str(constraints), *editable, target)
    env = dict(os.environ, SAM2_BUILD_CUDA="0")
    pip("--no-build-isolation", "--no-deps", f"sam2=={SAM2_VERSION}", env=env)
    stamp.write_text(fingerprint)
    log("environment ready")


def run_in_venv(command: list[str]) -> int:
    env = dict(os.environ)
    env["PATH"] = f"{venv_python().parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(command, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    setup_parser = sub.add_parser("setup", help="create or update the environment")
    setup_parser.add_argument("--force", action="store_true", help="reinstall even if nothing changed")
    setup_parser.add_argument("--extras", default="test", help="package extras to install ('' for the service only)")
    sub.add_parser("run", help="set up, then segment a target in the sample CT", add_help=False)
    sub.add_parser("test", help="set up, then run the whole test suite", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.action == "setup":
        setup(extras=args.extras, force=args.force)
        return 0
    setup()
    python = str(venv_python())
    if args.action == "run":
        return run_in_venv([python, "-m", "citrusv_backend.cli", "demo", *rest])
    os.chdir(REPO_DIR)
    # UTF-8 mode: a library that resets the C locale mid-run (ITK's DICOM reader does) must not turn the
    # decoding of child processes' output into ASCII.
    return run_in_venv([python, "-X", "utf8", "-m", "pytest", "-c", "Testing/pytest.ini", "Testing", *rest])


if __name__ == "__main__":
    sys.exit(main())
