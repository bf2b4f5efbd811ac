#!/usr/bin/env python3
"""The module's transfer path against a raw loopback socket copy of the same bytes: a 512x512x300 int16 volume uploaded
to `citrusv serve`, a segmentation result downloaded, and the peak transient memory of an upload.

    .venv/bin/python bench/bench_transfer.py --model TINY_OR_REAL_CHECKPOINT [--device cpu] [--repeats 3]

Upload paths, each timed from the first voxel written to the server's 201 (what Apply waits for):
  handover   the module and its own local backend: the voxels written from the array into the server's private
             handover folder in time-boxed blocks (handover.py), then POST /v1/volumes naming the file; the server
             maps it (no network copy, no second copy in memory)
  raw        any other backend (here on loopback): the same file streamed by the courier as the raw
             application/octet-stream body (sendfile), the server writing it straight into the volume's array
  raw+gzip   what goes to a remote server (compressed on the fly by the courier)
  json       the JSON + base64 form (other clients; the module's old path), for reference
The socket baseline sends the volume's bytes from one loopback TCP socket to another in this process.

Result: GET /v1/jobs/{id}/result through the courier (its body handed over in a file) against a socket copy of the same
body, and the main-thread decode into masks (ResultDecoder). A result body is small (crops, compressed): its time is
one request's latency. The download machinery itself (courier, large reads, the body handed over in a file, read on
the main thread) is also timed on a body the size of the volume, served by a plain HTTP server in this process. Memory: the peak resident memory above the starting
level, of the server and of this process, during each upload (Linux: /proc/PID/status VmHWM after clear_refs).
Each timed run is paired with socket copies made just before it (ratios are medians of those pairs: on a shared
machine the load changes between runs). Writes bench/results/transfer-<hostname>-<date>.json and prints a table.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import base64
import http.server
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CitrusVSlicer"))

from citrusv_backend import __version__  # noqa: E402
from citrusv_backend.server.process import start_server  # noqa: E402
from CitrusVSlicerLib.client import ResultDecoder, upload_headers  # noqa: E402
from CitrusVSlicerLib.endpoints import Target  # noqa: E402
from CitrusVSlicerLib.handover import VolumeFileWriter  # noqa: E402
from CitrusVSlicerLib.transport import Transport  # noqa: E402

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


def socket_copy_seconds(data, into_new_buffer: bool = False) -> float:
    """Send `data` from one loopback TCP socket to another and read it all: the floor for any HTTP transfer. The
    receiver reuses a 1 MB buffer (the strict floor), or with `into_new_buffer` receives into a fresh buffer of the
    data's size (what any download that keeps the bytes must at least do)."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = []
    size = len(memoryview(data).cast("B"))

    def sink():
        connection, _ = listener.accept()
        total = 0
        if into_new_buffer:
            buffer = memoryview(bytearray(size))
            while total < size and (count := connection.recv_into(buffer[total:])) > 0:
                total += count
        else:
            buffer = bytearray(1 << 20)
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
    assert received == [size]
    return elapsed


class PeakMemory:
    """Peak resident memory of processes above their level at `start()` (Linux; zeros elsewhere)."""

    def __init__(self, pids):
        self.pids = list(pids)

    @staticmethod
    def _status(pid, key) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        self.base = {}
        for pid in self.pids:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.base[pid] = self._status(pid, "VmRSS") if os.path.exists(f"/proc/{pid}") else 0

    def peak_above_start(self) -> dict:
        return {pid: max(0, self._status(pid, "VmHWM") - self.base[pid]) if os.path.exists(f"/proc/{pid}") else 0
                for pid in self.pids}


def wait_call(transport: Transport, call, timeout: float = 600.0) -> None:
    deadline = time.perf_counter() + timeout
    while not call.done:
        transport.poll()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{call.method} {call.path} not answered")
        time.sleep(0.0002)


def module_upload(transport: Transport, target: Target, voxels, ijk_to_ras, compress=None) -> dict:
    """One upload as the runner does it (all writer steps back to back, as a 0 ms timer runs them)."""
    started = time.perf_counter()
    writer = VolumeFileWriter(voxels, Path(target.handover_dir or transport.work_dir))
    steps = 0
    while not writer.step():
        steps += 1
    written = time.perf_counter()
    handover = writer.name if target.handover_dir else None
    call = transport.request(target, "POST", "/v1/volumes", body_file=None if handover else str(writer.path),
                             headers=upload_headers(voxels, ijk_to_ras, "phantom", handover=handover),
                             compress=compress, timeout=600)
    wait_call(transport, call)
    finished = time.perf_counter()
    writer.discard()
    assert call.ok, call.error
    return {"volume_id": call.json()["volume_id"], "write_s": written - started, "request_s": finished - written,
            "total_s": finished - started, "writer_steps": steps + 1}


