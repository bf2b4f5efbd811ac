"""`citrusv serve` that cannot start says why on stdout, as the launcher reads it: one
`{"event": "failed", "reason": ..., "message": ...}` line instead of the ready line, then a non-zero exit, no
traceback — for each reason this machine can produce: the model missing (and `--no-download` never fetching it),
the hub unreachable, out of memory at load (the test hook), CUDA unusable, a bad checkpoint, the port taken.
The real process, as the Slicer module starts it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from local_hub import LocalHub

pytestmark = pytest.mark.service  # each test starts a backend process that ends by itself (4-10 s on 2 cores)

REPO = "jdh-algo/Citrus-V-8B-v1.0"


def _environment(tmp_path: Path, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("CITRUSV_TOKEN", "MIN_PIXELS", "MAX_PIXELS", "CITRUSV_MODEL")
           and not key.startswith(("HF_", "HUGGINGFACE_"))}
    return env | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "cache"),
                  "PYTHONUNBUFFERED": "1"} | extra


def failed_start(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 180) -> dict:
    """Run `citrusv serve ARGS`; it must end by itself with one failed line on stdout and exit 2."""
    done = subprocess.run([sys.executable, "-m", "citrusv_backend.cli", "serve", "--port", "0", *args],
                          env=env or _environment(tmp_path), capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 1, (done.stdout, done.stderr[-2000:])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    event = lines[0]
    assert event["event"] == "failed" and event["message"]
    # the log (stderr, JSON lines) says it too
    assert any(json.loads(line).get("message") == "failed" for line in done.stderr.splitlines()
               if line.startswith("{"))
    return event


def test_model_folder_missing_names_browse_and_download(tmp_path):
    event = failed_start(tmp_path, "--model", str(tmp_path / "Citrus-V-8B"), "--device", "cpu")
    assert event["reason"] == "model_missing"
    assert "Browse…" in event["message"] and "Download" in event["message"]


def test_no_download_never_asks_the_hub(tmp_path, small_hub):
    env = _environment(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=small_hub.url)
    event = failed_start(tmp_path, "--model", REPO, "--no-download", "--device", "cpu", env=env)
    assert event["reason"] == "model_missing" and "may not download" in event["message"]
    assert small_hub.requests == []


def test_hub_unreachable(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    event = failed_start(tmp_path, "--model", REPO, "--device", "cpu",
                         env=_environment(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=url))
    assert event["reason"] == "hub_unreachable"
    assert "Browse…" in event["message"] and "citrusv download" in event["message"]


def test_out_of_memory_at_load_gives_the_numbers(tmp_path, tiny_checkpoint):
    event = failed_start(tmp_path, "--model", str(tiny_checkpoint), "--device", "cpu",
                         env=_environment(tmp_path, CITRUSV_TEST_FAIL_LOAD="out_of_memory"))
    assert event["reason"] == "out_of_memory" and event["device"] == "cpu"
    assert 0 < event["needed_gb"] < 5 and event["available_gb"] > 0  # the tiny model's need, this machine's RAM
    assert f"about {event['needed_gb']:.1f} GB of RAM" in event["message"]  # below 10 GB: one decimal
    assert "remote server" in event["message"]


def test_cuda_unusable_says_why(tmp_path, tiny_checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's torch can use CUDA")
    event = failed_start(tmp_path, "--model", str(tiny_checkpoint), "--device", "cuda")
    assert event["reason"] == "cuda_unusable"
    assert ("CPU build of torch" in event["message"]) if torch.version.cuda is None else "driver" in event["message"]
    assert "choose the CPU" in event["message"]


def test_bad_checkpoint(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_checkpoint.iterdir():
        if not path.name.startswith("model"):
            (broken / path.name).symlink_to(path)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    event = failed_start(tmp_path, "--model", str(broken), "--device", "cpu")
    assert event["reason"] == "bad_checkpoint" and "not a readable safetensors file" in event["message"]


def test_port_in_use(tmp_path, tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "citrusv_backend.cli", "serve", "--model", str(tiny_checkpoint),
                               "--port", port], env=_environment(tmp_path), capture_output=True, text=True, timeout=120)
    event = json.loads(done.stdout)
    assert done.returncode == 2 and event["event"] == "failed" and event["reason"] == "port_in_use"
    assert port in event["message"] and "another program" in event["message"]


@pytest.fixture
def small_hub(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 1024)
    hub = LocalHub.from_folder(REPO, folder).start()
    yield hub
    hub.stop()
