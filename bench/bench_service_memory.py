#!/usr/bin/env python3
"""The service's memory under hostile and careless clients: peak resident memory (VmHWM) of `citrusv serve`
after a header bomb, after size-lying uploads, and over 100 upload / use / delete cycles; plus what is left
of 200 connections that never finish their headers.

    .venv/bin/python bench/bench_service_memory.py --model TINY_OR_REAL_CHECKPOINT [--label after]

1. Header bomb: one request whose header line grows to 256 MiB (no token). Recorded: the reply, how much the
   server read before it stopped reading, the peak RSS growth.
2. Size lies: three 1,376-byte NIfTI files claiming float64 640^3 (2.1 GB each) uploaded at once, and one NRRD
   whose gzip data is 1 KiB for the same claim. Recorded: the answers, the peak RSS growth.
3. 100 cycles of a 64 MiB int16 volume uploaded, asked about once (a 1-token 'ask' job), deleted. Recorded: RSS
   after every 10 cycles, the peak, and RSS after the last delete against the start.
4. Slow headers: 200 connections send half a request and stop. Recorded: how many the server still holds after
   its header timeout (10 s by default) plus 2 s.
The peak is reset before each part (/proc/PID/clear_refs). Writes bench/results/service-memory-<label>-<host>-
<date>.json. Not part of the test suite (the suite checks each defect with smaller sizes).
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "Testing" / "service"))

from service_helpers import reset_peak_memory, server_memory  # noqa: E402

from citrusv_backend.server.process import start_server  # noqa: E402

MiB = 2**20


def mb(value: int) -> float:
    return round(value / MiB, 1)


def header_bomb(server, size: int = 256 * MiB) -> dict:
    reset_peak_memory(server)
    before = server_memory(server)["rss"]
    sent, reply = 0, b""
    started = time.perf_counter()
    with socket.create_connection((server.ready["host"], server.ready["port"]), timeout=60) as sock:
        sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bomb: ")
        block = b"A" * MiB
        try:
            while sent < size:
                sock.sendall(block)
                sent += len(block)
            sock.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = sock.recv(200)
        except (ConnectionResetError, TimeoutError):
            pass
    return {"header_mib_attempted": size // MiB, "header_mib_sent_before_cut": round(sent / MiB, 1),
            "reply": reply.split(b"\r\n", 1)[0].decode(errors="replace"), "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_growth_mb": mb(server_memory(server)["peak"] - before)}


def lying_nifti(side: int) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((side, side, side))
    header.set_data_dtype(np.float64)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4 + b"\x00" * 1024  # 1,376 bytes


def size_lies(server, http: httpx.Client, side: int) -> dict:
    reset_peak_memory(server)
    before = server_memory(server)["rss"]
    nifti = lying_nifti(side)
    nrrd = (f"NRRD0004\ntype: double\ndimension: 3\nsizes: {side} {side} {side}\nencoding: gzip\n\n".encode()
            + gzip.compress(b"\x00" * 1024))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(http.post("/v1/volumes", files={
        "file": ("liar.nii", nifti, "application/octet-stream")}))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answers.append(http.post("/v1/volumes", files={"file": ("liar.nrrd", nrrd, "application/octet-stream")}))
    return {"files": {"nifti_bytes": len(nifti), "nrrd_bytes": len(nrrd), "claimed_shape": [side] * 3,
                      "claimed_mb_each": mb(side**3 * 8)},
            "statuses": [a.status_code for a in answers],
            "messages": sorted({a.json()["error"]["message"][:160] for a in answers if a.status_code >= 400}),
            "peak_rss_growth_mb": mb(server_memory(server)["peak"] - before)}


def cycles(server, http: httpx.Client, count: int = 100) -> dict:
    voxels = np.zeros((128, 512, 512), np.int16)
    voxels[:, 200:300, 200:300] = 40
    payload = {"voxels": base64.b64encode(zlib.compress(voxels.tobytes(), 1)).decode(), "compression": "zlib",
               "dtype": "int16", "shape": list(voxels.shape), "ijk_to_ras": np.eye(4).tolist(), "name": "cycle"}
    del voxels
    reset_peak_memory(server)
    start = server_memory(server)["rss"]
    trace = []
    for n in range(1, count + 1):
        volume_id = http.post("/v1/volumes", json=payload).json()["volume_id"]
        job = http.post("/v1/jobs", json={"volume_id": volume_id, "task": "ask", "prompt": "What is this?",
                                          "options": {"slice": 64, "max_new_tokens": 1, "min_pixels": 784,
                                                      "max_pixels": 3136}}).json()["job_id"]
        while http.get(f"/v1/jobs/{job}").json()["status"] in ("queued", "running"):
            time.sleep(0.02)
        http.delete(f"/v1/volumes/{volume_id}")
        if n % 10 == 0:
            trace.append({"cycle": n, "rss_mb": mb(server_memory(server)["rss"])})
    end = server_memory(server)
    return {"cycles": count, "volume_mb": 64, "rss_start_mb": mb(start), "rss_end_mb": mb(end["rss"]),
            "rss_growth_mb": mb(end["rss"] - start), "peak_rss_mb": mb(end["peak"]),
            "stored_after": http.get("/v1/info").json()["volumes"], "trace": trace}


def slow_headers(server, count: int = 200, header_timeout: float = 10.0) -> dict:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((server.ready["host"], server.ready["port"]), timeout=5)
        sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sockets.append(sock)
    time.sleep(header_timeout + 2)
    held = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            sock.recv(1, socket.MSG_PEEK)  # an answer (408) or the end of the stream: the server let it go
        except BlockingIOError:
            held += 1  # nothing to read and not closed: the server still holds it
        except OSError:
            pass
        finally:
            sock.close()
    return {"connections": count, "waited_s": header_timeout + 2, "still_held": held}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label", default="current", help="e.g. before / after a change")
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--claim-side", type=int, default=640,
                        help="the lying files claim float64 SIDE^3 (640: 2.1 GB, as reported; smaller for old code)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "CITRUSV_TOKEN"} | {
        "HF_HUB_OFFLINE": "1", "CITRUSV_TOKEN": "bench-memory-token-0123456789abcdef"}
    log = Path(tempfile.mkdtemp(prefix="citrusv-bench-memory-")) / "server.log"
    with start_server(args.model, "--device", args.device, env=env, log_path=log) as server:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=600) as http:
            baseline = server_memory(server)
            parts = {"header_bomb": header_bomb(server), "size_lies": size_lies(server, http, args.claim_side),
                     "upload_delete_cycles": cycles(server, http, args.cycles), "slow_headers": slow_headers(server)}
            healthy = http.get("/healthz").json() == {"status": "ok", "worker_alive": True}
    report = {"benchmark": "service-memory", "label": args.label, "host": platform.node(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
              "cpus": os.cpu_count(), "model": args.model, "device": args.device,
              "baseline_rss_mb": mb(baseline["rss"]), **parts, "healthy_after": healthy}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"service-memory-{args.label}-{platform.node()}-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
