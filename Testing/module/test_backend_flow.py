"""The module's logic end to end: real MRML volume node -> real backend process (tiny checkpoint) -> scene.

Also the process manager with real child processes: start, health, crash detection, restart, and a stop
that takes the whole process tree down.
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

from test_writers import add_volume, oblique_ijk_to_ras, segment_array

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    from CitrusVSlicerLib.manager import BackendManager

    manager = BackendManager(MODULE_DIR, python=sys.executable)
    process = manager.start_local(str(tiny_checkpoint), "cpu")
    assert process.wait_ready(180), "\n".join(process.lines)
    yield manager
    manager.stop()


def run_to_end(runner, timeout: float = 300):
    deadline = time.monotonic() + timeout
    events = []
    while time.monotonic() < deadline:
        events.extend(runner.events())
        if events and events[-1].kind in ("done", "error", "cancelled"):
            return events
        time.sleep(0.05)
    raise AssertionError(f"runner still {runner.state} after {timeout} s")


@pytest.mark.slicer
@pytest.mark.service
def test_oblique_volume_node_to_segmentation_node(backend, mrml_scene, chest_ct_path):
    """Segment voxels in the scene equal the backend's mask at the same patient coordinates."""
    from citrusv_backend.volume.io import Volume, read_volume
    from citrusv_backend.volume.pipeline import VolumeOptions, VolumePipeline
    from CitrusVSlicerLib.runner import ApplyRunner
    from CitrusVSlicerLib.writers import volume_array_and_geometry, write_result

    voxels = read_volume(chest_ct_path).voxels[12:22].copy()        # real CT values, 10 slices
    matrix = oblique_ijk_to_ras(spacing=(2.5, 2.2, 7.5), degrees=17.0, flips=(1, -1, 1))
    volume_node = add_volume(mrml_scene, voxels, matrix)
    array, ijk_to_ras = volume_array_and_geometry(volume_node)
    options = {"mode": "per-slice", "slice_range": [3, 6], "window": "lung"}
    runner = ApplyRunner(backend.client(), array, ijk_to_ras, "CT", "segment", "segment the left lung", options)
    runner.start()
    events = run_to_end(runner)
    assert events[-1].kind == "done", events[-1].message
    assert any(e.kind == "progress" and e.stage == "upload" for e in events)
    result = events[-1].result
    written = write_result(mrml_scene, volume_node, result)

    # The same request in-process on the same voxels and matrix (the tiny model is deterministic).
    expected = VolumePipeline(backend_engine(backend)).run(
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
def test_volume_upload_is_reused_and_redone_when_the_backend_lost_it(backend, mrml_scene, chest_ct_path):
    from citrusv_backend.volume.io import read_volume
    from CitrusVSlicerLib.runner import ApplyRunner

    voxels = read_volume(chest_ct_path).voxels[14:18].copy()
    volume_node = add_volume(mrml_scene, voxels, np.diag([-3.0, -3.0, 10.0, 1.0]))
    from CitrusVSlicerLib.writers import volume_array_and_geometry

    array, ijk_to_ras = volume_array_and_geometry(volume_node)
    client = backend.client()
    first = ApplyRunner(client, array, ijk_to_ras, "CT", "ask", "What is shown?", {"max_new_tokens": 4})
    first.start()
    assert run_to_end(first)[-1].kind == "done"
    second = ApplyRunner(client, array, ijk_to_ras, "CT", "ask", "Anything else?", {"max_new_tokens": 4},
                         volume_id=first.volume_id)
    second.start()
    events = run_to_end(second)
    assert events[-1].kind == "done" and not any(e.stage == "upload" for e in events)
    assert events[-1].result.answer  # the free-text answer of the tiny model
    # An id the backend does not know (evicted, restarted): the runner uploads again instead of failing.
    third = ApplyRunner(client, array, ijk_to_ras, "CT", "ask", "Again?", {"max_new_tokens": 2}, volume_id="v-gone")
    third.start()
    events = run_to_end(third)
    assert events[-1].kind == "done" and any(e.stage == "upload" for e in events)


@pytest.mark.slicer
@pytest.mark.service
def test_cancel_mid_job_returns_to_idle(backend, chest_ct_path):
    from citrusv_backend.volume.io import read_volume
    from CitrusVSlicerLib.runner import ApplyRunner

    volume = read_volume(chest_ct_path)
    runner = ApplyRunner(backend.client(), volume.voxels, volume.geometry.ijk_to_ras(), "CT", "segment",
                         "segment the left lung", {"mode": "per-slice"})
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(e.kind == "progress" and e.stage.startswith("per-slice")
                                                  for e in runner.events()):
        time.sleep(0.05)
    runner.cancel()
    assert runner.state == "cancelling"
    started = time.monotonic()
    events = run_to_end(runner, timeout=30)
    assert events[-1].kind == "cancelled" and runner.state == "cancelled"
    assert time.monotonic() - started < 15
    assert backend.client().job(runner.job_id)["status"] == "cancelled"


@pytest.mark.service
def test_unreachable_and_wrong_token_are_clear_errors(backend):
    from CitrusVSlicerLib.client import BackendClient, BackendError

    with pytest.raises(BackendError, match="refused the token"):
        BackendClient(backend.process.url, "wrong-token").info()
    with pytest.raises(BackendError, match="cannot connect"):
        BackendClient("127.0.0.1:9", "x", timeout=2).health()


@pytest.mark.unit
def test_remote_needs_consent_unless_loopback(tmp_path):
    from CitrusVSlicerLib.client import normalise_url
    from CitrusVSlicerLib.manager import BackendManager

    manager = BackendManager(MODULE_DIR, env_dir=tmp_path / "env")
    manager.use_remote("gpu-server.example.org:8000", "token")
    assert manager.remote_needs_consent()
    manager.use_remote("http://127.0.0.1:8000", "token")
    assert not manager.remote_needs_consent()
    assert normalise_url("gpu:8000/") == "http://gpu:8000"
    assert manager.client().session.verify is True  # certificate checks can never be switched off


# ---------------------------------------------------------------------------------------------- processes

@pytest.mark.service
def test_crash_is_detected_and_restart_brings_it_back(tiny_checkpoint):
    from CitrusVSlicerLib.manager import BackendManager

    manager = BackendManager(MODULE_DIR, python=sys.executable)
    process = manager.start_local(str(tiny_checkpoint), "cpu")
    try:
        assert process.wait_ready(180)
        assert manager.state == "running" and manager.client().health()["status"] == "ok"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(20)
        assert manager.state == "crashed"
        from CitrusVSlicerLib.client import BackendError

        with pytest.raises(BackendError, match="crashed"):
            manager.client()
        old_token = process.token
        manager.restart()
        assert process.wait_ready(180) and manager.state == "running"
        assert manager.client().health()["status"] == "ok" and process.token == old_token
        manager.stop()
        assert manager.state == "exited"
    finally:
        manager.stop()


@pytest.mark.unit
def test_stop_kills_the_whole_process_tree(tmp_path):
    from CitrusVSlicerLib.process import StreamingProcess

    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        signal_ignored = __import__("signal").signal(__import__("signal").SIGTERM, lambda *a: None)
        time.sleep(600)
    """)
    process = StreamingProcess([sys.executable, "-c", script])
    process.start()
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    process.stop(grace_seconds=1.0)  # the parent ignores SIGTERM: the kill must still take everything down
    assert not process.is_running()
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
    plan = plan_install(backend_dir, tmp_path / "env")
    assert plan.command()[1].endswith("bootstrap.py") and plan.command()[2] == "setup"
    assert plan.environment()["CITRUSV_VENV"] == str(tmp_path / "env")
    assert "GB" in plan.describe() and str(tmp_path / "env") in plan.describe()
    assert "disk is full" in explain_failure(["...", "OSError: [Errno 28] No space left on device"], plan)
    assert "proxy" in explain_failure(["Temporary failure in name resolution"], plan)
    assert "never disable" in explain_failure(["SSL: CERTIFICATE_VERIFY_FAILED"], plan)
    assert "boom" in explain_failure(["ERROR: boom"], plan)


@pytest.mark.unit
def test_batch_command_and_progress_parsing(tmp_path):
    from CitrusVSlicerLib.batch import BatchRun, batch_command

    command = batch_command("py", "/in", "/out", "segment", "segment the liver", "tiny", "cpu",
                            {"mode": "hybrid", "slice_range": [2, 9], "window": "auto"})
    assert command[:5] == ["py", "-m", "citrusv_backend.cli", "batch", "/in"]
    assert command[command.index("--slice-range") + 1] == "2:9" and command[command.index("--mode") + 1] == "hybrid"
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="must differ"):
        BatchRun("py", str(tmp_path / "in"), str(tmp_path / "in"), "segment", "x", "tiny", "cpu", {})
    run = BatchRun("py", str(tmp_path / "in"), str(tmp_path / "out"), "segment", "x", "tiny", "cpu", {})
    run.on_line("[batch] case 3/10 done, 1 failed, ETA 00:02:00")
    assert (run.progress.done, run.progress.total, run.progress.failed) == (3, 10, 1)
