"""The module's child processes (backend, installer, GPU probe, batch, courier): they start outside Slicer's launcher
environment, never block the panel, get no console on Windows, and nothing outlives Slicer (exit, crash, Reload).

Installing with Slicer's Python and threads under PythonQt are in test_slicer_runtime.py and test_gil_loop.py.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import slicer_runtime
from module_helpers import run_until, widget_source

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "CitrusVSlicer"
MODULE_SOURCE = (MODULE_DIR / "CitrusVSlicer.py").read_text()
WIDGET_SOURCE = widget_source()  # the module file and its panel mixins (CitrusVSlicerPanels/)


# ---------------------------------------------------------------------------------------------- the launcher environment

LAUNCHER_ONLY = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "PIP_REQUIRE_VIRTUALENV", "SLICER_HOME",
                 "ITK_AUTOLOAD_PATH", "QTWEBENGINE_DISABLE_SANDBOX", "QT_PLUGIN_PATH", "LibraryPaths")


@pytest.fixture
def inside_slicers_environment(tmp_path, monkeypatch):
    """This process's environment as Slicer 5.10's launcher makes it (slicer_runtime.launcher_environment)."""
    root = tmp_path / "Slicer-5.10.0-linux-amd64"
    launched = slicer_runtime.launcher_environment(root, "5.10.0", (3, 12), base=dict(os.environ))
    for name, value in launched.items():
        monkeypatch.setenv(name, value)
    return root


@pytest.mark.unit
def test_every_child_starts_isolated_and_without_the_launcher_environment(inside_slicers_environment, tmp_path):
    from CitrusVSlicerLib.batch import BatchRun
    from CitrusVSlicerLib.environment import startup_environment
    from CitrusVSlicerLib.installer import GpuProbe, plan_install
    from CitrusVSlicerLib.process import BackendProcess, bundled_backend_dir

    root = str(inside_slicers_environment)
    (tmp_path / "in").mkdir()
    plan = plan_install(bundled_backend_dir(MODULE_DIR), tmp_path / "env", base_python="/usr/bin/python3.12")
    children = {"backend": BackendProcess("/env/bin/python", "tiny", "cpu", log_dir=tmp_path),
                "batch": BatchRun("/env/bin/python", str(tmp_path / "in"), str(tmp_path / "out"), "segment", "x",
                                  "tiny", "cpu", {}, log_dir=tmp_path),
                "gpu probe": GpuProbe(tmp_path)}
    environments = {name: child.env for name, child in children.items()}
    environments["installer"] = plan.environment()
    environments["startup"] = startup_environment()
    for name, env in environments.items():
        leaked = [key for key in LAUNCHER_ONLY if key in env]
        assert not leaked, f"{name} inherits Slicer's {leaked}"
        for key in ("PATH", "LD_LIBRARY_PATH", "SSL_CERT_FILE"):
            assert root not in env.get(key, ""), f"{name}: {key} still points into Slicer's tree"
    assert environments["backend"]["CITRUSV_TOKEN"] == children["backend"].token
    for child in ("backend", "batch"):
        assert children[child].command[1] == "-I", f"the {child} interpreter must run isolated"
    assert plan.bootstrap_command("/usr/bin/python3.12")[1] == "-I"


# ---------------------------------------------------------------------------------------------- nothing blocks

@pytest.mark.service
def test_gpu_probe_status_and_stop_return_at_once(tmp_path, monkeypatch, module_backend):
    from CitrusVSlicerLib.installer import plan_install
    from CitrusVSlicerLib.manager import BackendManager
    from CitrusVSlicerLib.process import StreamingProcess, bundled_backend_dir

    slow = tmp_path / "bin" / "nvidia-smi"
    slow.parent.mkdir()
    slow.write_text("#!/bin/sh\nsleep 30\necho 'NVIDIA Slow, 24576 MiB'\n")
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", f"{slow.parent}{os.pathsep}{os.environ['PATH']}")
    manager = BackendManager(MODULE_DIR, env_dir=tmp_path / "env", log_dir=tmp_path / "logs", work_dir=tmp_path / "io")
    timings = {}
    started = time.perf_counter()
    probe = manager.probe_gpu()
    timings["gpu probe"] = time.perf_counter() - started
    assert not probe.finished
    started = time.perf_counter()
    plan_install(bundled_backend_dir(MODULE_DIR), tmp_path / "env", gpu_name=None)
    timings["install plan"] = time.perf_counter() - started
    started = time.perf_counter()
    call = module_backend.request_status(module_backend.local_target(), lambda text, error: None)
    timings["device status"] = time.perf_counter() - started
    stubborn = StreamingProcess([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"], log_dir=tmp_path,
                                graceful="stdin")
    stubborn.start()
    started = time.perf_counter()
    stubborn.request_stop(grace_seconds=2.0)
    timings["stop"] = time.perf_counter() - started
    slow_steps = {name: seconds for name, seconds in timings.items() if seconds > 1.0}
    assert not slow_steps, f"blocking calls on the main thread: {slow_steps}"
    run_until(module_backend.poll, lambda: call.done, 30)
    run_until(stubborn.poll, lambda: not stubborn.is_running(), 15)
    probe.stop(0.1)
    manager.transport.close()


# ---------------------------------------------------------------------------------------------- Windows

@pytest.mark.unit
def test_windows_children_get_no_console_and_are_stopped_without_ctrl_break(monkeypatch, tmp_path):
    from CitrusVSlicerLib import environment
    from CitrusVSlicerLib.process import StreamingProcess

    process = StreamingProcess([sys.executable, "-c", "import time; time.sleep(60)"], log_dir=tmp_path)
    process.start()  # a real child, started the POSIX way; then stopped through the Windows branch
    killed, ran = [], []
    monkeypatch.setattr(environment, "platform_name", lambda: "nt")
    monkeypatch.setattr(environment.subprocess, "run", lambda command, **options: ran.append((command, options)))
    monkeypatch.setattr(os, "killpg", lambda *a: pytest.fail("a POSIX signal was sent on Windows"))
    assert environment.popen_options() == {"creationflags": 0x08000000 | 0x00000200}  # NO_WINDOW | NEW_PROCESS_GROUP
    environment.kill_tree(4321)
    assert ran[0][0] == ["taskkill", "/F", "/T", "/PID", "4321"] and ran[0][1]["creationflags"] == 0x08000000
    monkeypatch.setattr(environment, "kill_tree", lambda pid: killed.append(pid))
    process.request_stop(grace_seconds=5.0)   # stdin closed; no CTRL_BREAK_EVENT; the tree kill follows at once
    process.poll()
    assert killed == [process.pid]
    monkeypatch.undo()
    process.stop(0.5)
    for source in (MODULE_DIR / "CitrusVSlicerLib").glob("*.py"):
        assert "CTRL_BREAK_EVENT" not in source.read_text().replace("(and CTRL_BREAK_EVENT", ""), source.name


# ---------------------------------------------------------------------------------------------- orphans and reload

@pytest.mark.unit
def test_one_manager_per_session_survives_a_module_reload(monkeypatch, tmp_path):
    from CitrusVSlicerLib import manager as manager_module

    monkeypatch.setattr(manager_module, "_SESSION", {})
    first = manager_module.session_manager(MODULE_DIR, work_dir=tmp_path / "io")
    # Reload builds a new widget and logic; CitrusVSlicerLib is not re-imported, so the logic finds the same one.
    assert manager_module.session_manager(MODULE_DIR) is first
    assert "session_manager(" in MODULE_SOURCE and "BackendManager(" not in WIDGET_SOURCE
    first.transport.close()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.service
@pytest.mark.slow
def test_slicer_exit_stops_everything_and_a_crash_leaves_nothing_running(tiny_checkpoint, tmp_path, chest_ct_path):
    """shutdown() (Slicer's aboutToQuit) ends the server, a batch and the installer; a killed parent (Slicer crashing)
    leaves neither the server nor the batch running."""
    from CitrusVSlicerLib.installer import InstallRun, plan_install
    from CitrusVSlicerLib.manager import BackendManager
    from CitrusVSlicerLib.process import bundled_backend_dir

    cases = tmp_path / "cases"
    cases.mkdir()
    import shutil

    shutil.copy(chest_ct_path, cases / "chest.nrrd")
    manager = BackendManager(MODULE_DIR, python=sys.executable, log_dir=tmp_path / "logs", work_dir=tmp_path / "io")
    server = manager.start_local(str(tiny_checkpoint), "cpu")
    batch = manager.start_batch(str(cases), str(tmp_path / "out"), "segment", "segment the liver", str(tiny_checkpoint),
                                "cpu", {"mode": "per-slice"})
    hanging = tmp_path / "python3.12"
    hanging.write_text("#!/bin/sh\nsleep 600\n")
    hanging.chmod(0o755)
    manager.installer = InstallRun(plan_install(bundled_backend_dir(MODULE_DIR), tmp_path / "env", str(hanging)),
                                   tmp_path / "logs")
    manager.installer.start()
    time.sleep(1.0)
    pids = [server.pid, batch.pid, manager.installer._current.process.pid]
    assert all(not _gone(pid) for pid in pids)
    manager.shutdown()
    assert all(_gone(pid) for pid in pids), [pid for pid in pids if not _gone(pid)]

    # A Slicer that crashes: the parent is SIGKILLed with a ready server and a running batch.
    parent = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from CitrusVSlicerLib.manager import BackendManager
        m = BackendManager({str(MODULE_DIR)!r}, python=sys.executable, log_dir={str(tmp_path / "logs2")!r},
                           work_dir={str(tmp_path / "io2")!r})
        p = m.start_local({str(tiny_checkpoint)!r}, "cpu")
        b = m.start_batch({str(cases)!r}, {str(tmp_path / "out2")!r}, "segment", "segment the liver",
                          {str(tiny_checkpoint)!r}, "cpu", {{"mode": "per-slice"}})
        while m.state != "running":
            m.poll(); time.sleep(0.05)
        print(p.pid, b.pid, flush=True)
        time.sleep(600)
    """)
    crashing = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    children = [int(pid) for pid in crashing.stdout.readline().split()]
    assert len(children) == 2, "the parent did not start its children"
    crashing.kill()
    crashing.wait()
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and not all(_gone(pid) for pid in children):
        time.sleep(0.2)
    assert all(_gone(pid) for pid in children), "a child outlived its parent"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.unit
