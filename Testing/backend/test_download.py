"""`citrusv download` as the Slicer panel runs it: the real process and the real huggingface_hub client against a
hub on 127.0.0.1 (local_hub.py), with the faults a first-time user meets — an interrupted connection, a Cancel
and a second run, a corrupted file, no hub, no disk space, a name the hub does not know."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from local_hub import LocalHub, make_certificate

pytestmark = pytest.mark.service  # a real server on 127.0.0.1 (the hub) and the real command

REPO = "jdh-algo/Citrus-V-8B-v1.0"
SHARD = "model-00001-of-00002.safetensors"
SHARD_BYTES = 24_000_000
# huggingface_hub's http_get writes in 10 MiB chunks: a connection lost halfway through SHARD leaves one chunk.
CHUNK = 10 * 1024 * 1024


def _environment(hub_url: str, home: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    return env | {"HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home / "hf-home"),
                  "HF_HUB_CACHE": str(home / "hub-cache"), "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "citrusv_backend.cli", "download", *args]


def run_download(hub_url: str, home: Path, *args: str, timeout: float = 120,
                 env: dict | None = None) -> tuple[int, list[dict], str]:
    done = subprocess.run(_command(*args), env=_environment(hub_url, home) | (env or {}), capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory) -> Path:
    """A checkpoint-shaped repository of a few small files (the fault tests need no real weights)."""
    folder = tmp_path_factory.mktemp("small-repo")
    rng = np.random.default_rng(0)
    (folder / "config.json").write_text(json.dumps({"model_type": "citrus_v"}))
    (folder / "model-00001-of-00002.safetensors").write_bytes(rng.bytes(SHARD_BYTES))
    (folder / "model-00002-of-00002.safetensors").write_bytes(rng.bytes(1_000_000))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "README.md").write_text("not a checkpoint file: not downloaded")
    return folder


@pytest.fixture
def hub(small_repo):
    server = LocalHub.from_folder(REPO, small_repo).start()
    yield server
    server.stop()


def _snapshot(home: Path) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(REPO, cache_dir=home / "hub-cache", local_files_only=True))


def _assert_same_files(source: Path, copy: Path, names) -> None:
    for name in names:
        assert (copy / name).read_bytes() == (source / name).read_bytes(), name


def test_download_into_the_cache_is_what_snapshot_download_finds(tiny_checkpoint, tmp_path):
    hub = LocalHub.from_folder(REPO, tiny_checkpoint).start()
    try:
        started = time.monotonic()
        code, events, stderr = run_download(hub.url, tmp_path)
        seconds = time.monotonic() - started
    finally:
        hub.stop()
    assert code == 0, stderr
    progress, last = events[:-1], events[-1]
    assert last == {"event": "downloaded", "path": str(_snapshot(tmp_path)), "bytes_total": hub.bytes_total}
    assert progress and all(event["event"] == "download" and event["bytes_total"] == hub.bytes_total
                            for event in progress)
    done = [event["bytes_done"] for event in progress]
    assert done == sorted(done) and done[-1] == hub.bytes_total
    assert all(event["rate_bps"] >= 0 and (event["eta_s"] is None or event["eta_s"] >= 0) for event in progress)
    _assert_same_files(tiny_checkpoint, _snapshot(tmp_path), hub.files)
    print(f"\ndownloaded {hub.bytes_total / 1e6:.1f} MB in {seconds:.2f} s (process included)")

    # The second run finds everything there: no file is fetched again.
    hub = LocalHub.from_folder(REPO, tiny_checkpoint).start()
    try:
        code, events, _ = run_download(hub.url, tmp_path)
    finally:
        hub.stop()
    assert code == 0 and events[-1]["event"] == "downloaded"
    assert not [request for request in hub.requests if request[0] == "GET" and "/resolve/" in request[1]]


def test_to_a_folder_and_only_checkpoint_files(hub, small_repo, tmp_path):
    code, events, stderr = run_download(hub.url, tmp_path, "--to", str(tmp_path / "weights"))
    assert code == 0, stderr
    assert events[-1] == {"event": "downloaded", "path": str(tmp_path / "weights"),
                          "bytes_total": hub.bytes_total - len((small_repo / "README.md").read_bytes())}
    names = sorted(path.name for path in (tmp_path / "weights").iterdir())
    assert names == sorted(name for name in hub.files if name != "README.md")  # and no folder of parts left
    _assert_same_files(small_repo, tmp_path / "weights", names)


def test_a_connection_cut_mid_file_resumes_with_a_range_request(hub, small_repo, tmp_path):
    hub.cut_once = {SHARD}
    code, events, stderr = run_download(hub.url, tmp_path)
    assert code == 0, stderr
    gets = [request for request in hub.requests if request[0] == "GET" and request[1].endswith(SHARD)]
    assert [get[2] for get in gets] == [None, f"bytes={CHUNK}-"]  # the second asks only for the rest
    _assert_same_files(small_repo, _snapshot(tmp_path), [SHARD])


def test_cancel_mid_file_then_the_next_run_continues(hub, small_repo, tmp_path):
    hub.stall_once = {SHARD}
    process = subprocess.Popen(_command(), env=_environment(hub.url, tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    blobs = tmp_path / "hub-cache" / "models--jdh-algo--Citrus-V-8B-v1.0" / "blobs"
    deadline = time.monotonic() + 60
    while not any(path.name.endswith(".citrusv-part") and path.stat().st_size == CHUNK
                  for path in blobs.glob("*")) if blobs.is_dir() else True:
        assert time.monotonic() < deadline and process.poll() is None, "the download never reached the stall"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # the panel's Cancel
    stdout, stderr = process.communicate(timeout=30)
    hub.release.set()
    assert process.returncode == 2, stderr
    last = json.loads(stdout.splitlines()[-1])
    assert last["event"] == "failed" and last["reason"] == "cancelled" and "continues" in last["message"]
    assert "Traceback" not in stderr
    partial = [path for path in blobs.glob("*.citrusv-part")]
    assert [path.stat().st_size for path in partial] == [CHUNK]  # kept for the next run

    code, events, stderr = run_download(hub.url, tmp_path)
    assert code == 0, stderr
    gets = [request[2] for request in hub.requests if request[0] == "GET" and request[1].endswith(SHARD)]
    assert gets == [None, f"bytes={CHUNK}-"]
    assert events[0]["bytes_done"] >= CHUNK  # the progress starts from what was already there
    _assert_same_files(small_repo, _snapshot(tmp_path), hub.files.keys() - {"README.md"})
    assert not list(blobs.glob("*.citrusv-part"))


def test_a_corrupted_file_fails_its_checksum_and_is_not_kept(hub, tmp_path):
    hub.corrupt = {SHARD}
    code, events, stderr = run_download(hub.url, tmp_path, "--to", str(tmp_path / "weights"))
    assert code == 2 and "Traceback" not in stderr
    assert events[-1]["event"] == "failed" and events[-1]["reason"] == "bad_checkpoint"
    assert f"{SHARD}: the downloaded file does not match the hub's (sha256 " in events[-1]["message"]
    assert hub.files[SHARD].sha256 in events[-1]["message"]
    assert not (tmp_path / "weights" / SHARD).exists()
    assert not list((tmp_path / "weights").rglob("*.citrusv-part"))


def test_no_hub_names_browse_and_the_folder_way(tmp_path):
    import socket

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    code, events, stderr = run_download(url, tmp_path)
    assert code == 2 and "Traceback" not in stderr
    assert len(events) == 1 and events[0]["event"] == "failed" and events[0]["reason"] == "hub_unreachable"
    assert "cannot be reached" in events[0]["message"]
    assert "Browse…" in events[0]["message"] and "--model FOLDER" in events[0]["message"]


def test_an_unknown_model_is_model_missing(hub, tmp_path):
    code, events, _ = run_download(hub.url, tmp_path, "someone/not-a-model")
    assert code == 2 and events[-1]["reason"] == "model_missing" and "not found on the hub" in events[-1]["message"]


def test_a_folder_is_not_a_hub_id(hub, tmp_path):
    code, events, _ = run_download(hub.url, tmp_path, str(tmp_path))
    assert code == 2 and events[-1]["reason"] == "other" and "Browse…" in events[-1]["message"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root?); test_disk_space_checked_before covers the rule")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_no_disk_space_fails_before_downloading(hub, small_disk, tmp_path):
    code, events, stderr = run_download(hub.url, tmp_path, "--to", str(small_disk / "weights"))
    assert code == 2 and "Traceback" not in stderr
    failed = events[-1]
    assert failed["reason"] == "disk_full" and "free some space" in failed["message"]
    assert (failed["needed_gb"], failed["available_gb"]) == (0.025, 0.001)
    assert not [request for request in hub.requests if request[0] == "GET" and "/resolve/" in request[1]]


def test_disk_space_checked_before(monkeypatch, tmp_path):
    from citrusv_backend.errors import DiskFullError
    from citrusv_backend.hub_download import DownloadPlan, FolderDestination, HubFile, check_disk_space

    plan = DownloadPlan(REPO, "main", "c" * 40, [HubFile("model.safetensors", 17_000_000_000, "a" * 64, None)],
                        FolderDestination(tmp_path / "weights"))
    with pytest.raises(DiskFullError, match=r"need 17.0 GB more .* has 12.0 GB free") as full:
        check_disk_space(plan, free=lambda path: 12_000_000_000)
    assert full.value.numbers == {"needed_gb": 17.0, "available_gb": 12.0}
    check_disk_space(plan, free=lambda path: 17_000_000_000)  # exactly enough is enough


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    made = make_certificate(tmp_path_factory.mktemp("tls"))
    if made is None:
        pytest.skip("openssl cannot make a certificate here")
    return made


def test_an_untrusted_certificate_is_named_and_a_ca_bundle_fixes_it(small_repo, certificate, tmp_path):
    hub = LocalHub.from_folder(REPO, small_repo).start(certificate)
    try:
        code, events, stderr = run_download(hub.url, tmp_path)
        assert code == 2 and "Traceback" not in stderr
        assert events[-1]["reason"] == "hub_unreachable"
        assert "certificate was not trusted" in events[-1]["message"] and "CITRUSV_CA_BUNDLE" in events[-1]["message"]

        code, events, stderr = run_download(hub.url, tmp_path, env={"CITRUSV_CA_BUNDLE": str(certificate[0])})
        assert code == 0, (events[-1], stderr)
        assert events[-1]["event"] == "downloaded"
    finally:
        hub.stop()


def test_a_refusing_proxy_is_named(tmp_path):
    """A proxy that wants a login (407 to the CONNECT) is reported as the proxy's refusal, not as "offline"."""
    import socket
    import threading

    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)

    def refuse() -> None:
        while True:
            try:
                connection, _ = proxy.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=refuse, daemon=True).start()
    try:
        proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        code, events, stderr = run_download("https://hub.example.org", tmp_path,
                                            env={"HTTPS_PROXY": proxy_url, "NO_PROXY": "", "no_proxy": ""})
    finally:
        proxy.close()
    assert code == 2 and "Traceback" not in stderr
    assert events[-1]["reason"] == "hub_unreachable" and "proxy refused" in events[-1]["message"]


