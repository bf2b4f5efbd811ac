"""Issue 22, the module's side of the first hour, through its library: each fault ends in its own panel message.

Real parts: real child processes (StreamingProcess, GpuProbe with a stand-in nvidia-smi on PATH), a real QSettings
(PyQt5, an ini file), the Hugging Face cache's real on-disk layout, the installer's real log patterns. The backend's
own events (`failed`, `download`) are tested end to end in test_first_use_backend.py.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from module_helpers import run_until

pytestmark = pytest.mark.unit

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"
GB = 1e9


def manager_for(tmp_path, python=None):
    from CitrusVSlicerLib.manager import BackendManager

    return BackendManager(MODULE_DIR, env_dir=tmp_path / "env", python=python, log_dir=tmp_path / "logs",
                          work_dir=tmp_path / "work")


def write_checkpoint(folder: Path, shards=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
                     present=None) -> Path:
    """A checkpoint folder's files as the release has them (config, sharded safetensors with an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {f"w{i}": shard for i, shard in enumerate(shards)}}))
    for shard in (shards if present is None else present):
        (folder / shard).write_bytes(b"\0" * 16)
    return folder


# ---------------------------------------------------------------------------------------------- settings


@pytest.fixture
def qsettings_file(tmp_path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PyQt5.QtCore", reason="PyQt5 (the test extra) provides a real QSettings")
    path = tmp_path / "Slicer.ini"
    return lambda: QtCore.QSettings(str(path), QtCore.QSettings.IniFormat)


def test_machine_settings_survive_a_new_widget_and_logic_on_the_same_qsettings(tmp_path, qsettings_file):
    from CitrusVSlicerLib.first_use import FirstUse

    first = FirstUse(manager_for(tmp_path), qsettings_file())
    settings = first.settings
    settings.model = "/media/usb/Citrus-V-8B"
    settings.weights_folder = str(tmp_path / "weights")
    settings.device = "cpu"
    settings.backend_python = "/usr/bin/python3.12"
    settings.environment_folder = str(tmp_path / "other-env")
    settings.ca_bundle = str(tmp_path / "hospital-ca.pem")
    for url in ("https://gpu-a:8000", "https://gpu-b:8000", "https://gpu-a:8000"):
        settings.remember_url(url)
    first.save()
    qsettings_file().sync()

    # A new session: a new QSettings object on the same file, a new manager and logic.
    again = FirstUse(manager_for(tmp_path), qsettings_file())
    assert again.settings == settings
    assert again.settings.remote_urls == ["https://gpu-a:8000", "https://gpu-b:8000"]
    assert again.model == "/media/usb/Citrus-V-8B"
    assert again.manager.env_dir == tmp_path / "other-env"            # the environment folder is applied
    assert again.manager.extra_env["REQUESTS_CA_BUNDLE"] == str(tmp_path / "hospital-ca.pem")
    text = (tmp_path / "Slicer.ini").read_text()
    assert "token" not in text.lower()                                 # the token is never written


def test_url_history_keeps_ten_newest_and_a_dict_store_works_the_same(tmp_path):
    from CitrusVSlicerLib.settings import MachineSettings, MemoryStore

    store = MemoryStore()
    settings = MachineSettings()
    for n in range(15):
        settings.remember_url(f"https://server-{n}:8000")
    settings.device = "no-such-device"
    settings.save(store)
    loaded = MachineSettings.load(store)
    assert loaded.remote_urls == [f"https://server-{n}:8000" for n in range(14, 4, -1)]
    assert loaded.device == "auto"                                    # an unknown device falls back


# ---------------------------------------------------------------------------------------------- weights


def test_start_offers_install_then_update_then_download_then_starts(tmp_path, monkeypatch):
    """The order Start checks in, each with its own message: nothing is installed or downloaded silently."""
    from CitrusVSlicerLib.first_use import FirstUse
    from CitrusVSlicerLib.settings import MemoryStore

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    manager = manager_for(tmp_path)
    first = FirstUse(manager, MemoryStore())
    step = first.next_step("jdh-algo/Citrus-V-8B-v1.0")
    assert step.action == "install" and "press Install" in step.message

    # An environment whose backend is older than the bundled one: the extension was updated.
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    (env / "citrusv-setup.stamp").write_text("old")
    info = env / "lib" / "python3.11" / "site-packages" / "citrusv_backend-0.0.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: citrusv-backend\nVersion: 0.0.9\n")
    step = first.next_step("jdh-algo/Citrus-V-8B-v1.0")
    assert step.action == "update"
    assert "CitrusV backend 0.0.9" in step.message and "Press Install to update" in step.message
    assert first.install_plan(None, update=True).bootstrap_command("python")[-1] == "--force"
    assert first.next_step("jdh-algo/Citrus-V-8B-v1.0", check_version=False).action == "download"  # update declined

    from CitrusVSlicerLib.install_platform import bundled_backend_version

    (info / "METADATA").write_text(f"Version: {bundled_backend_version(manager.backend_dir)}\n")
    step = first.next_step("jdh-algo/Citrus-V-8B-v1.0")
    assert step.action == "download"
    assert "has not been downloaded yet" in step.message and "Press Download" in step.message and "17 GB" in step.message

    # An interrupted download: the snapshot exists, one shard does not.
    snapshot = tmp_path / "hub-cache" / "models--jdh-algo--Citrus-V-8B-v1.0" / "snapshots" / "abc123"
    write_checkpoint(snapshot, present=["model-00001-of-00002.safetensors"])
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    step = first.next_step("jdh-algo/Citrus-V-8B-v1.0")
    assert step.action == "download" and "incomplete" in step.message and "model-00002-of-00002" in step.message

    (snapshot / "model-00002-of-00002.safetensors").write_bytes(b"\0")
    assert first.next_step("jdh-algo/Citrus-V-8B-v1.0").action == "start"


