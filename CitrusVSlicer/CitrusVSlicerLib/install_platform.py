"""What the installer does differently per platform and network: which Python to look for, TLS through a proxy,
and whether an installed environment matches this version of the extension.

* Windows: the `py` launcher (python.org's installers put it on PATH) is asked for 3.12, 3.11, 3.10 before plain
  `python` names, which on a fresh Windows are often the Microsoft Store's stub.
* macOS on Apple silicon: Slicer runs as an x86_64 program under Rosetta, so a uv it installs is x86_64 too and
  would fetch an x86_64 Python, for which torch has had no wheels since 2.2.2. uv is asked for an aarch64 CPython
  explicitly, and every candidate Python must report arm64.
* TLS: uv verifies with its own Mozilla roots unless told to use the system's store (UV_SYSTEM_CERTS, formerly
  UV_NATIVE_TLS: both set); an organisation's CA bundle (the panel's setting) goes to uv (SSL_CERT_FILE), pip
  (PIP_CERT) and the backend's hub client (CITRUSV_CA_BUNDLE, REQUESTS_CA_BUNDLE, SSL_CERT_FILE).
* Version handshake: the installed backend's version (its dist-info in the environment, read without starting it)
  against the bundled backend's (`__version__` in its source): an updated extension offers to update.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import environment
from .preflight import apple_silicon

WINDOWS_LAUNCHER_VERSIONS = ("3.12", "3.11", "3.10")
CA_VARIABLES = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CITRUSV_CA_BUNDLE")   # where a CA bundle goes
APPLE_SILICON_ARCH = "arm64"


def tls_environment(ca_bundle: str = "") -> dict:
    """Variables for uv, pip and the backend: the system's certificate store, plus an organisation's CA if given."""
    env = {"UV_SYSTEM_CERTS": "true", "UV_NATIVE_TLS": "true"}
    if ca_bundle.strip():
        bundle = str(Path(ca_bundle.strip()).expanduser())
        # uv reads SSL_CERT_FILE in either mode; through a TLS-inspecting proxy every certificate is the org's.
        env.update({name: bundle for name in CA_VARIABLES})
    return env


def windows_launcher_commands(which) -> list[list[str]]:
    """`py -3.12` etc. when the launcher exists (`which(name)` finds executables)."""
    if environment.platform_name() != "nt" or which("py") is None:
        return []
    return [[which("py"), f"-{version}"] for version in WINDOWS_LAUNCHER_VERSIONS]


def uv_python_request(version: str, on_apple_silicon: bool | None = None) -> str:
    """What to ask uv for: "3.12", or "cpython-3.12-macos-aarch64-none" on Apple silicon (even under Rosetta)."""
    arm = apple_silicon() if on_apple_silicon is None else on_apple_silicon
    return f"cpython-{version}-macos-aarch64-none" if arm else version


def required_machine(on_apple_silicon: bool | None = None) -> str | None:
    """The platform.machine() a candidate Python must report (None: any)."""
    arm = apple_silicon() if on_apple_silicon is None else on_apple_silicon
    return APPLE_SILICON_ARCH if arm else None


def bundled_backend_version(backend_dir: Path) -> str | None:
    try:
        text = (Path(backend_dir) / "citrusv_backend" / "__init__.py").read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M)
    return found.group(1) if found else None


def installed_backend_version(env_dir: Path) -> str | None:
    """From the environment's citrusv_backend-*.dist-info (lib/pythonX.Y/site-packages, or Lib/site-packages)."""
    env_dir = Path(env_dir)
    for site in list(env_dir.glob("lib/python*/site-packages")) + [env_dir / "Lib" / "site-packages"]:
        for info in site.glob("citrusv_backend-*.dist-info"):
            try:
                metadata = (info / "METADATA").read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            found = re.search(r"^Version:\s*(\S+)", metadata, re.M)
            if found:
                return found.group(1)
    return None


def version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", version))


def update_offer(backend_dir: Path | None, env_dir: Path) -> str | None:
    """The message offering to update the environment when its backend is older than the bundled one, else None."""
    if backend_dir is None:
        return None
    bundled, installed = bundled_backend_version(backend_dir), installed_backend_version(env_dir)
    if not bundled or not installed or version_key(installed) >= version_key(bundled):
        return None
    return (f"The backend environment has CitrusV backend {installed}; this version of the extension brings "
            f"{bundled}. Press Install to update the environment (the model weights are kept).")
