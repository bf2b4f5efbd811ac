"""Start failures of the real `citrusv serve`, started by the module's BackendManager as the panel starts it, each
ending in its own panel message (`BackendManager.failure`): out of memory at load (the backend's test hook), the model
folder gone, a hub id not downloaded, and — only for a backend that had started — a crash that says Restart."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from module_helpers import run_until

pytestmark = [pytest.mark.slicer, pytest.mark.service]

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"


def manager_for(tmp_path, **extra_env):
    from CitrusVSlicerLib.manager import BackendManager

    manager = BackendManager(MODULE_DIR, env_dir=tmp_path / "env", python=sys.executable, log_dir=tmp_path / "logs",
                             work_dir=tmp_path / "work")
    manager.extra_env.update(extra_env)
    return manager


def start_until_it_ends(manager, model, device="cpu", timeout=300):
    process = manager.start_local(model, device)
    run_until(manager.poll, lambda: not process.is_running() or process.ready_info is not None, timeout)
    run_until(manager.poll, lambda: not process.is_running(), 30)
    manager.poll()
    return process


def test_out_of_memory_at_load_says_what_to_do_with_the_numbers(tmp_path, tiny_checkpoint):
    """On this machine (no GPU) the load runs on the CPU: the message names RAM and the way out. The GPU variant
    (CPU or Remote, with the CPU's RAM need) is test_first_use.py's test_each_failed_event_becomes_its_own_message."""
    manager = manager_for(tmp_path, CITRUSV_TEST_FAIL_LOAD="out_of_memory")
    process = start_until_it_ends(manager, str(tiny_checkpoint), device="auto")
    assert process.failure is not None and process.failure.reason == "out_of_memory", list(process.lines)[-10:]
    needed, available = process.failure.number("needed_gb"), process.failure.number("available_gb")
    assert needed > 0 and available > 0
    failure = manager.failure
    from CitrusVSlicerLib.requirements import gb

    assert failure == (f"This computer ran out of memory (RAM) while loading the model on the CPU (the model needs "
                       f"about {gb(needed)}, {gb(available)} are available). Close other programs, or use a "
                       f"Remote server with a GPU.")
    logs = manager.drain_logs()
    assert any(line.startswith("FAILED (out_of_memory): ") for line in logs), logs
    assert not any(line.startswith('{"') for line in logs)


def test_a_model_folder_that_is_gone_says_browse_or_download(tmp_path):
    manager = manager_for(tmp_path)
    process = start_until_it_ends(manager, str(tmp_path / "usb-drive" / "Citrus-V-8B"))
    assert process.failure is not None and process.failure.reason in ("model_missing", "bad_checkpoint")
    assert "Browse..." in manager.failure and "Restart" not in manager.failure


def test_a_hub_id_not_downloaded_is_never_fetched_by_start(tmp_path):
    """`serve --no-download` with the hub reachable in principle (offline off): it fails at once, model_missing."""
    manager = manager_for(tmp_path, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "empty-cache"),
                          HF_ENDPOINT="http://127.0.0.1:9")
    process = start_until_it_ends(manager, "jdh-algo/Citrus-V-8B-v1.0", timeout=120)
    assert process.failure is not None and process.failure.reason == "model_missing", list(process.lines)[-10:]
    assert manager.failure.startswith("The model is not on this computer: ")
    assert "Press Download" in manager.failure
    assert not list((tmp_path / "empty-cache").rglob("*.safetensors*"))


@pytest.mark.slow
def test_a_crash_after_a_successful_start_says_restart(tmp_path, tiny_checkpoint):
    manager = manager_for(tmp_path)
    process = manager.start_local(str(tiny_checkpoint), "cpu")
    assert process.wait_ready(300), list(process.lines)[-20:]
    assert manager.failure is None
    os.killpg(process.pid, signal.SIGKILL)           # the backend dies on its own (not through Stop)
    run_until(manager.poll, lambda: not process.is_running(), 30)
    manager.poll()
    assert manager.failure.startswith(f"The backend stopped unexpectedly (exit code {-signal.SIGKILL}).")
    assert "Press Restart" in manager.failure