def test_an_install_stops_with_its_pip_when_slicer_crashes(tmp_path):
    """The installer's bootstrap.py (CITRUSV_EXIT_WITH_PARENT=1, its stdin a pipe from Slicer, in a session of its own
    as the module starts it) ends itself and the pip it is running when Slicer dies; before, both kept running."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads /proc (Linux)")
    hanging_index = socket.create_server(("127.0.0.1", 0))   # accepts, never answers: pip waits on it
    env_dir = tmp_path / "env"
    # An environment that exists already (so set-up goes straight to pip), with the pip of its base Python.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(env_dir)], check=True)
    # pip sees only the hanging index (no configuration files, no local wheels, no offline switch).
    env = {key: value for key, value in os.environ.items()
           if key not in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL")}
    env.update(CITRUSV_VENV=str(env_dir), CITRUSV_EXIT_WITH_PARENT="1", CITRUSV_FORCE_CPU="1",
               PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:%d/simple" % hanging_index.getsockname()[1],
               PIP_RETRIES="0", PIP_DEFAULT_TIMEOUT="300", PIP_NO_CACHE_DIR="1")
    slicer_like = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-I", {str(REPO / "CitrusVBackend" / "bootstrap.py")!r}, "setup",
                                  "--extras", ""], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", slicer_like], stdout=subprocess.PIPE, text=True, env=env)
    try:
        bootstrap_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 120
        pips = []
        while time.monotonic() < deadline and not pips and not _gone(bootstrap_pid):
            pips = [pid for pid in _children(bootstrap_pid)
                    if b"pip" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            time.sleep(0.2)
        assert pips, "bootstrap.py did not reach its pip install"
        parent.kill()   # Slicer crashes: the pipe's write end closes with it
        parent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_gone(pid) for pid in [bootstrap_pid, *pips]):
            time.sleep(0.2)
        survivors = [pid for pid in [bootstrap_pid, *pips] if not _gone(pid)]
        for pid in survivors:
            os.kill(pid, 9)
        assert not survivors, "the installer outlived Slicer"
    finally:
        if parent.poll() is None:
            parent.kill()
        hanging_index.close()


@pytest.mark.service
def test_a_batch_beside_the_interactive_model_on_the_same_gpu_is_named(module_backend, monkeypatch):
    assert module_backend.batch_conflict("auto") is None  # the test backend runs on the CPU
    monkeypatch.setitem(module_backend.process.ready_info, "device", "cuda:0")
    warning = module_backend.batch_conflict("auto")
    assert warning and "second copy" in warning and "cuda:0" in warning
    assert module_backend.batch_conflict("cpu") is None
    assert "batch_conflict(" in WIDGET_SOURCE  # the panel asks before starting such a batch
