"""One test (or a few) per defect of issue 11 that the Slicer-layout and GIL-loop suites do not already pin.

(1) install with Slicer's Python and (4) threads under PythonQt are in test_slicer_runtime.py and test_gil_loop.py.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import slicer_runtime
from module_helpers import run_until, widget_method, widget_source
from test_writers import add_volume, oblique_ijk_to_ras, segment_array

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "CitrusVSlicer"
MODULE_SOURCE = (MODULE_DIR / "CitrusVSlicer.py").read_text()
WIDGET_SOURCE = widget_source()  # the module file and its panel mixins (CitrusVSlicerPanels/)


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("citrusv_bootstrap", REPO / "CitrusVBackend" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- 2: the launcher environment

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


@pytest.mark.unit
def test_bootstrap_pins_the_environments_own_torch_not_one_on_pythonpath(tmp_path, monkeypatch):
    """bootstrap.py asked `import torch` in a way that found Slicer's torch first (through PYTHONPATH) and pinned it."""
    import torch

    slicer_site = tmp_path / "Slicer" / "lib" / "Python" / "lib" / "python3.12" / "site-packages"
    fake = slicer_site / "torch"
    (fake / "cuda").mkdir(parents=True)
    (fake / "version").mkdir()
    (fake / "__init__.py").write_text("__version__ = '2.4.1+slicer'\nfrom . import cuda, version\n")
    (fake / "cuda" / "__init__.py").write_text("def is_available():\n    return False\n")
    (fake / "version" / "__init__.py").write_text("cuda = None\n")
    bootstrap = load_bootstrap()
    monkeypatch.setattr(bootstrap, "VENV_DIR", Path(sys.prefix))  # this test environment, which has a real torch
    monkeypatch.setenv("PYTHONPATH", str(slicer_site))
    monkeypatch.setenv("PYTHONHOME", sys.base_prefix)
    assert bootstrap.installed_torch_version() == torch.__version__


# ---------------------------------------------------------------------------------------------- 3: the torch build

@pytest.mark.unit
@pytest.mark.parametrize("system, cuda, requirement, index", [
    ("Linux", None, "torch==2.13.0+cpu", None),
    ("Linux", (12, 8), "torch==2.13.0", None),                                   # PyPI's Linux wheels are CUDA builds
    ("Darwin", None, "torch==2.13.0", None),                                     # no +cpu local version on macOS
    ("Windows", None, "torch==2.13.0", None),                                    # PyPI's Windows wheel is the CPU build
    ("Windows", (12, 9), "torch==2.13.0+cu128", "https://download.pytorch.org/whl/cu128"),
    ("Windows", (13, 1), "torch==2.13.0+cu130", "https://download.pytorch.org/whl/cu130"),
])
def test_torch_build_per_platform(system, cuda, requirement, index):
    choice = load_bootstrap().torch_choice(system, cuda, "2.13.0")
    assert (choice.requirement, choice.extra_index) == (requirement, index)
    assert choice.build  # what the log and citrusv-setup.json say was installed


@pytest.mark.unit
def test_a_driver_too_old_for_every_cuda_build_is_a_clear_error():
    with pytest.raises(SystemExit, match="update the driver"):
        load_bootstrap().torch_choice("Windows", (11, 2), "2.13.0")


@pytest.mark.unit
def test_what_was_installed_is_recorded_and_shown(tmp_path):
    from CitrusVSlicerLib.installer import installed_summary

    (tmp_path / "citrusv-setup.json").write_text(json.dumps({
        "python": "3.12.8", "torch": {"version": "2.13.0+cu128", "cuda_build": "12.8", "cuda_available": True,
                                      "device": "NVIDIA RTX 6000 Ada"}}))
    assert installed_summary(tmp_path) == "Python 3.12.8, torch 2.13.0+cu128 (CUDA 12.8 build, GPU NVIDIA RTX 6000 Ada)"


# ---------------------------------------------------------------------------------------------- 5: remote mode

def _ask(manager, target, voxels):
    from CitrusVSlicerLib.runner import ApplyRunner
    from CitrusVSlicerLib.upload import VolumeUpload

    runner = ApplyRunner(VolumeUpload(manager.transport, target, voxels, np.diag([-1.0, -1.0, 2.0, 1.0]), "CT"), "ask",
                         "What?",
                         {"max_new_tokens": 2})
    runner.start()
    events = []
    run_until(lambda: (manager.poll(), runner.poll(), events.extend(runner.events())), lambda: not runner.active, 120)
    return runner, events + runner.events()


