#!/usr/bin/env python3
"""The service's transfer path: a 512x512x300 int16 volume uploaded to `citrusv serve` and a segmentation result
fetched back over loopback, against copying the same bytes through a plain local TCP socket.

    .venv/bin/python bench/bench_transfer.py --model TINY_OR_REAL_CHECKPOINT [--device cpu] [--repeats 3]

Upload: client-side encoding (zlib level 1 + base64 + JSON, or no compression), then POST /v1/volumes until the
server has parsed, inflated and stored the volume (201). Result: GET /v1/jobs/{id}/result of a per-slice
segmentation (its masks as compressed crops), then the client's decode into a full labelmap. The socket baseline
sends exactly the same bytes (the request body, the result body) from one socket to another in this process.
Writes bench/results/transfer-<hostname>-<date>.json and prints a table. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import socket
import statistics
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from citrusv_backend import __version__
from citrusv_backend.server.codec import decode_crop
from citrusv_backend.server.process import start_server

MB = 1e6


def phantom(shape=(300, 512, 512), seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume (air, an elliptic body of soft tissue, lungs, a spine, 10 HU of noise): it compresses
    about as well as a real CT, unlike random bytes (not at all) or a constant (absurdly well)."""
    k, j, i = shape
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:j, 0:i]
    y, x = (y - j / 2) / (j / 2), (x - i / 2) / (i / 2)
    plane = np.full((j, i), -1000.0)
    plane[(x / 0.85) ** 2 + (y / 0.65) ** 2 < 1] = 40
    for side in (-0.4, 0.4):
        plane[((x - side) / 0.3) ** 2 + ((y + 0.05) / 0.45) ** 2 < 1] = -850
    plane[(x / 0.08) ** 2 + ((y - 0.45) / 0.08) ** 2 < 1] = 700
    volume = np.empty(shape, np.int16)
    for n in range(k):
        scale = 0.9 + 0.1 * np.sin(n / k * np.pi)
        rows = np.clip(((np.arange(j) - j / 2) / scale + j / 2).astype(int), 0, j - 1)
        volume[n] = np.clip(plane[rows] + rng.normal(0, 10, (j, i)), -1024, 3071).astype(np.int16)
    return volume


def socket_copy_seconds(data: bytes) -> float:
    """Send `data` from one loopback TCP socket to another and read it all: the floor for any HTTP transfer."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def sink():
        connection, _ = listener.accept()
        buffer, total = bytearray(1 << 20), 0
        while (count := connection.recv_into(buffer)) > 0:
            total += count
        received.append(total)
        connection.close()

    thread = threading.Thread(target=sink)
    thread.start()
    started = time.perf_counter()
    with socket.create_connection(listener.getsockname()) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        thread.join()
    elapsed = time.perf_counter() - started
    listener.close()
    assert received == [len(data)]
    return elapsed


def encode_upload(voxels: np.ndarray, ijk_to_ras: np.ndarray, compression: str) -> tuple[bytes, float]:
    """The request body as a fast client builds it: the base64 bytes spliced into the JSON (they need no escaping),
    instead of json.dumps scanning a 200 MB string."""
    started = time.perf_counter()
    raw = voxels.astype("<i2", copy=False).tobytes()
    packed = zlib.compress(raw, 1) if compression == "zlib" else raw
    fields = json.dumps({"compression": compression, "dtype": "int16", "shape": list(voxels.shape),
                         "ijk_to_ras": ijk_to_ras.tolist(), "name": "phantom", "modality": "CT"})
    body = b"".join([b'{"voxels":"', base64.b64encode(packed), b'",', fields[1:].encode()])
    return body, time.perf_counter() - started


class Client:
    """http.client (the standard library, as the Slicer module has it): it sends a large body with one sendall.
    (httpx's synchronous client re-slices the remaining bytes after every send: seconds for 200 MB.)"""

    def __init__(self, url: str, token: str):
        host, port = url.split("//")[1].rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=600)
        self.headers = {"Authorization": f"Bearer {token}"}

    def request(self, method: str, path: str, body: bytes | None = None, json_body=None) -> tuple[int, bytes]:
        headers = dict(self.headers)
        if json_body is not None:
            body = json.dumps(json_body).encode()
        if body is not None:
            headers["Content-Type"] = "application/json"
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        return response.status, response.read()

    def json(self, method: str, path: str, **kwargs):
        status, content = self.request(method, path, **kwargs)
        return status, json.loads(content)