@pytest.mark.slow
def test_downloaded_weights_start_the_service_without_the_hub(tiny_checkpoint, tmp_path):
    """The first use from the backend's side: download from the hub, then `serve --no-download REPO_ID` with the hub
    gone (HF_HUB_OFFLINE=1) finds the weights in the cache and becomes ready."""
    from citrusv_backend.server.process import start_server

    hub = LocalHub.from_folder(REPO, tiny_checkpoint).start()
    try:
        started = time.monotonic()
        code, events, stderr = run_download(hub.url, tmp_path)
        downloaded = time.monotonic() - started
    finally:
        hub.stop()
    assert code == 0, stderr
    env = _environment("http://127.0.0.1:9", tmp_path) | {"HF_HUB_OFFLINE": "1"}
    env.pop("CITRUSV_TOKEN", None)
    started = time.monotonic()
    with start_server(REPO, "--no-download", "--device", "cpu", env=env, log_path=tmp_path / "serve.log") as server:
        ready = time.monotonic() - started
        assert server.ready["checkpoint"] == events[-1]["path"] and server.ready["random_weights"] is True
    print(f"\ndownload {downloaded:.1f} s ({events[-1]['bytes_total'] / 1e6:.1f} MB), start to ready {ready:.1f} s")


def test_a_folder_that_cannot_be_written_fails_before_downloading(hub, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    code, events, stderr = run_download(hub.url, tmp_path, "--to", str(blocker / "weights"))
    assert code == 2 and "Traceback" not in stderr
    assert events[-1]["reason"] == "other" and "is a file, so nothing can be created under it" in events[-1]["message"]
    assert not [request for request in hub.requests if request[0] == "GET" and "/resolve/" in request[1]]
