"""The module's logic end to end: real MRML volume node -> real backend process (tiny checkpoint) -> scene.

Also the process manager with real child processes: start, health, crash detection, restart, and a stop that takes
the whole process tree down. Everything is driven by polling, as the panel's timer drives it.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from module_helpers import run_until
from test_writers import add_volume, oblique_ijk_to_ras, segment_array

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"


def run_to_end(manager, runner, timeout: float = 300):
    events = []

    def step():
        manager.poll()
        runner.poll()
        events.extend(runner.events())

    run_until(step, lambda: not runner.active, timeout, step=0.01)
    events.extend(runner.events())
    return events


@pytest.mark.slicer
@pytest.mark.service
def test_oblique_volume_node_to_segmentation_node(module_backend, mrml_scene, chest_ct_path):
    """Segment voxels in the scene equal the backend's mask at the same patient coordinates."""
    from citrusv_backend.volume.input.io import Volume, read_volume
    from citrusv_backend.volume.options import VolumeOptions
    from citrusv_backend.volume.tasks.pipeline import VolumePipeline
    from CitrusVSlicerLib.runner import ApplyRunner
    from CitrusVSlicerLib.upload import VolumeUpload
    from CitrusVSlicerLib.writers import volume_array_and_geometry, write_result

    voxels = read_volume(chest_ct_path).voxels[12:22].copy()        # real CT values, 10 slices
    matrix = oblique_ijk_to_ras(spacing=(2.5, 2.2, 7.5), degrees=17.0, flips=(1, -1, 1))
    volume_node = add_volume(mrml_scene, voxels, matrix)
    array, ijk_to_ras = volume_array_and_geometry(volume_node)
    options = {"mode": "per-slice", "slice_range": [3, 6], "window": "lung"}
    runner = ApplyRunner(VolumeUpload(module_backend.transport, module_backend.local_target(), array, ijk_to_ras, "CT"),
                         "segment", "segment the left lung", options)
    runner.start()
    events = run_to_end(module_backend, runner)
    assert events[-1].kind == "done", events[-1].message
    assert any(e.kind == "progress" and e.stage == "upload" for e in events)
    result = events[-1].result
    written = write_result(mrml_scene, volume_node, result)

    # The same request in-process on the same voxels and matrix (the tiny model is deterministic).
    expected = VolumePipeline(backend_engine(module_backend)).run(
        Volume.from_ijk_to_ras(array, ijk_to_ras), "segment the left lung", "segment",
        VolumeOptions(mode="per-slice", slice_range=(3, 6), window="lung"))
    segmentation = written["segmentation"]
    assert segmentation.GetSegmentation().GetNumberOfSegments() == len(expected.segments) == 1
    mask_in_scene = segment_array(segmentation, written["segment_ids"][0], volume_node).astype(bool)
    assert mask_in_scene.any()
    assert np.array_equal(mask_in_scene, expected.labels == 1)
    table = written["table"].GetTable()
    assert table.GetColumnByName("finding").GetValue(0) == "left lung"
    assert table.GetColumnByName("volume_ml").GetValue(0) == pytest.approx(expected.segments[0].measurements["volume_ml"])
    assert "RANDOM WEIGHTS" in written["report"].GetText()


_ENGINE = {}


def backend_engine(manager):
    """The in-process twin of the backend's model (same checkpoint, same device)."""
    from citrusv_backend.inference.engine import CitrusVEngine

    checkpoint = manager.process.ready_info["checkpoint"]
    if checkpoint not in _ENGINE:
        _ENGINE[checkpoint] = CitrusVEngine.load(checkpoint, device="cpu")
    return _ENGINE[checkpoint]


