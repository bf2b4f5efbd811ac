"""POST /v1/volumes with raw voxel bytes (application/octet-stream, geometry in X-CitrusV-Volume), streamed or
compressed, and the local handover of a file in the server's private folder; `citrusv serve --exit-with-parent`.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from service_helpers import upload

pytestmark = pytest.mark.service


def header(volume, **extra) -> dict:
    description = {"dtype": str(volume.voxels.dtype.newbyteorder("=")), "shape": list(volume.shape),
                   "ijk_to_ras": volume.geometry.ijk_to_ras().tolist(), "name": "chest raw", "modality": volume.modality}
    description.update(extra)
    return {"Content-Type": "application/octet-stream", "X-CitrusV-Volume": json.dumps(description)}


def raw_bytes(volume) -> bytes:
    return np.ascontiguousarray(volume.voxels, dtype=volume.voxels.dtype.newbyteorder("<")).tobytes()


def stored(client, volume_id: str) -> dict:
    info = client.get(f"/v1/volumes/{volume_id}").json()
    return {key: info[key] for key in ("shape", "dtype", "spacing", "origin_lps", "ijk_to_ras", "bytes", "modality")}


@pytest.mark.parametrize("encoding", ["identity", "gzip", "deflate"])
def test_raw_upload_stores_the_same_volume_as_the_json_form(client, chest, encoding):
    data = raw_bytes(chest)
    body = {"identity": data, "gzip": gzip.compress(data, 1), "deflate": zlib.compress(data, 1)}[encoding]
    headers = header(chest) | ({} if encoding == "identity" else {"Content-Encoding": encoding})
    response = client.post("/v1/volumes", content=body, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "chest raw"
    assert stored(client, response.json()["volume_id"]) == stored(client, upload(client, chest))


def test_raw_voxels_reach_the_pipeline_unchanged(client, chest):
    """The same segmentation from the raw and the JSON upload of the same volume."""
    from service_helpers import reassemble, submit, wait

    raw = client.post("/v1/volumes", content=raw_bytes(chest), headers=header(chest)).json()["volume_id"]
    labelmaps = []
    for volume_id in (raw, upload(client, chest)):
        job = submit(client, volume_id, mode="per-slice", slice_range=[16, 18], window="lung")
        assert wait(client, job)["status"] == "done"
        labelmaps.append(reassemble(client.get(f"/v1/jobs/{job}/result").json()))
    assert labelmaps[0].any() and np.array_equal(labelmaps[0], labelmaps[1])


@pytest.mark.parametrize("mutate, status, phrase", [
    (lambda h, b: ({k: v for k, v in h.items() if k != "X-CitrusV-Volume"}, b), 400, "X-CitrusV-Volume header"),
    (lambda h, b: (h | {"X-CitrusV-Volume": "{not json"}, b), 400, "not valid"),
    (lambda h, b: (h | {"X-CitrusV-Volume": json.dumps({"dtype": "int16", "shape": [2, 2]})}, b), 400, "shape"),
    (lambda h, b: (h, b[:-2]), 400, "but shape x dtype need"),
    (lambda h, b: (h, b + b"\0\0"), 400, "more than"),
    (lambda h, b: (h | {"Content-Encoding": "gzip"}, b"\x1f\x8b" + b[:200]), 400, "compressed body"),
    (lambda h, b: (h | {"Content-Encoding": "gzip"}, gzip.compress(b)[:-40]), 400, "truncated"),
    (lambda h, b: (h | {"Content-Encoding": "br"}, b), 415, "Content-Encoding"),
    (lambda h, b: (h | {"X-CitrusV-Volume": json.dumps(json.loads(h["X-CitrusV-Volume"]) | {"handover": "../etc"})},
                   b""), 400, "handover"),
])
def test_bad_raw_uploads_are_clear_errors(client, chest, mutate, status, phrase):
    headers, body = mutate(header(chest), raw_bytes(chest))
    response = client.post("/v1/volumes", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert phrase in response.json()["error"]["message"]


def test_raw_uploads_respect_the_voxel_limit(limits_client):
    shape = [200, 200, 60]  # 2.4 M voxels > --max-voxels 2,000,000: refused before any byte is read
    headers = {"Content-Type": "application/octet-stream", "X-CitrusV-Volume": json.dumps(
        {"dtype": "uint8", "shape": shape, "ijk_to_ras": np.eye(4).tolist()})}
    response = limits_client.post("/v1/volumes", content=b"\0" * 1024, headers=headers)
    assert response.status_code == 413 and "--max-voxels" in response.json()["error"]["message"]


def test_a_refused_handover_leaves_no_file_behind(limits_server, limits_client):
    """Refused for its size (--max-voxels) or for a body besides: the volume-sized file is removed all the same."""
    folder = Path(limits_server.ready["handover_dir"])
    for name, shape, body, status in (("big.raw", [200, 200, 60], b"", 413), ("both.raw", [2, 2, 2], b"\0" * 8, 400)):
        path = folder / name
        path.write_bytes(b"\0" * 4096)
        headers = {"Content-Type": "application/octet-stream", "X-CitrusV-Volume": json.dumps(
            {"dtype": "uint8", "shape": shape, "ijk_to_ras": np.eye(4).tolist(), "handover": name})}
        response = limits_client.post("/v1/volumes", content=body, headers=headers)
        assert response.status_code == status, response.text
        assert not path.exists(), f"{name}: the refused handover file stayed in the server's folder"


def test_handover_takes_a_file_from_the_private_folder_once(server, client, chest):
    folder = Path(server.ready["handover_dir"])
    assert folder.is_dir() and (folder.stat().st_mode & 0o077) == 0 and (folder.parent.stat().st_mode & 0o077) == 0
    path = folder / "volume-test.raw"
    path.write_bytes(raw_bytes(chest))
    response = client.post("/v1/volumes", headers=header(chest, handover=path.name))
    assert response.status_code == 201, response.text
    assert not path.exists(), "the server must remove the file it took"
    assert stored(client, response.json()["volume_id"]) == stored(client, upload(client, chest))
    again = client.post("/v1/volumes", headers=header(chest, handover=path.name))
    assert again.status_code == 400 and "taken once" in again.json()["error"]["message"]


def test_handover_refuses_links_wrong_sizes_and_a_body_besides(server, client, chest, tmp_path):
    folder = Path(server.ready["handover_dir"])
    secret = tmp_path / "secret.raw"
    secret.write_bytes(raw_bytes(chest))
    (folder / "link.raw").symlink_to(secret)
    response = client.post("/v1/volumes", headers=header(chest, handover="link.raw"))
    assert response.status_code == 400 and secret.exists()
    short = folder / "short.raw"
    short.write_bytes(raw_bytes(chest)[:-1])
    response = client.post("/v1/volumes", headers=header(chest, handover="short.raw"))
    assert response.status_code == 400 and "but shape x dtype need" in response.json()["error"]["message"]
    assert not short.exists()
    both = folder / "both.raw"
    both.write_bytes(raw_bytes(chest))
    response = client.post("/v1/volumes", content=b"\0" * 16, headers=header(chest, handover="both.raw"))
    assert response.status_code == 400 and "not both" in response.json()["error"]["message"]


def test_serve_exits_when_its_stdin_closes(tiny_checkpoint, session_dir):
    """--exit-with-parent: the launcher's graceful stop (closing the pipe) and a dead launcher look the same."""
    env = {k: v for k, v in os.environ.items() if k != "CITRUSV_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "citrusv_backend.cli", "serve", "--model", str(tiny_checkpoint),
                                "--device", "cpu", "--port", "0", "--exit-with-parent"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        ready = json.loads(process.stdout.readline())
        assert ready["event"] == "ready"
        token_dir = Path(ready["token_file"]).parent
        handover = Path(ready["handover_dir"])
        process.stdin.close()
        assert process.wait(60) in (0, 130)
        assert not token_dir.exists() and not handover.exists(), "the graceful stop must clean up"
    finally:
        if process.poll() is None:
            process.kill()