@pytest.mark.service
def test_the_mode_follows_the_panel_and_testing_a_remote_leaves_the_local_backend(module_backend):
    """Before: one remote Apply switched the manager to remote for good, and Test connection stopped the local
    backend. Now every request's target comes from the panel's mode at that moment."""
    manager = module_backend
    process = manager.process
    voxels = np.random.default_rng(3).integers(-1000, 400, (6, 32, 32)).astype(np.int16)
    remote = manager.target(True, "127.0.0.1:9", "token")   # a remote backend that is down
    runner, events = _ask(manager, remote, voxels)
    assert runner.state == "failed" and "cannot connect to the backend at http://127.0.0.1:9" in events[-1].message
    local = manager.target(False)                             # the user switches back to Local
    assert local.url == process.url and local.handover_dir
    runner, events = _ask(manager, local, voxels)
    assert runner.state == "done", events[-1].message
    answers = []
    manager.request_status(manager.target(True, "127.0.0.1:9", "token"), lambda text, error: answers.append(error))
    run_until(manager.poll, lambda: answers, 30)
    assert "cannot connect" in str(answers[0])
    assert manager.process is process and manager.state == "running", "testing a remote touched the local backend"


# ---------------------------------------------------------------------------------------------- 6: captured nodes, scene close

@pytest.mark.slicer
@pytest.mark.service
def test_the_result_goes_to_the_nodes_captured_at_apply(module_backend, mrml_scene, chest_ct_path):
    from citrusv_backend.volume.io import read_volume
    from CitrusVSlicerLib.apply import SceneApply

    voxels = read_volume(chest_ct_path).voxels[12:20].copy()
    first = add_volume(mrml_scene, voxels, oblique_ijk_to_ras(spacing=(2.5, 2.2, 7.5), degrees=17.0), name="first")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen output")
    table = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "chosen table")
    apply = SceneApply(mrml_scene, module_backend.transport, module_backend.local_target(), first, "segment",
                       "segment the left lung", {"mode": "per-slice", "slice_range": [3, 5], "window": "lung"},
                       output, table)
    apply.start()
    # Meanwhile the user loads and selects another volume, and deletes the table chosen for the results.
    add_volume(mrml_scene, voxels[:, ::2, ::2].copy(), np.diag([5.0, 5.0, 5.0, 1.0]), name="second")
    mrml_scene.RemoveNode(table)
    events = []
    run_until(lambda: (module_backend.poll(), apply.poll(), events.extend(apply.events())), lambda: not apply.active, 300)
    events.extend(apply.events())
    done = events[-1]
    assert done.kind == "done", done.message
    written = done.written
    assert written["segmentation"] is output
    import slicer
    import vtk

    labelmap = slicer.vtkOrientedImageData()
    output.GetBinaryLabelmapRepresentation(written["segment_ids"][0], labelmap)
    image_to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    geometry = np.array([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(geometry, oblique_ijk_to_ras(spacing=(2.5, 2.2, 7.5), degrees=17.0), atol=1e-6)  # the first's
    mask = segment_array(output, written["segment_ids"][0], first)
    assert mask.shape == voxels.shape and mask[3:5].any() and not mask[:3].any()
    assert written["table"] is not table and mrml_scene.IsNodePresent(written["table"])


@pytest.mark.slicer
@pytest.mark.service
def test_closing_the_scene_cancels_the_job_and_writes_nothing(module_backend, mrml_scene, chest_ct_path):
    from citrusv_backend.volume.io import read_volume
    from CitrusVSlicerLib.apply import SceneApply

    volume = read_volume(chest_ct_path)
    node = add_volume(mrml_scene, volume.voxels.copy(), volume.geometry.ijk_to_ras())
    apply = SceneApply(mrml_scene, module_backend.transport, module_backend.local_target(), node, "segment",
                       "segment the left lung", {"mode": "per-slice"})
    apply.start()
    seen = []
    run_until(lambda: (module_backend.poll(), apply.poll(), seen.extend(apply.events())),
              lambda: any(e.kind == "progress" and e.stage.startswith("per-slice") for e in seen), 120)
    mrml_scene.Clear(0)  # File > Close scene
    run_until(lambda: (module_backend.poll(), apply.poll(), seen.extend(apply.events())), lambda: not apply.active, 60)
    seen.extend(apply.events())
    assert seen[-1].kind == "cancelled"
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    status = module_backend.transport.request(module_backend.local_target(), "GET", f"/v1/jobs/{apply.runner.job_id}")
    run_until(module_backend.poll, lambda: status.done, 30)
    assert status.json()["status"] == "cancelled"


# ---------------------------------------------------------------------------------------------- 7: display nodes

@pytest.mark.slicer
def test_a_segmentation_made_by_the_selector_gets_a_display_node(mrml_scene):
    from CitrusVSlicerLib.results import SegmentMask
    from CitrusVSlicerLib.writers import write_segments

    volume = add_volume(mrml_scene, np.zeros((4, 6, 6), np.int16), np.eye(4))
    # What qMRMLNodeComboBox's "Create new" makes: a bare node (qMRMLNodeFactory::createNode adds no display node).
    created = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    assert created.GetDisplayNode() is None
    write_segments(mrml_scene, volume, [SegmentMask(1, "liver", (1, 0, 0), (0, 0, 0), np.ones((2, 2, 2), bool))], created)
    assert created.GetDisplayNode() is not None and created.GetDisplayNode().GetVisibility()


# ---------------------------------------------------------------------------------------------- 8: bounded numbers

def _parameter_fields() -> dict:
    tree = ast.parse(MODULE_SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CitrusVSlicerParameterNode")
    return {s.target.id: s.annotation for s in cls.body if isinstance(s, ast.AnnAssign)}


def _connector_range(annotation) -> tuple:
    """The spin box range Slicer's connector sets (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py,
    QSliderOrSpinBoxToIntConnector): WithinRange's bounds, else -2**31 .. 2**31-1."""
    from CitrusVSlicerLib import options

    for call in ast.walk(annotation):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "WithinRange":
            values = [eval(compile(ast.Expression(arg), "<range>", "eval"), vars(options)) for arg in call.args]
            return tuple(values)
    return (-(2**31), 2**31 - 1)


@pytest.mark.unit
def test_every_bound_number_has_the_range_the_backend_accepts():
    from citrusv_backend.server.schemas import JobOptions
    from CitrusVSlicerLib.options import PIXEL_BUDGET_MIN, task_options

    ui = MODULE_DIR / "Resources" / "UI" / "CitrusVSlicer.ui"
    import xml.etree.ElementTree as ET

    numbers = {name: annotation for name, annotation in _parameter_fields().items()
               if ast.unparse(annotation).split("[")[-1].split(",")[0].strip("] ") in ("int", "float")
               or ast.unparse(annotation) in ("int", "float")}
    assert "maxPixels" in numbers
    for name, annotation in numbers.items():
        low, high = _connector_range(annotation)
        assert (low, high) != (-(2**31), 2**31 - 1), f"{name} has no WithinRange: the spin box gets +-2**31"
        widget = next(w for w in ET.parse(ui).iter("widget") if any(
            p.get("name") == "SlicerParameterName" and p.find("string").text == name for p in w.findall("property")))
        ui_range = tuple(int(widget.find(f"property[@name='{b}']/number").text) for b in ("minimum", "maximum"))
        assert ui_range == (low, high), f"{name}: the .ui says {ui_range}, the annotation {(low, high)}"
    low, high = _connector_range(numbers["maxPixels"])
    assert task_options("propagate", "auto", "axial", "", 0) == {"mode": "propagate", "window": "auto", "axis": "axial"}
    for value in (PIXEL_BUDGET_MIN, high):
        JobOptions.model_validate(task_options("propagate", "auto", "axial", "", value))  # the backend takes it
    for value in (1, PIXEL_BUDGET_MIN - 1, -5, high + 1):
        with pytest.raises(ValueError, match="Max pixels"):
            task_options("propagate", "auto", "axial", "", value)


# ---------------------------------------------------------------------------------------------- 9: nothing blocks

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


# ---------------------------------------------------------------------------------------------- 10: proxies

class RecordingProxy:
    """A plain HTTP proxy on 127.0.0.1 that records request lines and forwards absolute-URI requests for the hosts
    it is given (the only way to reach a name that does not resolve)."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.seen: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client):
        with client:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            request_line = head.split(b"\r\n")[0].decode()
            self.seen.append(request_line)
            method, url, version = request_line.split(" ")
            host_port = url.split("//", 1)[1].split("/", 1)[0]
            path = "/" + url.split("//", 1)[1].split("/", 1)[1]
            target = self.routes.get(host_port)
            if target is None:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            headers = [line for line in head.split(b"\r\n")[1:] if not line.lower().startswith((b"connection", b"proxy-"))]
            with socket.create_connection(target) as upstream:
                upstream.sendall(f"{method} {path} {version}\r\n".encode() + b"\r\n".join(headers)
                                 + b"\r\nConnection: close\r\n\r\n" + rest)
                while chunk := upstream.recv(65536):
                    client.sendall(chunk)

    def close(self):
        self.listener.close()


@pytest.mark.service
def test_loopback_never_goes_through_a_proxy_and_a_remote_does(module_backend, tmp_path):
    """A remote name that does not resolve is reachable only through the proxy (which forwards it to the test backend);
    the local backend must be reached directly, whatever the proxy settings say."""
    from CitrusVSlicerLib.endpoints import Target
    from CitrusVSlicerLib.transport import Transport

    local_target = module_backend.local_target()
    remote_port = int(local_target.url.rsplit(":", 1)[1])
    proxy = RecordingProxy({f"citrusv-remote.invalid:{remote_port}": ("127.0.0.1", remote_port)})
    env = dict(os.environ, HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, ALL_PROXY=proxy.url, http_proxy=proxy.url,
               https_proxy=proxy.url, NO_PROXY="", no_proxy="")
    transport = Transport(tmp_path / "io", env=env)
    try:
        local = transport.request(local_target, "GET", "/v1/info")
        remote = transport.request(Target(f"http://citrusv-remote.invalid:{remote_port}", local_target.token),
                                   "GET", "/v1/info")
        run_until(transport.poll, lambda: local.done and remote.done, 60)
        assert local.ok and local.json()["random_weights"], local.error
        assert remote.ok, remote.error
        assert proxy.seen == [f"GET http://citrusv-remote.invalid:{remote_port}/v1/info HTTP/1.1"]
    finally:
        transport.close()
        proxy.close()


# ---------------------------------------------------------------------------------------------- 11: Windows

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


# ---------------------------------------------------------------------------------------------- 12: orphans and reload

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


# ---------------------------------------------------------------------------------------------- 13: smaller

@pytest.mark.unit
def test_batch_updates_and_the_remote_status_line_need_no_parameter_node_and_are_not_overwritten():
    """Read from the module source (the widget needs Slicer's Qt): the batch's display reads the run itself, never
    the parameter node that a closed scene leaves None; the remote status line is only written by Test connection."""
    for name in ("updateBatch", "onOpenBatchResults"):
        assert "_parameterNode" not in ast.unparse(widget_method(name)), name
    status = widget_method("updateBackendStatus")
    first = status.body[0] if not isinstance(status.body[0], ast.Expr) else status.body[1]
    assert ast.unparse(first).startswith("if self.isRemote():") and isinstance(first.body[0], ast.Return)


@pytest.mark.slicer
def test_a_reused_findings_table_keeps_its_rows_and_each_run_has_its_report(mrml_scene):
    from CitrusVSlicerLib.results import SceneResult
    from CitrusVSlicerLib.writers import REPORT_REFERENCE_ROLE, write_findings_table

    first = SceneResult(task="segment", prompt="segment the liver", findings=[{"finding": "liver", "volume_ml": 1500.0}],
                        report_findings="Liver normal.")
    second = SceneResult(task="detect", prompt="find nodules", findings=[{"finding": "nodule", "volume_ml": 0.4},
                                                                         {"finding": "nodule", "volume_ml": 0.2}],
                         report_findings="Two nodules.")
    table, report_one = write_findings_table(mrml_scene, first)
    same, report_two = write_findings_table(mrml_scene, second, table)
    assert same is table
    rows = table.GetTable()
    assert rows.GetNumberOfRows() == 3
    assert [rows.GetColumnByName("finding").GetValue(r) for r in range(3)] == ["liver", "nodule", "nodule"]
    assert [rows.GetColumnByName("run").GetValue(r) for r in range(3)] == [1, 2, 2]
    assert [rows.GetColumnByName("report").GetValue(r) for r in range(3)] == [report_one.GetName()] + [report_two.GetName()] * 2
    assert [table.GetNthNodeReference(REPORT_REFERENCE_ROLE, n) for n in range(2)] == [report_one, report_two]
    assert "Liver normal." in report_one.GetText() and "Two nodules." in report_two.GetText()
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLTextNode") == 2


@pytest.mark.slicer
def test_boxes_of_oblique_volumes_are_oriented_rois_under_the_volumes_transform(mrml_scene):
    import vtk

    from CitrusVSlicerLib.writers import ijk_to_ras_matrix, write_boxes

    matrix = oblique_ijk_to_ras(spacing=(0.8, 1.3, 3.0), degrees=23.0, flips=(1, -1, 1))
    volume = add_volume(mrml_scene, np.zeros((10, 20, 16), np.int16), matrix)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    box = {"label": "nodule", "slices": [3, 6], "index_min_kji": [2.5, 4.5, 3.5], "index_max_kji": [6.5, 9.5, 8.5],
           "ras_min": [0, 0, 0], "ras_max": [1, 1, 1]}
    roi = write_boxes(mrml_scene, [box], volume)[0]
    assert roi.GetParentTransformNode() is transform
    ijk_to_ras = ijk_to_ras_matrix(volume)
    low, high = np.array(box["index_min_kji"])[::-1], np.array(box["index_max_kji"])[::-1]
    corners_ijk = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    expected = (corners_ijk @ ijk_to_ras.T)[:, :3]
    object_to_node = roi.GetObjectToNodeMatrix()
    object_to_node = np.array([[object_to_node.GetElement(r, c) for c in range(4)] for r in range(4)])
    half = np.array(roi.GetSize()) / 2
    corners_roi = np.array([(object_to_node @ np.r_[sx * half[0], sy * half[1], sz * half[2], 1.0])[:3]
                            for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    assert np.allclose(sorted(map(tuple, np.round(corners_roi, 6))), sorted(map(tuple, np.round(expected, 6))), atol=1e-6)


@pytest.mark.unit
def test_terminology_uses_slicers_anatomy_list_with_laterality_modifiers():
    from CitrusVSlicerLib.terminology import CONTEXT, TYPES, terminology_entry

    listed = json.loads((Path(__file__).parent / "data" / "slicer-general-anatomy-structures.json").read_text())
    codes = {t["code"]: t for t in listed["types"]}
    assert CONTEXT == listed["context"]
    for name, (code, meaning, sided) in TYPES.items():
        assert code in codes, f"{name}: SCT {code} is not in Slicer's General Anatomy list"
        assert codes[code]["meaning"] == meaning
        assert sided == bool(codes[code]["modifiers"]), f"{name}: Slicer's list {'has' if sided else 'has no'} modifiers"
    left_lung = terminology_entry("Left lung")
    assert left_lung.split("~")[1:4] == ["SCT^123037004^Anatomical Structure", "SCT^39607008^Lung", "SCT^7771000^Left"]
    assert ["SCT", "7771000", "Left"] in codes["39607008"]["modifiers"]
    assert terminology_entry("kidney", laterality="right").split("~")[2:4] == ["SCT^64033007^Kidney", "SCT^24028007^Right"]
    assert terminology_entry("liver", laterality="right").split("~")[3] == "^^"   # the list gives the liver no side
    assert terminology_entry("urinary bladder").split("~")[2] == "SCT^89837001^Bladder"
    assert terminology_entry("the lesion") is None
    assert "44029006" not in (MODULE_DIR / "CitrusVSlicerLib" / "terminology.py").read_text()
    # The backend codes its DICOM SEG from DICOM's own context groups: the same SNOMED codes for the same names.
    from citrusv_backend.volume.terminology import segment_codes

    for name, (code, _, sided) in TYPES.items():
        coded = segment_codes(("left " if sided else "") + name)
        if coded.type.value != "85756007":  # names DICOM's groups do not hold fall back to Tissue there
            assert coded.type.value == code, f"{name}: the DICOM SEG says {coded.type}, the scene SCT {code}"
        if sided:
            assert coded.modifier is not None and coded.modifier.value == "7771000"