def test_a_model_folder_that_is_gone_says_so(tmp_path):
    from CitrusVSlicerLib.first_use import FirstUse
    from CitrusVSlicerLib.settings import MemoryStore

    first = FirstUse(manager_for(tmp_path, python=sys.executable), MemoryStore())
    step = first.next_step(str(tmp_path / "usb" / "Citrus-V-8B"))
    assert step.action == "download"
    assert "does not exist (moved, or a drive that is not connected?)" in step.message and "Browse" in step.message
    folder = write_checkpoint(tmp_path / "usb" / "Citrus-V-8B", present=[])
    assert "is not a complete checkpoint" in first.next_step(str(folder)).message
    write_checkpoint(folder)
    assert first.next_step(str(folder)).action == "start"


# ---------------------------------------------------------------------------------------------- preflight


@pytest.fixture
def gpu_with_12_gb(tmp_path, monkeypatch):
    """A stand-in `nvidia-smi` on PATH answering the probe's query as a 12 GB card does."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA RTX A2000 12GB, 12288 MiB'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def test_a_12_gb_gpu_is_compared_with_the_need_and_the_plan_offers_what_fits(tmp_path, gpu_with_12_gb):
    from CitrusVSlicerLib.first_use import FirstUse
    from CitrusVSlicerLib.settings import MemoryStore

    first = FirstUse(manager_for(tmp_path), MemoryStore())
    probe = first.manager.probe_gpu()
    run_until(lambda: None, lambda: probe.finished, 30)
    assert probe.gpu_name == "NVIDIA RTX A2000 12GB" and probe.gpu_memory_gb == 12
    plenty = lambda path: 500.0  # noqa: E731
    check = first.preflight(probe.gpu_name, probe.gpu_memory_gb, "jdh-algo/Citrus-V-8B-v1.0", ram_gb=32,
                            free_disk=plenty)
    assert check.device_summary() == (
        "This GPU (NVIDIA RTX A2000 12GB) has 12 GB and the model needs about 20 GB: use a remote server "
        "(the CPU would need about 38 GB of RAM, this machine has 32 GB).")
    assert check.suggested_device == "remote"
    roomy = first.preflight(probe.gpu_name, probe.gpu_memory_gb, "jdh-algo/Citrus-V-8B-v1.0", ram_gb=64,
                            free_disk=plenty)
    assert roomy.suggested_device == "cpu"
    assert roomy.device_summary() == (
        "This GPU (NVIDIA RTX A2000 12GB) has 12 GB and the model needs about 20 GB: use a remote server, or the CPU "
        "(needs about 38 GB of RAM, this machine has 64 GB; minutes per volume).")
    no_gpu = first.preflight(None, None, "jdh-algo/Citrus-V-8B-v1.0", ram_gb=64, free_disk=plenty)
    assert no_gpu.device_summary().startswith("No NVIDIA GPU was found: the model will run on the CPU (needs about "
                                              "38 GB of RAM, this machine has 64 GB; minutes per volume).")
    big = first.preflight("NVIDIA A100-SXM4-40GB", 40, "jdh-algo/Citrus-V-8B-v1.0", ram_gb=64, free_disk=plenty)
    assert big.suggested_device == "cuda" and "will run on the GPU" in big.device_summary()
    # The plan says where things go, in numbers.
    assert "Environment: about 8 GB in" in check.describe() and "Weights: about 17 GB into" in check.describe()


def test_no_disk_space_is_said_before_anything_is_installed(tmp_path):
    from CitrusVSlicerLib.first_use import FirstUse
    from CitrusVSlicerLib.settings import MemoryStore

    first = FirstUse(manager_for(tmp_path), MemoryStore())
    first.settings.weights_folder = str(tmp_path / "weights")
    check = first.preflight(None, None, "jdh-algo/Citrus-V-8B-v1.0", ram_gb=64, free_disk=lambda path: 12.0)
    assert check.disk_problems == [
        f"the environment and the weights need about 20 GB on the drive of {tmp_path / 'env'}, 12 GB are free"]
    assert "Not enough disk space" in check.describe()


def test_macos_says_the_cpu_and_its_ram():
    from CitrusVSlicerLib.preflight import MachineFacts, preflight
    from CitrusVSlicerLib.requirements import model_need

    check = preflight(MachineFacts(None, None, 32.0, system="Darwin"), model_need(""), None, None)
    assert check.device_summary() == ("On macOS the model runs on the CPU (needs about 38 GB of RAM, this Mac has 32 GB "
                                      "— not enough: use a remote server); Apple's GPU (MPS) is not used.")


def test_the_need_figures_match_the_backends_own_estimate(tiny_checkpoint):
    """The module mirrors the backend's rule (it cannot import the backend inside Slicer); the tests can compare."""
    from citrusv_backend.model.requirements import RELEASED_NEED, need_of_checkpoint
    from CitrusVSlicerLib.requirements import RELEASED_MODEL, model_need

    released = model_need(RELEASED_MODEL)
    assert (released.weights_gb, released.gpu_gb, released.cpu_ram_gb) == \
        (round(RELEASED_NEED.disk_gb, 1), RELEASED_NEED.gpu_gb, RELEASED_NEED.cpu_ram_gb)
    tiny, backend_tiny = model_need(str(tiny_checkpoint)), need_of_checkpoint(tiny_checkpoint)
    assert tiny.gpu_gb == pytest.approx(backend_tiny.gpu_gb, abs=0.15)
    assert tiny.cpu_ram_gb == pytest.approx(backend_tiny.cpu_ram_gb, abs=0.15)