@pytest.mark.slicer
@pytest.mark.service
def test_volume_upload_is_reused_and_redone_when_the_backend_lost_it(module_backend, mrml_scene, chest_ct_path):
    from citrusv_backend.volume.input.io import read_volume
    from CitrusVSlicerLib.runner import ApplyRunner
    from CitrusVSlicerLib.upload import VolumeUpload
    from CitrusVSlicerLib.writers import volume_array_and_geometry

    voxels = read_volume(chest_ct_path).voxels[14:18].copy()
    volume_node = add_volume(mrml_scene, voxels, np.diag([-3.0, -3.0, 10.0, 1.0]))
    array, ijk_to_ras = volume_array_and_geometry(volume_node)
    transport, target = module_backend.transport, module_backend.local_target()
    first = ApplyRunner(VolumeUpload(transport, target, array, ijk_to_ras, "CT"), "ask", "What is shown?",
                        {"max_new_tokens": 4})
    first.start()
    assert run_to_end(module_backend, first)[-1].kind == "done"
    second = ApplyRunner(VolumeUpload(transport, target, array, ijk_to_ras, "CT"), "ask", "Anything else?",
                         {"max_new_tokens": 4},
                         volume_id=first.volume_id)
    second.start()
    events = run_to_end(module_backend, second)
    assert events[-1].kind == "done" and not any(e.stage == "upload" for e in events)
    assert events[-1].result.answer  # the free-text answer of the tiny model
    # An id the backend does not know (evicted, restarted): the runner uploads again instead of failing.
    third = ApplyRunner(VolumeUpload(transport, target, array, ijk_to_ras, "CT"), "ask", "Again?", {"max_new_tokens": 2},
                        volume_id="v-gone")
    third.start()
    events = run_to_end(module_backend, third)
    assert events[-1].kind == "done" and any(e.stage == "upload" for e in events)


@pytest.mark.slicer
@pytest.mark.service
def test_cancel_mid_job_returns_to_idle(module_backend, chest_ct_path):
    from citrusv_backend.volume.input.io import read_volume
    from CitrusVSlicerLib.runner import ApplyRunner
    from CitrusVSlicerLib.upload import VolumeUpload

    volume = read_volume(chest_ct_path)
    runner = ApplyRunner(VolumeUpload(module_backend.transport, module_backend.local_target(), volume.voxels,
                                      volume.geometry.ijk_to_ras(), "CT"), "segment", "segment the left lung",
                         {"mode": "per-slice"})
    runner.start()
    seen = []

    def step():
        module_backend.poll()
        runner.poll()
        seen.extend(runner.events())

    run_until(step, lambda: any(e.kind == "progress" and e.stage.startswith("per-slice") for e in seen), 120)
    runner.cancel()
    assert runner.state == "cancelling"
    started = time.monotonic()
    events = run_to_end(module_backend, runner, timeout=30)
    assert events[-1].kind == "cancelled" and runner.state == "cancelled"
    assert time.monotonic() - started < 15
    status = module_backend.transport.request(module_backend.local_target(), "GET", f"/v1/jobs/{runner.job_id}")
    run_until(module_backend.poll, lambda: status.done, 30)
    assert status.json()["status"] == "cancelled"


@pytest.mark.service
def test_unreachable_and_wrong_token_are_clear_errors(module_backend):
    from CitrusVSlicerLib.endpoints import Target

    transport = module_backend.transport
    wrong = transport.request(Target(module_backend.local_target().url, "wrong-token"), "GET", "/v1/info")
    nobody = transport.request(Target("http://127.0.0.1:9", "x"), "GET", "/healthz", timeout=2)
    run_until(module_backend.poll, lambda: wrong.done and nobody.done, 30)
    assert "refused the token" in str(wrong.error)
    assert "cannot connect" in str(nobody.error) and "proxy" not in str(nobody.error)  # no proxy hint for loopback


@pytest.mark.unit
def test_remote_needs_consent_unless_loopback(tmp_path):
    from CitrusVSlicerLib.endpoints import Target, normalise_url
    from CitrusVSlicerLib.manager import BackendManager

    manager = BackendManager(MODULE_DIR, env_dir=tmp_path / "env", work_dir=tmp_path / "io")
    assert manager.needs_consent(manager.target(True, "gpu-server.example.org:8000", "token"))
    assert not manager.needs_consent(manager.target(True, "http://127.0.0.1:8000", "token"))
    assert not manager.needs_consent(manager.target(True, "http://[::1]:8000", "token"))
    assert normalise_url("gpu:8000/") == "http://gpu:8000"
    # Certificates are always verified: a target carries a CA bundle at most, there is no way to switch checks off.
    assert set(Target.__dataclass_fields__) == {"url", "token", "ca_bundle", "handover_dir"}
    manager.transport.close()


# ---------------------------------------------------------------------------------------------- processes

