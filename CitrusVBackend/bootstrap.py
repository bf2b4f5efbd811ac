#!/usr/bin/env python3
"""Set up CitrusV's Python environment (first time only) and run the main job or the test suite.

Standard library only, so it runs on a fresh machine with nothing but Python 3.10+ (not Slicer's own Python: the
CitrusV module picks a suitable interpreter and runs this script with it):

    python3 CitrusVBackend/bootstrap.py run [--model tiny|HUB_ID|FOLDER] [citrusv options]
    python3 CitrusVBackend/bootstrap.py test [pytest options]
    python3 CitrusVBackend/bootstrap.py setup

The environment is a virtualenv at <repo>/.venv (override with CITRUSV_VENV). It gets the torch
build that fits the machine (see `torch_choice`: CUDA when `nvidia-smi` finds a GPU, from the PyTorch
index on Windows; CPU otherwise; the default macOS build), the backend package in editable mode, and
`sam2` without its dependency metadata (which would pull a CUDA torch through torchvision). What was
installed is written to citrusv-setup.json in the environment. A stamp file records the set-up; later
calls skip it unless the package definition or this script changed.

Every interpreter this script starts runs isolated (-I) in an environment without PYTHONHOME,
PYTHONPATH and the like, so a launcher's variables (Slicer's) cannot make it import another
installation's packages.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BACKEND_DIR = Path(__file__).resolve().parent
REPO_DIR = BACKEND_DIR.parent
VENV_DIR = Path(os.environ.get("CITRUSV_VENV", REPO_DIR / ".venv"))
TORCH_VERSION = os.environ.get("CITRUSV_TORCH_VERSION", "2.13.0")
TORCH_INDEX = "https://download.pytorch.org/whl"
# CUDA builds published on the PyTorch index, newest first (override: CITRUSV_TORCH_CUDA_BUILDS="cu130,cu128").
TORCH_CUDA_BUILDS = tuple(os.environ.get("CITRUSV_TORCH_CUDA_BUILDS", "cu130,cu128,cu126").split(","))
SAM2_VERSION = "1.1.0"
STAMP_NAME = "citrusv-setup.stamp"
INSTALLED_NAME = "citrusv-setup.json"
MIN_PYTHON = (3, 10)
# What a launcher may have put in the environment that must not reach the interpreters started here.
FOREIGN_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
                     "PIP_REQUIRE_VIRTUALENV", "__PYVENV_LAUNCHER__", "VIRTUAL_ENV")


def log(message: str) -> None:
    print(f"[citrusv setup] {message}", flush=True)


def venv_python() -> Path:
    return VENV_DIR / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def child_environment(**extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in FOREIGN_VARIABLES}
    env.update(extra)
    return env


def nvidia_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the NVIDIA driver supports, from nvidia-smi's header; None without an NVIDIA GPU."""
    if os.environ.get("CITRUSV_FORCE_CPU") == "1" or shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0 or "NVIDIA-SMI" not in result.stdout:
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", result.stdout)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def has_nvidia_gpu() -> bool:
    return nvidia_cuda_version() is not None


@dataclass
class TorchChoice:
    requirement: str
    extra_index: str | None
    build: str            # what the log and citrusv-setup.json say was chosen
    fallback_index: str | None = None


def torch_choice(system: str, cuda: tuple[int, int] | None, version: str = TORCH_VERSION) -> TorchChoice:
    """The torch build for this platform (system as platform.system() names it; cuda: the driver's CUDA version).

    PyPI's Linux wheels are CUDA builds; its Windows wheels are CPU-only, so a Windows GPU needs the PyTorch index's
    CUDA build (the newest the driver supports); macOS wheels (MPS) carry no local version such as +cpu.
    """
    if system == "Darwin":
        return TorchChoice(f"torch=={version}", None, "the macOS build (Apple GPU through MPS where available)")
    if cuda is not None and system == "Linux":
        return TorchChoice(f"torch=={version}", None, "the CUDA build from PyPI")
    if cuda is not None and system == "Windows":
        usable = [tag for tag in TORCH_CUDA_BUILDS if tag.startswith("cu") and tag[2:].isdigit() and
                  (int(tag[2:-1]), int(tag[-1])) <= cuda]
        if not usable:
            raise SystemExit(f"the NVIDIA driver supports CUDA {cuda[0]}.{cuda[1]}, older than every PyTorch CUDA build "
                             f"({', '.join(TORCH_CUDA_BUILDS)}): update the driver, or set CITRUSV_FORCE_CPU=1")
        tag = usable[0]
        return TorchChoice(f"torch=={version}+{tag}", f"{TORCH_INDEX}/{tag}", f"the CUDA build {tag} from the PyTorch index")
    if system == "Windows":
        return TorchChoice(f"torch=={version}", None, "the CPU build (PyPI's Windows wheel)")
    # Linux without a GPU: the CPU build (a local wheel or a configured index may already serve it).
    return TorchChoice(f"torch=={version}+cpu", None, "the CPU build", fallback_index=f"{TORCH_INDEX}/cpu")