# ---------------------------------------------------------------------------------------------- messages


def event(reason, message, **numbers):
    from CitrusVSlicerLib.failures import FailureEvent

    return FailureEvent.from_line(json.dumps({"event": "failed", "reason": reason, "message": message, **numbers}))


@pytest.mark.parametrize("reason, numbers, expected", [
    ("model_missing", {}, ["Press Download", "Browse..."]),
    ("hub_unreachable", {}, ["What the backend said. If you have the weights", "Browse...", "HTTPS_PROXY"]),
    ("out_of_memory", {"needed_gb": 20, "available_gb": 11.5},
     ["ran out of memory", "needs about 20 GB, 12 GB are free", "Device: cpu (needs about 34 GB of RAM, this computer "
      "has 32 GB — not enough here)", "Remote server"]),
    ("cuda_unusable", {}, ["driver", "press Install again", "Device: cpu"]),
    ("bad_checkpoint", {}, ["not a complete Citrus-V checkpoint", "config.json"]),
    ("disk_full", {}, ["disk is full"]),
])
def test_each_failed_event_becomes_its_own_message(reason, numbers, expected):
    from CitrusVSlicerLib.failures import explain_start_failure

    said = event(reason, "What the backend said. Its advice for the command line.", **numbers)
    text = explain_start_failure(said, "jdh-algo/Citrus-V-8B-v1.0",
                                 ram_gb=32, cpu_ram_needed_gb=34)
    for part in expected:
        assert part in text, (part, text)
    assert "Restart" not in text


CHILD = textwrap.dedent("""
    import json, os, sys, time
    log = lambda level, message: print(json.dumps({"ts": "2026-12-07T02:41:09.123Z", "level": level,
                                                    "logger": "citrusv", "message": message}), file=sys.stderr, flush=True)
    log("info", "loading model /models/x ...")
    sys.stderr.write("Fetching 4 files:  10%|#\\rFetching 4 files:  50%|#####\\rFetching 4 files: 100%|##########\\n")
    sys.stderr.flush()
    if sys.argv[1] == "ready":
        print(json.dumps({"event": "ready", "host": "127.0.0.1", "port": 1, "device": "cpu"}), flush=True)
        sys.stdin.read() if sys.argv[2] == "wait" else None
    log("error", "Traceback-free: CUDA error: no kernel image is available for execution on the device")
    log("info", "shutting down")
    sys.exit(int(sys.argv[3]))
""")