@pytest.mark.service
@pytest.mark.slow
def test_crash_is_detected_and_restart_brings_it_back(tiny_checkpoint, tmp_path):
    from CitrusVSlicerLib.endpoints import BackendError
    from CitrusVSlicerLib.manager import BackendManager

    manager = BackendManager(MODULE_DIR, python=sys.executable, log_dir=tmp_path / "logs", work_dir=tmp_path / "io")
    process = manager.start_local(str(tiny_checkpoint), "cpu")
    try:
        run_until(manager.poll, lambda: manager.state in ("running", "crashed"), 300, step=0.05)
        assert manager.state == "running"
        os.kill(process.pid, signal.SIGKILL)
        run_until(manager.poll, lambda: manager.state == "crashed", 20)
        with pytest.raises(BackendError, match="crashed"):
            manager.local_target()
        manager.restart()
        assert manager.state == "restarting"
        run_until(manager.poll, lambda: manager.state in ("running", "crashed"), 300, step=0.05)
        assert manager.state == "running" and manager.process is not process
        health = manager.transport.request(manager.local_target(), "GET", "/healthz")
        run_until(manager.poll, lambda: health.done, 30)
        assert health.json()["status"] == "ok"
        log_text = manager.process.log_path.read_text()
        assert manager.process.token not in log_text  # the token travels in the environment, never in the log
    finally:
        manager.shutdown()
    assert manager.state == "exited"


@pytest.mark.unit
def test_stop_kills_the_whole_process_tree(tmp_path):
    from CitrusVSlicerLib.process import StreamingProcess

    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, lambda *a: None)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(600)
    """)
    process = StreamingProcess([sys.executable, "-c", script], log_dir=tmp_path)
    process.start()
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    started = time.monotonic()
    process.request_stop(grace_seconds=1.0)  # ignores SIGTERM and its stdin: the tree is killed after the grace
    assert time.monotonic() - started < 0.5, "request_stop must not wait"
    run_until(process.poll, lambda: not process.is_running(), 15)
    assert _wait_gone(grandchild), "the grandchild survived the stop"
    assert "started" in process.lines


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    """True once `pid` no longer runs (gone, or a zombie waiting for its reaper)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.unit
def test_install_plan_and_failure_explanations(tmp_path):
    from CitrusVSlicerLib.installer import explain_failure, plan_install
    from CitrusVSlicerLib.process import bundled_backend_dir

    backend_dir = bundled_backend_dir(MODULE_DIR)
    assert backend_dir is not None and (backend_dir / "bootstrap.py").is_file()
    plan = plan_install(backend_dir, tmp_path / "env", base_python="/opt/python3.12/bin/python3")
    command = plan.bootstrap_command(plan.base_python)
    assert command[:2] == ["/opt/python3.12/bin/python3", "-I"] and command[-4:-2] == [str(backend_dir / "bootstrap.py"), "setup"]
    assert plan.environment()["CITRUSV_VENV"] == str(tmp_path / "env")
    assert "GB" in plan.describe() and str(tmp_path / "env") in plan.describe() and "/opt/python3.12" in plan.describe()
    automatic = plan_install(backend_dir, tmp_path / "env")
    assert automatic.base_python is None and "uv" in automatic.describe()
    assert "disk is full" in explain_failure(["...", "OSError: [Errno 28] No space left on device"], plan)
    assert "proxy" in explain_failure(["Temporary failure in name resolution"], plan)
    assert "never disable" in explain_failure(["SSL: CERTIFICATE_VERIFY_FAILED"], plan)
    too_old = explain_failure(["CitrusV's backend needs Python 3.10 or newer; /usr/bin/python3 is 3.9.10."], plan)
    assert "Backend Python" in too_old and "Slicer 5.8 or newer" not in too_old
    assert "boom" in explain_failure(["ERROR: boom"], plan)


@pytest.mark.unit
def test_batch_command_and_progress_parsing(tmp_path):
    from CitrusVSlicerLib.batch import BatchRun, batch_command

    command = batch_command("py", "/in", "/out", "segment", "segment the liver", "tiny", "cpu",
                            {"mode": "hybrid", "slice_range": [2, 9], "window": "auto"})
    assert command[:2] == ["py", "-I"] and command[command.index("-m") + 1:command.index("-m") + 4] == [
        "citrusv_backend.cli", "batch", "/in"]
    assert "--exit-with-parent" in command
    assert command[command.index("--slice-range") + 1] == "2:9" and command[command.index("--mode") + 1] == "hybrid"
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="must differ"):
        BatchRun("py", str(tmp_path / "in"), str(tmp_path / "in"), "segment", "x", "tiny", "cpu", {})
    run = BatchRun("py", str(tmp_path / "in"), str(tmp_path / "out"), "segment", "x", "tiny", "cpu", {})
    run.on_line("[batch] case 3/10 done, 1 failed, ETA 00:02:00")
    assert (run.progress.done, run.progress.total, run.progress.failed) == (3, 10, 1)
    assert run.output_folder == str(tmp_path / "out")
