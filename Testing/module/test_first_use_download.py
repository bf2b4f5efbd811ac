"""The panel's Download step end to end: the module's library runs the real `citrusv download` (the backend installed
in the test environment) as its child process, against a hub on 127.0.0.1 speaking the hub's file protocol
(Testing/local_hub.py) with the real huggingface_hub client, and renders what the user sees. Faults: the hub
unreachable, a connection cut mid-file, a Cancel mid-file and a second Download, a name the hub does not know."""
from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from module_helpers import run_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/local_hub.py
from local_hub import LocalHub  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.service]

MODULE_DIR = Path(__file__).resolve().parents[2] / "CitrusVSlicer"
REPO = "jdh-algo/Citrus-V-8B-v1.0"
SHARD = "model-00001-of-00002.safetensors"
CHUNK = 10 * 1024 * 1024   # huggingface_hub's http_get chunk: a stalled or cut transfer has written one


@pytest.fixture(scope="module")
def repo_folder(tmp_path_factory) -> Path:
    """A checkpoint-shaped repository (sharded safetensors with an index), big enough to be seen in progress."""
    folder = tmp_path_factory.mktemp("hub-repo")
    rng = np.random.default_rng(1)
    (folder / "config.json").write_text(json.dumps({"model_type": "citrus_v"}))
    shards = {SHARD: 24_000_000, "model-00002-of-00002.safetensors": 2_000_000}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {f"w{n}": name for n, name in enumerate(shards)}}))
    for name, size in shards.items():
        (folder / name).write_bytes(rng.bytes(size))
    return folder


@pytest.fixture
def hub(repo_folder):
    server = LocalHub.from_folder(REPO, repo_folder).start()
    yield server
    server.stop()


def first_use_with_hub(tmp_path, hub_url: str):
    from CitrusVSlicerLib.first_use import FirstUse
    from CitrusVSlicerLib.manager import BackendManager
    from CitrusVSlicerLib.settings import MemoryStore

    manager = BackendManager(MODULE_DIR, env_dir=tmp_path / "env", python=sys.executable, log_dir=tmp_path / "logs",
                             work_dir=tmp_path / "work")
    first = FirstUse(manager, MemoryStore())
    manager.extra_env.update(HF_ENDPOINT=hub_url, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "hub-cache"),
                             HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    return first


def follow(first, timeout=120):
    """Poll as the panel's timer does; the status lines the user saw while it ran (deduplicated)."""
    seen = []

    def step():
        first.manager.poll()
        download = first.manager.download
        if download.progress is not None and (not seen or seen[-1] != download.status_text()):
            seen.append(download.status_text())

    run_until(step, lambda: not first.manager.download.is_running(), timeout)
    first.manager.poll()
    return seen


def test_download_into_the_weights_folder_shows_bytes_and_total_then_start_can_go(hub, repo_folder, tmp_path):
    first = first_use_with_hub(tmp_path, hub.url)
    first.settings.weights_folder = str(tmp_path / "weights")
    assert first.next_step(REPO).action == "download"
    download = first.start_download(REPO)
    seen = follow(first)
    assert download.state == "done", list(download.lines)
    total = hub.bytes_total
    assert seen and all(line.startswith("Downloading Citrus-V-8B-v1.0: ") for line in seen)
    assert any(f" / {total / 1e6:.1f} MB (" in line for line in seen), seen      # bytes done / total (%)
    assert download.status_text() == f"Downloaded Citrus-V-8B-v1.0 ({total / 1e6:.1f} MB) into " \
                                     f"{tmp_path / 'weights' / 'Citrus-V-8B-v1.0'}. Press Start."
    # The model setting is now that folder: Start needs neither the hub nor the network.
    assert first.download_finished() == str(tmp_path / "weights" / "Citrus-V-8B-v1.0")
    assert first.settings.model == str(tmp_path / "weights" / "Citrus-V-8B-v1.0")
    assert first.next_step(first.model).action == "start"
    assert (tmp_path / "weights" / "Citrus-V-8B-v1.0" / SHARD).read_bytes() == (repo_folder / SHARD).read_bytes()
    logs = first.manager.drain_logs()
    assert logs[-1] == f"downloaded into {tmp_path / 'weights' / 'Citrus-V-8B-v1.0'}"
    assert not any(line.startswith('{"event"') for line in logs)                    # readable, not raw JSON


