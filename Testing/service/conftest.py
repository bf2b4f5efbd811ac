"""The real `citrusv serve` process on 127.0.0.1 with the tiny checkpoint, once per session.

`server`: default limits, a generated token (read from the file named by the ready line).
`limits_server`: tiny limits (3 MiB of volumes: one chest CT, 4 s TTL, 4 MiB uploads, 16 tokens, 2 s body stall,
2 s for headers, 24 connections) and a token from --token-file, for eviction, size limits, hostile clients and fuzzing.
"""
from __future__ import annotations

import os

import httpx
import pytest

from citrusv_backend.server.process import start_server


def _environment() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("CITRUSV_TOKEN", "MIN_PIXELS", "MAX_PIXELS")}
    return env | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def server(tiny_checkpoint, session_dir):
    log_path = session_dir / "server.log"
    process = start_server(tiny_checkpoint, "--device", "cpu", env=_environment(), log_path=log_path, timeout=300)
    yield process
    process.stop()
    assert process.token not in log_path.read_text(errors="replace"), "the token appeared in the server log"


@pytest.fixture(scope="session")
def limits_server(tiny_checkpoint, session_dir):
    token_file = session_dir / "limits-token"
    token_file.write_text("limits-server-token-0123456789abcdef\n")
    token_file.chmod(0o600)
    log_path = session_dir / "limits-server.log"
    process = start_server(tiny_checkpoint, "--device", "cpu", "--token-file", str(token_file),
                           "--volume-budget-mb", "3", "--volume-ttl", "4", "--max-upload-mb", "4",
                           "--max-voxels", "2000000", "--max-new-tokens", "16", "--read-timeout", "2",
                           "--header-timeout", "2", "--max-connections", "24",
                           env=_environment(), log_path=log_path, timeout=300)
    yield process
    process.stop()
    assert process.token not in log_path.read_text(errors="replace"), "the token appeared in the server log"


def _client(process, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(base_url=process.url, headers=process.headers, timeout=timeout)


@pytest.fixture
def client(server):
    with _client(server) as http:
        yield http


@pytest.fixture
def limits_client(limits_server):
    with _client(limits_server) as http:
        yield http


@pytest.fixture(scope="session")
def chest(chest_ct_path):
    from citrusv_backend.volume.input.io import read_volume

    return read_volume(chest_ct_path)


# ---------------------------------------------------------------------------------------------- reference clients

@pytest.fixture(scope="session")
def scripted_checkpoint(tiny_checkpoint, session_dir):
    """The tiny model with a bigram script: greedy decoding writes SCRIPTED_ANSWER (scripted_model.py)."""
    from scripted_model import SCRIPTED_ANSWER, make_scripted_checkpoint

    return make_scripted_checkpoint(tiny_checkpoint, session_dir / "scripted-checkpoint", SCRIPTED_ANSWER)


@pytest.fixture(scope="session")
def allowed_images(session_dir):
    """A folder the reference server may read images from, a file outside it, and a link from inside to outside."""
    import numpy as np
    from PIL import Image

    inside, outside = session_dir / "allowed-images", session_dir / "private-images"
    inside.mkdir()
    outside.mkdir()
    rgb = np.random.default_rng(5).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(inside / "slice.png")
    Image.fromarray(rgb).save(outside / "secret.png")
    (inside / "link.png").symlink_to(outside / "secret.png")
    return inside


@pytest.fixture(scope="session")
def gradio_server(scripted_checkpoint, session_dir):
    """`citrusv serve --reference-compatible` as the Gradio demo expects it: per-task budgets (segment = 65535)."""
    log_path = session_dir / "gradio-server.log"
    process = start_server(scripted_checkpoint, "--device", "cpu", "--reference-compatible", env=_environment(),
                           log_path=log_path, timeout=300)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def streamlit_server(scripted_checkpoint, session_dir, allowed_images):
    """As the reference's demo README starts swift for the Streamlit demo: MAX_PIXELS=1003520 in the environment;
    and local image paths allowed inside one folder."""
    log_path = session_dir / "streamlit-server.log"
    process = start_server(scripted_checkpoint, "--device", "cpu", "--reference-compatible", "--allow-local-images",
                           str(allowed_images), env=_environment() | {"MAX_PIXELS": "1003520"}, log_path=log_path,
                           timeout=300)
    yield process
    process.stop()