def setup_fingerprint(gpu: bool) -> str:
    digest = hashlib.sha256()
    for path in (BACKEND_DIR / "pyproject.toml", Path(__file__).resolve()):
        digest.update(path.read_bytes())
    digest.update(f"{TORCH_VERSION} gpu={gpu} {sys.version_info[:2]}".encode())
    return digest.hexdigest()


_CURRENT: list = []  # the pip process running now (stopped when the parent goes away)


def run_child(command: list[str], env: dict | None = None) -> None:
    process = subprocess.Popen(command, env=env or child_environment(), stdin=subprocess.DEVNULL)
    _CURRENT[:] = [process]
    try:
        code = process.wait()
    finally:
        _CURRENT.clear()
    if code != 0:
        raise subprocess.CalledProcessError(code, command)


def pip(*args: str, env: dict | None = None) -> None:
    command = [str(venv_python()), "-I", "-m", "pip", "install", "--disable-pip-version-check", *args]
    log(" ".join(command[4:]))
    started = time.monotonic()
    run_child(command, env)
    log(f"  done in {time.monotonic() - started:.0f} s")


def install_torch(choice: TorchChoice) -> None:
    log(f"PyTorch: {choice.build} ({choice.requirement})")
    if choice.extra_index:
        pip(choice.requirement, "--extra-index-url", choice.extra_index)
        return
    try:
        pip(choice.requirement)
    except subprocess.CalledProcessError:
        if not choice.fallback_index:
            raise
        log(f"{choice.requirement} not found on the configured indexes; trying {choice.fallback_index}")
        pip(choice.requirement, "--extra-index-url", choice.fallback_index)


def installed_torch() -> dict:
    """What the environment's torch is (its own, never one a launcher's PYTHONPATH would put first)."""
    probe = ("import json, torch; cuda = torch.cuda.is_available(); print(json.dumps({'version': torch.__version__, "
             "'cuda_build': torch.version.cuda, 'cuda_available': cuda, 'file': torch.__file__, "
             "'device': torch.cuda.get_device_name(0) if cuda else None}))")
    out = subprocess.run([str(venv_python()), "-I", "-c", probe], check=True, capture_output=True, text=True,
                         env=child_environment())
    return json.loads(out.stdout.strip().splitlines()[-1])


def installed_torch_version() -> str:
    return installed_torch()["version"]


def refuse_unusable_interpreter() -> None:
    """Stop early, with what to do, where this interpreter cannot build a working environment."""
    here = sys.version.split()[0]
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"CitrusV's backend needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; {sys.executable} is {here}. "
                 f"Run this script with a Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ installed on this computer. (In 3D "
                 f"Slicer, the CitrusV module's Install button picks one by itself: Slicer's own Python, 3.9 in "
                 f"Slicer 5.8, is never used for the backend.)")
    executable = Path(sys.executable)
    if executable.stem in ("python-real", "PythonSlicer") or os.environ.get("PYTHONHOME"):
        sys.exit(f"{sys.executable} runs through a launcher (PYTHONHOME={os.environ.get('PYTHONHOME', '')!r}): a "
                 f"virtual environment made from it cannot start without that launcher's variables (this is how "
                 f"3D Slicer's Python works). Run this script with a Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ installed "
                 f"on this computer, or use the CitrusV module's Install button in Slicer.")