def child_backend(tmp_path, *args):
    """A BackendProcess whose child writes what `citrusv serve` writes (JSON log lines, a hub progress bar with
    carriage returns) and exits as told: the crash paths, which no real failure reproduces on demand."""
    from CitrusVSlicerLib.process import BackendProcess

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    process = BackendProcess(sys.executable, "m", log_dir=tmp_path / "logs")
    process.command = [sys.executable, "-u", str(script), *args]
    return process


def test_a_crash_before_ready_shows_its_last_meaningful_lines_not_restart(tmp_path):
    manager = manager_for(tmp_path, python=sys.executable)
    manager.process = child_backend(tmp_path, "no", "-", "1")
    manager.process.start()
    run_until(manager.poll, lambda: not manager.process.is_running(), 30)
    manager.poll()
    failure = manager.failure
    assert failure.startswith("The backend stopped while starting (exit code 1). Its last messages:")
    assert "CUDA error: no kernel image" in failure and "Restart" not in failure
    assert '{"ts"' not in failure                                   # readable, never raw JSON
    assert "Fetching 4 files: 100%" in failure                      # the bar's last state, not every redraw
    logs = manager.drain_logs()
    assert any(line.endswith("INFO    loading model /models/x ...") for line in logs), logs
    assert sum("Fetching 4 files" in line for line in logs) == 1


def test_only_a_crash_after_a_successful_start_says_restart(tmp_path):
    manager = manager_for(tmp_path, python=sys.executable)
    manager.process = child_backend(tmp_path, "ready", "-", "3")
    manager.process.start()
    run_until(manager.poll, lambda: not manager.process.is_running(), 30)
    manager.poll()
    assert manager.failure.startswith("The backend stopped unexpectedly (exit code 3)")
    assert "Press Restart" in manager.failure
    # Stopped from the panel: nothing to explain.
    manager.process = child_backend(tmp_path, "ready", "wait", "0")
    manager.process.start()
    run_until(manager.poll, lambda: manager.process.ready_info is not None, 30)
    assert manager.failure is None
    manager.stop()
    run_until(manager.poll, lambda: not manager.process.is_running(), 30)
    assert manager.failure is None


def test_a_progress_bar_that_has_not_ended_its_line_shows_its_latest_state(tmp_path):
    from CitrusVSlicerLib.process import StreamingProcess

    script = tmp_path / "bar.py"
    script.write_text("import sys, time\nfor p in (10, 20, 30):\n    sys.stdout.write(f'\\rmodel.safetensors: {p}%')\n"
                      "    sys.stdout.flush()\nsys.stdin.read()\n")
    process = StreamingProcess([sys.executable, "-u", str(script)], log_dir=tmp_path / "logs", graceful="stdin")
    process.start()
    try:
        run_until(process.poll, lambda: process.progress_line == "model.safetensors: 30%", 30)
        assert list(process.lines) == []
    finally:
        process.stop(2)


# ---------------------------------------------------------------------------------------------- download view


def test_download_progress_reads_with_bytes_total_rate_and_time_left():
    from CitrusVSlicerLib.logview import DownloadProgress

    progress = DownloadProgress.from_event({"event": "download", "file": "model-00002-of-00004.safetensors",
                                            "bytes_done": 3_200_000_000, "bytes_total": 17_100_000_000,
                                            "rate_bps": 85e6, "eta_s": 163.4}, "Citrus-V-8B-v1.0")
    assert progress.describe() == "Downloading Citrus-V-8B-v1.0: 3.2 GB / 17.1 GB (19%), 85.0 MB/s, 2 min 43 s left"
    from CitrusVSlicerLib.logview import readable

    assert readable(json.dumps({"event": "download", "bytes_done": 5, "bytes_total": 10, "rate_bps": 0,
                                "eta_s": None})) == "Downloading: 5 B / 10 B (50%)"


# ---------------------------------------------------------------------------------------------- install