def test_a_cut_connection_resumes_and_the_cache_check_then_finds_the_model(hub, tmp_path):
    hub.cut_once = {SHARD}
    first = first_use_with_hub(tmp_path, hub.url)
    download = first.start_download(REPO)
    follow(first)
    assert download.state == "done", list(download.lines)
    gets = [request[2] for request in hub.requests if request[0] == "GET" and request[1].endswith(SHARD)]
    assert gets == [None, f"bytes={CHUNK}-"]
    # Into the Hugging Face cache: the model stays a hub id, and Start's cheap check finds it there.
    assert first.download_finished() is None and first.model == REPO
    import os

    os.environ["HF_HUB_CACHE"], saved = str(tmp_path / "hub-cache"), os.environ.get("HF_HUB_CACHE")
    try:
        assert first.next_step(REPO).action == "start"
    finally:
        os.environ.pop("HF_HUB_CACHE") if saved is None else os.environ.__setitem__("HF_HUB_CACHE", saved)


def test_cancel_mid_file_then_download_again_continues(hub, tmp_path):
    hub.stall_once = {SHARD}
    first = first_use_with_hub(tmp_path, hub.url)
    download = first.start_download(REPO)
    blobs = tmp_path / "hub-cache" / "models--jdh-algo--Citrus-V-8B-v1.0" / "blobs"
    def stalled() -> bool:
        """The shard's part has its first chunk (other files' parts come and go while this looks)."""
        for part in blobs.glob("*.citrusv-part") if blobs.is_dir() else []:
            try:
                if part.stat().st_size == CHUNK:
                    return True
            except FileNotFoundError:
                pass
        return False

    run_until(first.manager.poll, stalled, 60)
    first.manager.cancel_download()                       # the panel's Cancel download
    run_until(first.manager.poll, lambda: not download.is_running(), 30)
    hub.release.set()
    assert download.state == "cancelled"
    assert download.status_text().startswith("Download of Citrus-V-8B-v1.0 cancelled after ")
    assert "Download again continues where it stopped" in download.status_text()

    again = first.start_download(REPO)
    follow(first)
    assert again.state == "done", list(again.lines)
    gets = [request[2] for request in hub.requests if request[0] == "GET" and request[1].endswith(SHARD)]
    assert gets == [None, f"bytes={CHUNK}-"]                        # only the rest was fetched


def test_hub_unreachable_and_unknown_model_are_their_own_messages(hub, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
    first = first_use_with_hub(tmp_path, nobody)
    download = first.start_download(REPO)
    follow(first)
    assert download.state == "failed" and download.failure.reason == "hub_unreachable"
    text = download.status_text()
    assert text.startswith("The model hub cannot be reached (") and "Connection refused). If you have the weights" in text
    assert "choose their folder with Browse..." in text and "HTTPS_PROXY" in text

    first = first_use_with_hub(tmp_path / "second", hub.url)
    download = first.start_download("someone/not-a-model")
    follow(first)
    assert download.failure.reason == "model_missing"
    assert download.status_text().startswith("The hub has no model someone/not-a-model (")
    assert "Check the Model field" in download.status_text()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs as the weights folder's drive (root only; skipped where mounting is not allowed)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root?); test_first_use.py's preflight test covers the rule")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_said_before_anything_is_fetched(hub, small_disk, tmp_path):
    first = first_use_with_hub(tmp_path, hub.url)
    first.settings.weights_folder = str(small_disk)
    # The preflight sees it first, from the real free space of that drive ...
    check = first.preflight(None, None, REPO, ram_gb=64)
    assert any("the weights need about 17 GB in" in problem and "0 GB are free" in problem
               for problem in check.disk_problems), check.disk_problems
    # ... and the download itself refuses before any byte (a hub model of unknown size: the backend knows it).
    download = first.start_download(REPO)
    follow(first)
    assert download.state == "failed" and download.failure.reason == "disk_full"
    assert download.status_text().startswith("The disk is full (")
    assert not [request for request in hub.requests if request[0] == "GET" and "/resolve/" in request[1]]


def test_the_sample_ct_is_the_one_the_backend_environment_ships(tmp_path):
    """Load sample CT: slicerio's CTChest4.nrrd from the backend's environment (here: the test environment's)."""
    import slicerio

    first = first_use_with_hub(tmp_path, "http://127.0.0.1:9")
    sample = first.sample_volume()
    assert sample == Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd" and sample.is_file()