def json_upload(transport: Transport, target: Target, voxels, ijk_to_ras) -> dict:
    """The JSON form as a fast client builds it (base64 spliced into the JSON), sent from a file by the courier."""
    started = time.perf_counter()
    fields = json.dumps({"compression": "none", "dtype": "int16", "shape": list(voxels.shape),
                         "ijk_to_ras": ijk_to_ras.tolist(), "name": "phantom", "modality": "CT"})
    body = b"".join([b'{"voxels":"', base64.b64encode(voxels.tobytes()), b'",', fields[1:].encode()])
    path = transport.work_dir / "json-upload.body"
    path.write_bytes(body)
    encoded = time.perf_counter()
    call = transport.request(target, "POST", "/v1/volumes", body_file=str(path),
                             headers={"Content-Type": "application/json"}, timeout=600)
    wait_call(transport, call)
    finished = time.perf_counter()
    path.unlink()
    assert call.ok, call.error
    return {"volume_id": call.json()["volume_id"], "write_s": encoded - started, "request_s": finished - encoded,
            "total_s": finished - started, "wire_mb": len(body) / MB}


def large_download(transport: Transport, body: bytes, repeats: int) -> dict:
    """GET of a `body`-sized response from a minimal HTTP server, through the courier, read on the main thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    target = Target(f"http://127.0.0.1:{httpd.server_address[1]}", "unused")
    times, ratios, ratios_into = [], [], []
    try:
        for _ in range(repeats):
            socket_s = socket_copy_seconds(body)
            into_s = socket_copy_seconds(body, into_new_buffer=True)
            started = time.perf_counter()
            call = transport.request(target, "GET", "/body", large_response=True, timeout=120)
            wait_call(transport, call)
            view = call.body_view()
            touched = int(np.frombuffer(view, np.uint8)[::4096].sum())  # every page reached from the main thread
            times.append(time.perf_counter() - started)
            ratios.append(times[-1] / socket_s)
            ratios_into.append(times[-1] / into_s)
            assert len(view) == len(body) and touched >= 0
            del view
            call.release()
    finally:
        httpd.shutdown()
    return {"wire_mb": len(body) / MB, "total_s": statistics.median(times), "socket_copy_s": times[-1] / ratios[-1],
            "socket_copy_into_new_buffer_s": times[-1] / ratios_into[-1], "ratio_to_socket": statistics.median(ratios),
            "ratio_to_socket_into_new_buffer": statistics.median(ratios_into)}


def delete(transport: Transport, target: Target, volume_id: str) -> None:
    wait_call(transport, transport.request(target, "DELETE", f"/v1/volumes/{volume_id}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (a tiny one is enough: the model barely runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=40,
                        help="slices segmented for the result (per-slice mode): an organ's extent")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()

    shape = (300, 512, 512)
    voxels = phantom(shape)
    ijk_to_ras = np.array([[-0.7, 0, 0, 180], [0, -0.7, 0, 180], [0, 0, 1.25, -200], [0, 0, 0, 1]], float)
    volume_mb = voxels.nbytes / MB
    server = start_server(args.model, "--device", args.device, "--max-upload-mb", "2048", "--volume-budget-mb", "4096",
                          timeout=900)
    transport = Transport()
    rows = {}
    try:
        local = Target(server.url, server.token, handover_dir=server.ready["handover_dir"])
        other = Target(server.url, server.token)
        memory = PeakMemory([server.process.pid, os.getpid()])
        paths = {"handover": lambda: module_upload(transport, local, voxels, ijk_to_ras),
                 "raw": lambda: module_upload(transport, other, voxels, ijk_to_ras),
                 "raw+gzip": lambda: module_upload(transport, other, voxels, ijk_to_ras, compress="gzip"),
                 "json": lambda: json_upload(transport, other, voxels, ijk_to_ras)}
        for name, upload in paths.items():
            runs = []
            for _ in range(args.repeats):
                # Each upload is paired with socket copies made just before it: the machine's load changes from
                # minute to minute, so each ratio compares like with like.
                socket_s = socket_copy_seconds(voxels)
                into_s = socket_copy_seconds(voxels, into_new_buffer=True)
                memory.start()
                run = upload()
                peaks = memory.peak_above_start()
                run["server_peak_mb"], run["client_peak_mb"] = peaks[server.process.pid] / MB, peaks[os.getpid()] / MB
                delete(transport, other, run.pop("volume_id"))
                run.update(socket_copy_s=socket_s, socket_copy_into_new_buffer_s=into_s,
                           ratio_to_socket=run["total_s"] / socket_s,
                           ratio_to_socket_into_new_buffer=run["total_s"] / into_s)
                runs.append(run)
            row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            row.update(volume_mb=volume_mb,
                       peak_transient_over_volume=(row["server_peak_mb"] + row["client_peak_mb"]) / volume_mb)
            rows[f"upload ({name})"] = row

        volume_id = module_upload(transport, local, voxels, ijk_to_ras)["volume_id"]
        first = shape[0] // 2 - args.slices // 2
        job_call = transport.request(other, "POST", "/v1/jobs", json_body={
            "volume_id": volume_id, "task": "segment", "prompt": "segment the body",
            "options": {"mode": "per-slice", "slice_range": [first, first + args.slices]}})
        wait_call(transport, job_call)
        job_id = job_call.json()["job_id"]
        started = time.perf_counter()
        while True:
            status = transport.request(other, "GET", f"/v1/jobs/{job_id}")
            wait_call(transport, status)
            if status.json()["status"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.2)
        job_s = time.perf_counter() - started
        assert status.json()["status"] == "done", status.json()
        fetches, decodes, body = [], [], b""
        for _ in range(args.repeats):
            started = time.perf_counter()
            call = transport.request(other, "GET", f"/v1/jobs/{job_id}/result", large_response=True, timeout=120)
            wait_call(transport, call)
            body = call.body()
            fetched = time.perf_counter()
            decoder = ResultDecoder(json.loads(body), shape)
            steps = 1
            while (result := decoder.step()) is None:
                steps += 1
            decodes.append(time.perf_counter() - fetched)
            fetches.append(fetched - started)
        socket_body_s = statistics.median(socket_copy_seconds(body) for _ in range(args.repeats))
        call.release()
        crop_voxels = sum(int(np.prod(s.crop.shape)) for s in result.segments)
        rows["result"] = {"wire_mb": len(body) / MB, "crop_mb": crop_voxels / MB, "job_s": job_s,
                          "total_s": statistics.median(fetches), "decode_s": statistics.median(decodes),
                          "decode_steps": steps, "socket_copy_s": socket_body_s,
                          "ratio_to_socket": statistics.median(fetches) / socket_body_s,
                          "ratio_to_socket_with_decode": (statistics.median(fetches) + statistics.median(decodes))
                          / socket_body_s}
        rows["download (volume-sized body)"] = large_download(transport, voxels.tobytes(), args.repeats)
    finally:
        transport.close()
        server.stop()

    record = {"benchmark": "transfer", "host": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "citrusv": __version__, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "volume_shape_kji": list(shape), "dtype": "int16", "repeats": args.repeats, "model": str(args.model),
              "device": server.ready["device"], "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"transfer-{socket.gethostname()}-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'path':18s} {'write s':>8s} {'request s':>10s} {'total s':>8s} {'socket s':>9s} {'ratio':>6s} "
          f"{'ratio new':>9s} {'server MB':>10s} {'client MB':>10s} {'peak/vol':>9s}")
    for name, row in rows.items():
        if not name.startswith("upload"):
            continue
        print(f"{name:18s} {row['write_s']:8.3f} {row['request_s']:10.3f} {row['total_s']:8.3f} "
              f"{row['socket_copy_s']:9.3f} {row['ratio_to_socket']:6.2f} {row['ratio_to_socket_into_new_buffer']:9.2f} "
              f"{row['server_peak_mb']:10.1f} "
              f"{row['client_peak_mb']:10.1f} {row['peak_transient_over_volume']:9.2f}")
    result = rows["result"]
    print(f"result: {result['wire_mb']:.2f} MB body ({result['crop_mb']:.1f} MB of mask crops) in {result['total_s']:.4f} s "
          f"vs {result['socket_copy_s']:.4f} s socket copy (ratio {result['ratio_to_socket']:.2f}); decoded in "
          f"{result['decode_s']:.3f} s over {result['decode_steps']} main-thread steps")
    large = rows["download (volume-sized body)"]
    print(f"download machinery: {large['wire_mb']:.0f} MB in {large['total_s']:.3f} s vs {large['socket_copy_s']:.3f} s "
          f"socket copy (ratio {large['ratio_to_socket']:.2f}), {large['socket_copy_into_new_buffer_s']:.3f} s into a new "
          f"buffer (ratio {large['ratio_to_socket_into_new_buffer']:.2f})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