def test_tls_and_ca_bundle_reach_uv_pip_and_the_backend(tmp_path):
    from CitrusVSlicerLib.first_use import FirstUse
    from CitrusVSlicerLib.settings import MemoryStore

    first = FirstUse(manager_for(tmp_path), MemoryStore())
    plan = first.install_plan(None)
    env = plan.environment()
    assert env["UV_SYSTEM_CERTS"] == "true" and env["UV_NATIVE_TLS"] == "true"   # the system store (old and new uv)
    first.settings.ca_bundle = str(tmp_path / "ca.pem")
    first.save()
    env = first.install_plan(None).environment()
    assert env["SSL_CERT_FILE"] == env["PIP_CERT"] == env["REQUESTS_CA_BUNDLE"] == str(tmp_path / "ca.pem")
    assert first.manager.extra_env["CITRUSV_CA_BUNDLE"] == str(tmp_path / "ca.pem")   # the backend's hub client
    first.manager.extra_env["HF_ENDPOINT"] = "https://mirror.example"
    first.settings.ca_bundle = ""
    first.save()
    assert first.manager.extra_env == {"HF_ENDPOINT": "https://mirror.example"}       # only the CA entries go


@pytest.mark.parametrize("log_line, expected", [
    ("  WARNING: Retrying ... SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
     "verify failed: self-signed certificate in certificate chain", "A certificate failure"),
    ("error: Request failed after 3 retries: invalid peer certificate: UnknownIssuer", "A certificate failure"),
    ("ProxyError('Cannot connect to proxy.', OSError('Tunnel connection failed: 407 Proxy Authentication Required'))",
     "A proxy failure"),
    ("ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cu130 (from versions: none)",
     "No PyTorch build for this machine"),
    ("OSError: [Errno 28] No space left on device", "The disk is full"),
    # bootstrap.py's own verdict (after its CUDA fall-backs) is said as it is.
    ("could not install torch==2.13.0+cu130 or torch==2.13.0+cu128: no wheel for this platform",
     "The installation failed: could not install torch==2.13.0+cu130 or torch==2.13.0+cu128"),
])
def test_install_failures_are_named(log_line, expected):
    from CitrusVSlicerLib.installer import explain_failure

    text = explain_failure(["[citrusv setup] pip install ...", log_line, "ERROR: No matching distribution found"])
    assert text.startswith(expected), text


def test_apple_silicon_asks_uv_for_an_arm64_python_and_windows_tries_the_py_launcher(monkeypatch):
    from CitrusVSlicerLib import environment, install_platform

    assert install_platform.uv_python_request("3.12", on_apple_silicon=True) == "cpython-3.12-macos-aarch64-none"
    assert install_platform.uv_python_request("3.12", on_apple_silicon=False) == "3.12"
    assert install_platform.required_machine(on_apple_silicon=True) == "arm64"
    monkeypatch.setattr(environment, "platform_name", lambda: "nt")
    commands = install_platform.windows_launcher_commands(lambda name: r"C:\Windows\py.exe" if name == "py" else None)
    assert commands == [[r"C:\Windows\py.exe", "-3.12"], [r"C:\Windows\py.exe", "-3.11"], [r"C:\Windows\py.exe", "-3.10"]]


def test_the_python_check_refuses_a_python_of_the_wrong_architecture(tmp_path):
    """The check every candidate Python runs: an interpreter of another machine type is skipped, with the reason."""
    import platform
    import subprocess

    from CitrusVSlicerLib.installer import _CHECK

    other = "arm64" if platform.machine() != "arm64" else "x86_64"
    wrong = subprocess.run([sys.executable, "-I", "-c", _CHECK, other], capture_output=True, text=True)
    assert wrong.returncode == 3 and f"not {other}" in wrong.stdout and "no PyTorch wheels" in wrong.stdout
    right = subprocess.run([sys.executable, "-I", "-c", _CHECK, platform.machine()], capture_output=True, text=True)
    assert right.returncode == 0 and right.stdout.split()[-1] == sys.executable


def test_cancel_install_stops_the_set_up_and_everything_it_started(tmp_path):
    """The panel's Cancel install during bootstrap.py (a real set-up into a fresh environment): it stops at once,
    its pip with it, and the run says cancelled (the panel: "Installation cancelled. Press Install to start again.")."""
    from CitrusVSlicerLib.first_use import FirstUse
    from CitrusVSlicerLib.settings import MemoryStore

    first = FirstUse(manager_for(tmp_path), MemoryStore())
    first.settings.backend_python = sys.executable
    run = first.manager.start_install(first.install_plan(None))
    run_until(first.manager.poll, lambda: run._current is not None and run._current.name == "bootstrap" and
              any("[citrusv setup]" in line for line in run.lines), 120)
    bootstrap = run._current.process
    run.request_stop(grace_seconds=5.0)
    run_until(first.manager.poll, lambda: not run.is_running(), 30)
    assert run.state == "cancelled" and run.returncode == 1
    assert not bootstrap.is_running()
    assert "installation cancelled" in run.lines
    assert first.next_step().action == "install"          # nothing half-installed is taken for installed
