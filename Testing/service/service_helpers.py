"""What the service tests share: encoding a volume for upload, waiting for jobs, rebuilding labelmaps."""
from __future__ import annotations

import base64
import io
import time
import zlib

import numpy as np
from PIL import Image

from citrusv_backend.server.codec import decode_crop
from citrusv_backend.volume.input.io import Volume

FINISHED = ("done", "failed", "cancelled")


def volume_payload(volume: Volume, name: str = "chest", compression: str = "zlib") -> dict:
    raw = np.ascontiguousarray(volume.voxels).astype(volume.voxels.dtype.newbyteorder("<")).tobytes()
    packed = {"zlib": lambda b: zlib.compress(b, 1), "none": lambda b: b,
              "gzip": lambda b: __import__("gzip").compress(b, 1)}[compression](raw)
    return {"voxels": base64.b64encode(packed).decode(), "compression": compression,
            "dtype": str(volume.voxels.dtype.newbyteorder("=")), "shape": list(volume.shape),
            "ijk_to_ras": volume.geometry.ijk_to_ras().tolist(), "name": name, "modality": volume.modality}


def upload(client, volume: Volume, **kwargs) -> str:
    response = client.post("/v1/volumes", json=volume_payload(volume, **kwargs))
    assert response.status_code == 201, response.text
    return response.json()["volume_id"]


def submit(client, volume_id: str, task: str = "segment", prompt: str = "segment the left lung", **options) -> str:
    response = client.post("/v1/jobs", json={"volume_id": volume_id, "task": task, "prompt": prompt, "options": options})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def wait(client, job_id: str, timeout: float = 120.0, until=FINISHED, seen: list | None = None) -> dict:
    """Poll the job until its status is in `until`; every status seen is appended to `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if seen is not None:
            seen.append(status)
        if status["status"] in until:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status['status']} after {timeout} s: {status}"
        time.sleep(0.05)


def reassemble(result: dict) -> np.ndarray:
    """The full labelmap from the result's per-segment crops, as a client does it."""
    labels = np.zeros(result["labelmap"]["shape"], np.uint8)
    for segment in result["segments"]:
        mask = segment["mask"]
        if mask is None:
            continue
        crop = decode_crop(mask)
        region = labels[tuple(slice(o, o + n) for o, n in zip(mask["offset"], mask["shape"]))]
        region[crop > 0] = crop[crop > 0]
    return labels


def png_base64(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def log_lines(path) -> list[dict]:
    import json

    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            lines.append({"unparsed": line})
    return lines


def server_memory(process) -> dict:
    """The server process's resident memory now and its peak (bytes), from /proc."""
    fields = {}
    for line in open(f"/proc/{process.process.pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def reset_peak_memory(process) -> None:
    """Start a new peak: writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    with open(f"/proc/{process.process.pid}/clear_refs", "w") as handle:
        handle.write("5")
