"""The module's Slicer side under Slicer's own runtime: a CPython laid out as Slicer 5.8.1 (3.9) and 5.10.0 (3.12) ship
it, started with their launcher's variables (slicer_runtime.py says where each fact comes from).

The backend environment is built by the module's real installer from inside that interpreter, with another Python
(pyenv's 3.11, the only one this machine has a torch wheel for), never with Slicer's; the real backend is started,
a volume goes through Apply and the result comes back. The installed backend must load its own numpy and torch,
nothing of Slicer's, and see none of the launcher's variables.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import slicer_runtime

pytestmark = [pytest.mark.slicer, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FLOW = Path(__file__).resolve().parent / "slicer_side_flow.py"
BASE_PYTHON = slicer_runtime.pyenv_python((3, 11))
VERSIONS = ["5.10.0", "5.8.1"]


@pytest.fixture(scope="session")
def slicer_layouts(session_dir):
    """Both layouts, built once per session (hard links into pyenv's standard library; numpy from pip's cache)."""
    built = {}
    for version in VERSIONS:
        if slicer_runtime.pyenv_python(slicer_runtime.RELEASES[version]) is None:
            continue
        layout = slicer_runtime.build_layout(session_dir / f"Slicer-{version}", version)
        slicer_runtime.install_module(layout, REPO)
        built[version] = layout
    return built


def layout_for(slicer_layouts, version):
    if version not in slicer_layouts:
        pytest.skip(f"no pyenv CPython {slicer_runtime.RELEASES[version]} on this machine for Slicer {version}")
    return slicer_layouts[version]


def dynamic_tags(path: Path) -> list[int]:
    data = path.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + index * phentsize)
        if p_type == 2:
            return [struct.unpack_from("<q", data, p_offset + n * 16)[0] for n in range(p_filesz // 16)]
    return []


@pytest.mark.parametrize("version", VERSIONS)
def test_the_layout_starts_only_through_the_launcher(slicer_layouts, version, tmp_path):
    """The fixture reproduces what breaks: no RPATH, no reachable build prefix, venvs that cannot start alone."""
    layout = layout_for(slicer_layouts, version)
    assert not {slicer_runtime.DT_RPATH, slicer_runtime.DT_RUNPATH} & set(dynamic_tags(layout.python_real))
    bare = subprocess.run([str(layout.python_real), "-c", "print('started')"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"]})
    assert bare.returncode != 0 and "started" not in bare.stdout  # no libpython / stdlib without the launcher
    probe = layout.run(["-c", "import sys, numpy; print(sys.prefix); print(numpy.__file__); print(sys.version_info[:2])"],
                       capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    prefix, numpy_file, python_version = probe.stdout.split("\n")[:3]
    assert prefix == str(layout.root / "lib" / "Python")
    assert numpy_file.startswith(str(layout.site_packages))
    assert python_version == str(slicer_runtime.RELEASES[version])
    # What the issue found: a virtual environment made from Slicer's Python is unusable.
    venv = layout.run(["-m", "venv", str(tmp_path / "venv")], capture_output=True, text=True)
    venv_python = tmp_path / "venv" / "bin" / "python"
    if venv.returncode == 0:
        alone = subprocess.run([str(venv_python), "-c", "import encodings"], capture_output=True, text=True,
                               env={"PATH": os.environ["PATH"]})
        assert alone.returncode != 0, "a venv made from the layout's python-real started without the launcher"


@pytest.mark.parametrize("version", VERSIONS)
def test_bootstrap_refuses_slicer_python_with_a_clear_message(slicer_layouts, version, tmp_path):
    """Run by Slicer's interpreter, bootstrap.py stops at once and says what to do (Slicer 5.8: too old; 5.10: a
    launcher-bound interpreter), instead of failing in ensurepip or building an environment that cannot start."""
    layout = layout_for(slicer_layouts, version)
    result = layout.run([str(REPO / "CitrusVBackend" / "bootstrap.py"), "setup"], capture_output=True, text=True,
                        base_env=dict(os.environ, CITRUSV_VENV=str(tmp_path / "env")))
    message = result.stdout + result.stderr
    assert result.returncode != 0
    assert not (tmp_path / "env").exists(), "an environment was created with Slicer's interpreter"
    assert "Slicer 5.8 or newer" not in message
    if slicer_runtime.RELEASES[version] < (3, 10):
        assert "needs Python 3.10 or newer" in message and "Install button" in message
    else:
        assert "launcher" in message and "PYTHONHOME" in message


def flow(layout, session_dir, name: str, tiny_checkpoint, base_env: dict, **arguments) -> dict:
    """slicer_side_flow.py under the layout, in the launcher's environment; its CITRUSV-RESULT line."""
    work = session_dir / f"flow-{name}"
    args = {"python_slicer": str(layout.python_slicer), "module_dir": str(layout.modules_dir),
            "env_dir": str(session_dir / "slicer-backend-env"), "log_dir": str(work / "logs"),
            "work_dir": str(work / "io"), "model": str(tiny_checkpoint), **arguments}
    result = layout.run([str(FLOW), json.dumps(args)], base_env, capture_output=True, text=True, timeout=1800)
    (session_dir / f"flow-{name}.log").write_text(result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("CITRUSV-RESULT ")]
    assert result.returncode == 0 and lines, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


