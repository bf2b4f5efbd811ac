#!/usr/bin/env python3
"""Set up CitrusV's Python environment (first time only) and run the main job or the test suite.

Standard library only, so it runs on a fresh machine with nothing but Python 3.10+ (not Slicer's own Python: the
CitrusV module picks a suitable interpreter and runs this script with it):

    python3 CitrusVBackend/bootstrap.py run [--model tiny|HUB_ID|FOLDER] [citrusv options]
    python3 CitrusVBackend/bootstrap.py test [pytest options]
    python3 CitrusVBackend/bootstrap.py setup

The environment is a virtualenv at <repo>/.venv (override with CITRUSV_VENV). It gets the torch
build that fits the machine (see `torch_choice`: CUDA when `nvidia-smi` finds a GPU, from the PyTorch
index on Windows, or on Linux when CITRUSV_TORCH_CUDA_BUILDS names the builds; the next build when one has no
wheel here; CPU otherwise; the default macOS build, where the model runs on the CPU), the backend package in editable mode, and
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
import platform
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
# CUDA builds published on the PyTorch index, newest first (override: CITRUSV_TORCH_CUDA_BUILDS="cu128,cu126",
# read on Windows and Linux: on Linux it replaces PyPI's CUDA build with these, e.g. for an older driver).
CUDA_BUILDS_ENV = "CITRUSV_TORCH_CUDA_BUILDS"
TORCH_CUDA_BUILDS = ("cu130", "cu128", "cu126")
CA_BUNDLE_ENV = "CITRUSV_CA_BUNDLE"  # an organisation's CA certificates (PEM), for a proxy that inspects TLS
PIP_TRUSTSTORE = (24, 2)  # pip uses the system's certificate store itself from this version on
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
    alternatives: tuple = ()  # TorchChoices tried in order when this one has no wheel for this Python/platform


def cuda_builds(environ=os.environ) -> tuple[tuple[str, ...], bool]:
    """(the CUDA builds to consider, newest first; whether the user named them in CITRUSV_TORCH_CUDA_BUILDS)."""
    named = [tag.strip() for tag in environ.get(CUDA_BUILDS_ENV, "").split(",") if tag.strip()]
    bad = [tag for tag in named if not re.fullmatch(r"cu\d{3}", tag)]
    if bad:
        raise SystemExit(f"{CUDA_BUILDS_ENV}={environ[CUDA_BUILDS_ENV]!r}: {', '.join(bad)} is not a CUDA build tag "
                         f"like cu128 (the PyTorch index's names: {', '.join(TORCH_CUDA_BUILDS)})")
    return (tuple(named), True) if named else (TORCH_CUDA_BUILDS, False)


def driver_advice(system: str, cuda: tuple[int, int]) -> str:
    """What to do when the driver is too old for the CUDA builds: per platform, each step one that works there."""
    update = ("update the driver (NVIDIA's GeForce Experience or nvidia.com, then restart)" if system == "Windows" else
              "update the driver (your distribution's nvidia-driver package, then reboot; `nvidia-smi` shows the CUDA "
              "version it supports)")
    return (f"{update}; or set {CUDA_BUILDS_ENV} to a build this driver (CUDA {cuda[0]}.{cuda[1]}) supports, e.g. "
            f"{CUDA_BUILDS_ENV}=cu{cuda[0]}{min(cuda[1], 9)} if the PyTorch index has one, and run the set-up again; "
            f"or set CITRUSV_FORCE_CPU=1 for the CPU build")


def _cuda_build_choices(builds: tuple[str, ...], cuda: tuple[int, int], version: str, system: str) -> TorchChoice:
    usable = [tag for tag in builds if (int(tag[2:-1]), int(tag[-1])) <= cuda]
    if not usable:
        raise SystemExit(f"the NVIDIA driver supports CUDA {cuda[0]}.{cuda[1]}, older than every PyTorch CUDA build "
                         f"({', '.join(builds)}): {driver_advice(system, cuda)}")
    choices = [TorchChoice(f"torch=={version}+{tag}", f"{TORCH_INDEX}/{tag}", f"the CUDA build {tag} from the PyTorch index")
               for tag in usable]
    choices[0].alternatives = tuple(choices[1:])
    return choices[0]


def torch_choice(system: str, cuda: tuple[int, int] | None, version: str = TORCH_VERSION,
                 environ=os.environ) -> TorchChoice:
    """The torch build for this platform (system as platform.system() names it; cuda: the driver's CUDA version).

    PyPI's Linux wheels are CUDA builds; its Windows wheels are CPU-only, so a Windows GPU needs the PyTorch index's
    CUDA build (the newest the driver supports, then the older ones when a build has no wheel for this Python);
    on Linux, CITRUSV_TORCH_CUDA_BUILDS picks the index's builds the same way (a driver older than PyPI's build).
    macOS wheels carry no local version such as +cpu; the model runs there on the CPU (MPS is not used).
    """
    if system == "Darwin":
        return TorchChoice(f"torch=={version}", None, "the macOS build (the model runs on the CPU)")
    builds, named = cuda_builds(environ)
    if cuda is not None and system == "Linux" and not named:
        return TorchChoice(f"torch=={version}", None, "the CUDA build from PyPI")
    if cuda is not None and system in ("Windows", "Linux"):
        return _cuda_build_choices(builds, cuda, version, system)
    if system == "Windows":
        return TorchChoice(f"torch=={version}", None, "the CPU build (PyPI's Windows wheel)")
    # Linux without a GPU: the CPU build (a local wheel or a configured index may already serve it).
    return TorchChoice(f"torch=={version}+cpu", None, "the CPU build", fallback_index=f"{TORCH_INDEX}/cpu")


# ---------------------------------------------------------------------------------------------- pip's failures

class PipFailed(Exception):
    def __init__(self, kind: str, code: int, tail: str):
        super().__init__(f"pip failed ({kind}, exit {code})")
        self.kind, self.code, self.tail = kind, code, tail


# (kind, patterns in pip's output), checked in order: a certificate or proxy problem also ends in "no matching
# distribution" (pip found no index), so those are looked for first.
PIP_FAILURES = (
    ("certificate", ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "SSLCertVerificationError",
                     "self signed certificate", "self-signed certificate", "unable to get local issuer certificate")),
    ("proxy", ("ProxyError", "Tunnel connection failed", "407 Proxy Authentication Required", "Cannot connect to proxy")),
    ("offline", ("Failed to establish a new connection", "Temporary failure in name resolution",
                 "Name or service not known", "Network is unreachable", "getaddrinfo failed",
                 "nodename nor servname provided", "Connection timed out", "Read timed out")),
    ("missing_wheel", ("No matching distribution found", "Could not find a version that satisfies the requirement",
                       "no matching distributions available for your environment")),
)


def classify_pip_failure(output: str) -> str:
    for kind, patterns in PIP_FAILURES:
        if any(pattern in output for pattern in patterns):
            return kind
    return "other"


def pip_failure_message(error: PipFailed, what: str) -> str:
    """One line saying which of pip's failures it was and what to do (the Slicer module shows it)."""
    if error.kind == "certificate":
        return (f"could not install {what}: a server's TLS certificate was not trusted — a proxy that inspects TLS? "
                f"Set {CA_BUNDLE_ENV} to a PEM file with your organisation's CA certificates and run the set-up again")
    if error.kind == "proxy":
        return (f"could not install {what}: the proxy refused the connection — check HTTPS_PROXY (and the proxy's "
                f"login) and run the set-up again")
    if error.kind == "offline":
        return (f"could not install {what}: the package index cannot be reached (offline? DNS?) — connect to the "
                f"internet, set HTTPS_PROXY behind a proxy, or PIP_INDEX_URL for a mirror, and run the set-up again")
    if error.kind == "missing_wheel":
        return (f"could not install {what}: no wheel for Python {sys.version_info[0]}.{sys.version_info[1]} on this "
                f"platform — use Python 3.12 (on Windows `py -3.12`), or set CITRUSV_TORCH_VERSION / "
                f"{CUDA_BUILDS_ENV}")
    return f"could not install {what}: pip failed (exit {error.code}); see its lines above"