def median_time(function, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (a tiny one is enough: the model barely runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=40,
                        help="slices segmented for the result (per-slice mode): an organ's extent")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()

    shape = (300, 512, 512)
    voxels = phantom(shape)
    ijk_to_ras = np.array([[-0.7, 0, 0, 180], [0, -0.7, 0, 180], [0, 0, 1.25, -200], [0, 0, 0, 1]], float)
    raw_mb = voxels.nbytes / MB
    rows = {}
    server = start_server(args.model, "--device", args.device, "--max-upload-mb", "2048", timeout=600)
    try:
        client = Client(server.url, server.token)
        for compression in ("zlib", "none"):
            body, encode_s = encode_upload(voxels, ijk_to_ras, compression)
            upload_s, (status, content) = median_time(lambda: client.request("POST", "/v1/volumes", body=body),
                                                      args.repeats)
            assert status == 201, content[:500]
            socket_s = statistics.median(socket_copy_seconds(body) for _ in range(args.repeats))
            rows[f"upload ({compression})"] = {
                "volume_mb": raw_mb, "wire_mb": len(body) / MB, "client_encode_s": encode_s, "http_s": upload_s,
                "round_trip_s": encode_s + upload_s, "volume_mb_per_s": raw_mb / (encode_s + upload_s),
                "wire_mb_per_s": len(body) / MB / upload_s, "socket_copy_s": socket_s,
                "ratio_http_to_socket": upload_s / socket_s,
                "ratio_round_trip_to_socket": (encode_s + upload_s) / socket_s}
            volume_id = json.loads(content)["volume_id"]
        first = shape[0] // 2 - args.slices // 2
        _, job = client.json("POST", "/v1/jobs", json_body={
            "volume_id": volume_id, "task": "segment", "prompt": "segment the body",
            "options": {"mode": "per-slice", "slice_range": [first, first + args.slices]}})
        started = time.perf_counter()
        while (status := client.json("GET", f"/v1/jobs/{job['job_id']}")[1])["status"] not in ("done", "failed",
                                                                                            "cancelled"):
            time.sleep(0.2)
        job_s = time.perf_counter() - started
        assert status["status"] == "done", status
        fetch_s, (_, content) = median_time(lambda: client.request("GET", f"/v1/jobs/{job['job_id']}/result"),
                                            args.repeats)

        def rebuild():
            result = json.loads(content)
            labels = np.zeros(result["labelmap"]["shape"], np.uint8)
            for segment in result["segments"]:
                if segment["mask"]:
                    mask = segment["mask"]
                    region = labels[tuple(slice(o, o + n) for o, n in zip(mask["offset"], mask["shape"]))]
                    crop = decode_crop(mask)
                    region[crop > 0] = crop[crop > 0]
            return labels

        decode_s, labels = median_time(rebuild, args.repeats)
        segments = json.loads(content)["segments"]
        crop_voxels = sum(int(np.prod(s["mask"]["shape"])) for s in segments if s["mask"])
        socket_s = statistics.median(socket_copy_seconds(content) for _ in range(args.repeats))
        rows["result"] = {
            "labelmap_mb": labels.nbytes / MB, "crop_mb": crop_voxels / MB, "wire_mb": len(content) / MB,
            "segmented_voxels": int((labels > 0).sum()), "job_s": job_s, "http_s": fetch_s,
            "client_decode_s": decode_s, "round_trip_s": fetch_s + decode_s,
            "labelmap_mb_per_s": labels.nbytes / MB / (fetch_s + decode_s), "socket_copy_s": socket_s,
            "ratio_http_to_socket": fetch_s / socket_s, "ratio_round_trip_to_socket": (fetch_s + decode_s) / socket_s,
            "full_labelmap_socket_copy_s": socket_copy_seconds(labels.tobytes())}
    finally:
        server.stop()

    record = {"benchmark": "transfer", "host": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "citrusv": __version__, "python": platform.python_version(), "cpus": os.cpu_count(),
              "volume_shape_kji": list(shape), "dtype": "int16", "repeats": args.repeats, "model": str(args.model),
              "device": server.ready["device"], "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"transfer-{socket.gethostname()}-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'path':14s} {'data MB':>8s} {'wire MB':>8s} {'encode s':>9s} {'http s':>7s} {'decode s':>9s} "
          f"{'total s':>8s} {'data MB/s':>10s} {'socket s':>9s} {'http/socket':>12s} {'total/socket':>13s}")
    for name, row in rows.items():
        data = row.get("volume_mb", row.get("labelmap_mb"))
        print(f"{name:14s} {data:8.1f} {row['wire_mb']:8.2f} {row.get('client_encode_s', 0):9.3f} {row['http_s']:7.3f} "
              f"{row.get('client_decode_s', 0):9.3f} {row['round_trip_s']:8.3f} "
              f"{row.get('volume_mb_per_s', row.get('labelmap_mb_per_s')):10.0f} {row['socket_copy_s']:9.4f} "
              f"{row['ratio_http_to_socket']:12.1f} {row['ratio_round_trip_to_socket']:13.1f}")
    result = rows["result"]
    print(f"result: {result['segmented_voxels']:,} segmented voxels, crops {result['crop_mb']:.1f} MB -> "
          f"{result['wire_mb']:.2f} MB on the wire; the whole uncompressed labelmap through a bare socket would take "
          f"{result['full_labelmap_socket_copy_s']:.3f} s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