def base_environment() -> dict:
    """The environment Slicer was started from (the launcher adds its variables on top of it). Byte-code compiling
    of the installed packages is skipped to keep CI short (PIP_COMPILE=0, pip's own setting)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", PIP_COMPILE="0")
    # The test runner's own environment must not leak into "Slicer": drop the runner's venv from PATH.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != os.path.dirname(sys.executable))
    return env


def check_flow(report: dict, layout) -> None:
    assert report["python"].startswith(".".join(map(str, layout.python_version)))
    assert report["install_state"] == "done", report.get("install_log_tail")
    assert Path(report["base_python"]).resolve() == BASE_PYTHON.joinpath("bin", "python3.11").resolve()
    assert report["backend_state"] == "running", report.get("backend_log_tail")
    # The backend loaded its own numpy and torch, nothing from Slicer's tree, and saw no launcher variable.
    assert report["backend_files_from_slicer"] == []
    assert report["backend_numpy"] and "slicer-backend-env" in report["backend_numpy"][0]
    assert report["backend_torch"] and "slicer-backend-env" in report["backend_torch"][0]
    assert report["backend_launcher_variables"] == []
    # Apply and the result download completed, the upload handed over by file to the local backend.
    assert report["apply_state"] == "done", report["apply_message"]
    assert report["used_handover"] and "upload" in report["stages"]
    assert report["segments"] and report["segments"][0][0] == "liver" and report["random_weights"]
    # The HTTP courier is Slicer's own interpreter; the backend is gone after the module's shutdown.
    assert Path(report["courier_python"]) == layout.python_real
    assert report["backend_gone"]


@pytest.mark.skipif(BASE_PYTHON is None, reason="needs pyenv's CPython 3.11 (the torch wheel here is for 3.11)")
def test_install_download_start_apply_under_slicer_5_10_with_a_chosen_python(slicer_layouts, session_dir,
                                                                              tiny_checkpoint):
    """The first hour as a user walks it (issue 22): Install, Download from a hub (on 127.0.0.1, the real
    huggingface_hub client in the installed backend), Start, first Apply; the timeline and the status lines."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/local_hub.py
    from local_hub import LocalHub

    layout = layout_for(slicer_layouts, "5.10.0")
    hub = LocalHub.from_folder("citrusv-test/Citrus-V-tiny", tiny_checkpoint).start()
    try:
        report = flow(layout, session_dir, "5.10", tiny_checkpoint, base_environment(),
                      base_python=str(BASE_PYTHON / "bin" / "python3.11"), hub_model="citrusv-test/Citrus-V-tiny",
                      hub_url=hub.url, weights_folder=str(session_dir / "weights"))
    finally:
        hub.stop()
    check_flow(report, layout)
    assert report["start_step_before_download"] == "download" and report["download_state"] == "done"
    assert report["download_path"] == str(session_dir / "weights" / "Citrus-V-tiny")
    assert report["start_step_after_download"] == "start"
    assert report["download_progress"][0].startswith("Downloading Citrus-V-tiny: ")
    assert set(report["timeline"]) == {"install_s", "download_s", "start_s", "first_apply_s"}
    assert report["sample_volume"].startswith(str(session_dir / "slicer-backend-env")) and \
        report["sample_volume"].endswith("slicerio/data/CTChest4.nrrd")
    # The record of what a first-time user sees, step by step (docs/first-use-slicer.md quotes it).
    (session_dir / "first-use-timeline.json").write_text(json.dumps(
        {"timeline": report["timeline"], "messages": report["messages"]}, indent=2))
    print("FIRST-USE", json.dumps({"timeline": report["timeline"], "messages": report["messages"]}, indent=2))


@pytest.mark.skipif(BASE_PYTHON is None, reason="needs pyenv's CPython 3.11 (the torch wheel here is for 3.11)")
def test_install_start_apply_under_slicer_5_8_with_uv_finding_the_python(slicer_layouts, session_dir, tiny_checkpoint):
    """No Python chosen: uv is pip-installed into Slicer 5.8's own Python (3.9) and finds a 3.11 on PATH (downloads
    are off here). The backend environment does not depend on Slicer's Python, so when the 5.10 test ran first in
    this session the environment it built is found up to date and reused."""
    layout = layout_for(slicer_layouts, "5.8.1")
    env = base_environment()
    env["PATH"] = os.pathsep.join([str(BASE_PYTHON / "bin"), env["PATH"]])
    env["UV_PYTHON_DOWNLOADS"] = "never"
    report = flow(layout, session_dir, "5.8", tiny_checkpoint, env, python_version="3.11")
    check_flow(report, layout)
    log = (session_dir / "flow-5.8.log").read_text()
    assert (layout.site_packages / "uv").is_dir(), "uv was not installed into Slicer's Python"
    found = [line for line in log.splitlines() if line.strip().endswith(("python3.11", "python3"))
             and Path(line.strip()).is_file()]
    assert found and Path(found[0].strip()).resolve() == (BASE_PYTHON / "bin" / "python3.11").resolve(), \
        "uv python find did not name the Python the environment was built with"