# ---------------------------------------------------------------------------------------------- TLS

def pip_version(python: Path) -> tuple[int, int]:
    try:
        out = subprocess.run([str(python), "-I", "-m", "pip", "--version"], capture_output=True, text=True,
                             env=child_environment(), timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    found = re.match(r"pip (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def tls_environment(version: tuple[int, int], environ=os.environ) -> dict:
    """What pip (and later the backend's downloads) need to trust the certificates this machine trusts.

    CITRUSV_CA_BUNDLE: that file, for pip (PIP_CERT) and for Python's ssl / httpx (SSL_CERT_FILE, REQUESTS_CA_BUNDLE).
    Otherwise pip >= 24.2 uses the system's certificate store itself (truststore); an older pip (the venv's first,
    before it upgrades itself) reads only its own certifi bundle, so it gets the system's bundle file where there is one
    (Linux; an organisation's CA installed into the system store is in it).
    """
    import ssl

    bundle = environ.get(CA_BUNDLE_ENV, "").strip()
    if bundle:
        if not Path(bundle).is_file():
            raise SystemExit(f"{CA_BUNDLE_ENV}={bundle}: no such file (a PEM file with your organisation's CA "
                             f"certificates)")
        return {"PIP_CERT": bundle, "SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle}
    if version >= PIP_TRUSTSTORE:
        return {}
    paths = ssl.get_default_verify_paths()
    system_file = next((path for path in (paths.cafile, paths.openssl_cafile) if path and Path(path).is_file()), None)
    return {"PIP_CERT": system_file} if system_file else {}


def setup_fingerprint(gpu: bool) -> str:
    digest = hashlib.sha256()
    for path in (BACKEND_DIR / "pyproject.toml", Path(__file__).resolve()):
        digest.update(path.read_bytes())
    digest.update(f"{TORCH_VERSION} gpu={gpu} {sys.version_info[:2]} {os.environ.get(CUDA_BUILDS_ENV, '')}".encode())
    return digest.hexdigest()


_CURRENT: list = []  # the pip process running now (stopped when the parent goes away)
_TLS: dict = {}  # tls_environment() for every pip, set once the environment's pip is known


def run_child(command: list[str], env: dict | None = None) -> None:
    process = subprocess.Popen(command, env=env or child_environment(), stdin=subprocess.DEVNULL)
    _CURRENT[:] = [process]
    try:
        code = process.wait()
    finally:
        _CURRENT.clear()
    if code != 0:
        raise subprocess.CalledProcessError(code, command)


def run_pip(command: list[str], env: dict) -> None:
    """pip with its output passed on line by line and its end kept, to name the failure (PipFailed.kind)."""
    import collections

    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    _CURRENT[:] = [process]
    tail: collections.deque = collections.deque(maxlen=200)
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            tail.append(line)
        code = process.wait()
    finally:
        _CURRENT.clear()
    if code != 0:
        text = "".join(tail)
        raise PipFailed(classify_pip_failure(text), code, text)


def pip(*args: str, env: dict | None = None) -> None:
    command = [str(venv_python()), "-I", "-m", "pip", "install", "--disable-pip-version-check", *args]
    log(" ".join(command[4:]))
    started = time.monotonic()
    run_pip(command, (env or child_environment()) | _TLS)
    log(f"  done in {time.monotonic() - started:.0f} s")


def install_torch(choice: TorchChoice) -> TorchChoice:
    """The chosen build, else the next of its alternatives while a build has no wheel here; returns the installed."""
    candidates = [choice, *choice.alternatives]
    for number, candidate in enumerate(candidates):
        log(f"PyTorch: {candidate.build} ({candidate.requirement})")
        try:
            install_one_torch(candidate)
            return candidate
        except PipFailed as error:
            if error.kind != "missing_wheel":
                raise SystemExit(pip_failure_message(error, candidate.requirement)) from None
            following = f"; trying {candidates[number + 1].build}" if number + 1 < len(candidates) else ""
            log(f"{candidate.requirement} has no wheel for Python {sys.version_info[0]}.{sys.version_info[1]} on this "
                f"platform{following}")
    raise SystemExit(pip_failure_message(PipFailed("missing_wheel", 1, ""),
                                         " or ".join(candidate.requirement for candidate in candidates)))


def install_one_torch(candidate: TorchChoice) -> None:
    if candidate.extra_index:
        pip(candidate.requirement, "--extra-index-url", candidate.extra_index)
        return
    try:
        pip(candidate.requirement)
    except PipFailed as error:
        if not candidate.fallback_index or error.kind != "missing_wheel":
            raise
        log(f"{candidate.requirement} not found on the configured indexes; trying {candidate.fallback_index}")
        pip(candidate.requirement, "--extra-index-url", candidate.fallback_index)


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


def running_under_rosetta() -> bool:
    """An x86_64 process on Apple silicon (macOS translates it): `sysctl.proc_translated` is 1."""
    try:
        out = subprocess.run(["sysctl", "-n", "sysctl.proc_translated"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "1"


def intel_mac_message(rosetta: bool) -> str:
    if rosetta:
        return (f"{sys.executable} is an x86_64 Python running under Rosetta on Apple silicon (as Slicer for macOS "
                f"does); PyTorch has published no macOS x86_64 wheels since 2.2.2. Run this script with an arm64 "
                f"Python 3.10+ (python.org's universal2 installer, or Homebrew's in /opt/homebrew), e.g. "
                f"`arch -arm64 /usr/local/bin/python3 {Path(__file__).name} setup`.")
    return ("This is an Intel Mac: PyTorch has published no macOS x86_64 wheels since 2.2.2, so the backend cannot be "
            "installed here. Use a remote CitrusV server (the Slicer module's Remote) on a machine with an NVIDIA GPU.")


def refuse_unusable_interpreter() -> None:
    """Stop early, with what to do, where this interpreter cannot build a working environment."""
    here = sys.version.split()[0]
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"CitrusV's backend needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; {sys.executable} is {here}. "
                 f"Run this script with a Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ installed on this computer. (In 3D "
                 f"Slicer, the CitrusV module's Install button picks one by itself: Slicer's own Python, 3.9 in "
                 f"Slicer 5.8, is never used for the backend.)")
    if sys.platform == "darwin" and platform.machine() == "x86_64":
        sys.exit(intel_mac_message(running_under_rosetta()))
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
    _TLS.update(tls_environment(pip_version(venv_python())))
    upgrade = ("--upgrade", "pip", "setuptools", "wheel")
    guarded(lambda: pip(*upgrade), "pip")
    _TLS.clear()
    _TLS.update(tls_environment(pip_version(venv_python())))  # the upgraded pip may use the system store itself
    choice = install_torch(choice)
    # Pin the torch just installed so no dependency can swap it for another build.
    torch_info = installed_torch()
    constraints = VENV_DIR / "citrusv-constraints.txt"
    constraints.write_text(f"torch=={torch_info['version']}\n")
    target = f"{BACKEND_DIR}[{extras}]" if extras else str(BACKEND_DIR)
    # Editable for a source checkout; a copy for Slicer's installer, whose bundled source moves on upgrades.
    editable = ["-e"] if os.environ.get("CITRUSV_EDITABLE", "1") != "0" else []
    guarded(lambda: pip("-c", str(constraints), *editable, target), "the backend's packages")
    guarded(lambda: pip("--no-build-isolation", "--no-deps", f"sam2=={SAM2_VERSION}",
                        env=child_environment(SAM2_BUILD_CUDA="0")), f"sam2 {SAM2_VERSION}")
    describe_installed(torch_info, choice, cuda)
    stamp.write_text(fingerprint)
    log("environment ready")


def guarded(step, what: str) -> None:
    """A pip step; its failure ends the set-up with one line naming the kind (certificate, proxy, offline...)."""
    try:
        step()
    except PipFailed as error:
        raise SystemExit(pip_failure_message(error, what)) from None


def describe_installed(torch_info: dict, choice: TorchChoice, cuda: tuple[int, int] | None) -> None:
    """Say (and record in citrusv-setup.json) what was installed: a CUDA build that cannot see the GPU is named."""
    build = f"CUDA {torch_info['cuda_build']} build" if torch_info.get("cuda_build") else "CPU build"
    seen = f"GPU: {torch_info['device']}" if torch_info.get("cuda_available") else "no CUDA GPU visible"
    log(f"installed torch {torch_info['version']} ({build}; {seen})")
    if cuda is not None and not torch_info.get("cuda_available"):
        log(f"WARNING: an NVIDIA GPU is present (driver CUDA {cuda[0]}.{cuda[1]}) but this torch cannot use it: "
            f"{driver_advice(platform.system(), cuda)}")
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