def create_venv() -> None:
    try:
        run_child([sys.executable, "-I", "-m", "venv", str(VENV_DIR)])
        # The environment must start on its own, as the module will start it: isolated, no launcher variables.
        run_child([str(venv_python()), "-I", "-c", "import encodings, venv"])
    except (OSError, subprocess.CalledProcessError) as error:
        shutil.rmtree(VENV_DIR, ignore_errors=True)
        sys.exit(f"could not create a working virtual environment in {VENV_DIR} with {sys.executable} ({error}). "
                 f"On Debian/Ubuntu install the python3-venv package; otherwise use another Python "
                 f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}+.")


def stop_with_parent() -> None:
    """With CITRUSV_EXIT_WITH_PARENT=1 (the Slicer module sets it), end this set-up and its pip when stdin closes."""
    if os.environ.get("CITRUSV_EXIT_WITH_PARENT") != "1":
        return

    def watch() -> None:
        try:
            while os.read(0, 65536):  # the descriptor, not sys.stdin (whose lock would abort the exit)
                pass
        except OSError:
            pass
        for process in list(_CURRENT):
            process.kill()
        log("the launcher went away: set-up stopped (run it again to finish)")
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def setup(extras: str = "test", force: bool = False) -> None:
    refuse_unusable_interpreter()
    stop_with_parent()
    import platform

    cuda = nvidia_cuda_version()
    gpu = cuda is not None
    stamp = VENV_DIR / STAMP_NAME
    fingerprint = setup_fingerprint(gpu) + extras
    if not force and stamp.exists() and stamp.read_text() == fingerprint and venv_python().exists():
        return
    choice = torch_choice(platform.system(), cuda)
    free_gb = shutil.disk_usage(VENV_DIR.parent if VENV_DIR.parent.exists() else REPO_DIR).free / 1e9
    log(f"setting up {VENV_DIR} with Python {sys.version.split()[0]} ({sys.executable}); PyTorch: {choice.build}; "
        f"needs about {'8' if gpu else '3'} GB of disk, {free_gb:.0f} GB free")
    if not venv_python().exists():
        create_venv()
    pip("--upgrade", "pip", "setuptools", "wheel")
    install_torch(choice)
    # Pin the torch just installed so no dependency can swap it for another build.
    torch_info = installed_torch()
    constraints = VENV_DIR / "citrusv-constraints.txt"
    constraints.write_text(f"torch=={torch_info['version']}\n")
    target = f"{BACKEND_DIR}[{extras}]" if extras else str(BACKEND_DIR)
    # Editable for a source checkout; a copy for Slicer's installer, whose bundled source moves on upgrades.
    editable = ["-e"] if os.environ.get("CITRUSV_EDITABLE", "1") != "0" else []
    pip("-c", str(constraints), *editable, target)
    pip("--no-build-isolation", "--no-deps", f"sam2=={SAM2_VERSION}", env=child_environment(SAM2_BUILD_CUDA="0"))
    describe_installed(torch_info, choice, cuda)
    stamp.write_text(fingerprint)
    log("environment ready")


def describe_installed(torch_info: dict, choice: TorchChoice, cuda: tuple[int, int] | None) -> None:
    """Say (and record in citrusv-setup.json) what was installed: a CUDA build that cannot see the GPU is named."""
    build = f"CUDA {torch_info['cuda_build']} build" if torch_info.get("cuda_build") else "CPU build"
    seen = f"GPU: {torch_info['device']}" if torch_info.get("cuda_available") else "no CUDA GPU visible"
    log(f"installed torch {torch_info['version']} ({build}; {seen})")
    if cuda is not None and not torch_info.get("cuda_available"):
        log(f"WARNING: an NVIDIA GPU is present (driver CUDA {cuda[0]}.{cuda[1]}) but this torch cannot use it; update "
            f"the driver, or set CITRUSV_TORCH_CUDA_BUILDS to a build the driver supports and run set-up again")
    record = {"python": sys.version.split()[0], "base_python": sys.executable, "torch": torch_info,
              "torch_choice": choice.build, "requirement": choice.requirement, "driver_cuda":
              f"{cuda[0]}.{cuda[1]}" if cuda else None, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (VENV_DIR / INSTALLED_NAME).write_text(json.dumps(record, indent=2) + "\n")


def run_in_venv(command: list[str]) -> int:
    env = child_environment()
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
