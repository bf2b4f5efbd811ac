#!/usr/bin/env python3
"""One Apply (512x512x300 int16 upload, a per-slice segmentation job, the result download and decode) driven by a
main loop that holds the GIL as PythonQt does (Testing/module/gil_loop.py), against the same Apply in plain CPython.

    .venv/bin/python bench/bench_slicer_loop.py --model TINY_OR_REAL_CHECKPOINT [--repeats 3] [--slices 4]

Reports the longest main-thread stall (the longest tick: the UI cannot repaint or react while one runs; goal
<= 100 ms), the 99th percentile tick, and the Apply's wall time under the GIL-holding loop divided by plain CPython's.
For comparison, the module's earlier design (a Python worker thread building the base64 + JSON upload and doing the
HTTP, drained by a 200 ms timer) is run under the same loop against the same server, with a time limit. Writes bench/results/slicer-loop-<host>-<date>.json.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import queue
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "CitrusVSlicer"), str(REPO / "Testing" / "module"), str(REPO / "bench")]

from bench_transfer import phantom  # noqa: E402
from citrusv_backend import __version__  # noqa: E402
from citrusv_backend.server.process import start_server  # noqa: E402
from CitrusVSlicerLib.client import scene_result_from_payload  # noqa: E402
from CitrusVSlicerLib.endpoints import Target  # noqa: E402
from CitrusVSlicerLib.runner import ApplyRunner  # noqa: E402
from CitrusVSlicerLib.transport import Transport  # noqa: E402
from CitrusVSlicerLib.upload import VolumeUpload  # noqa: E402
from gil_loop import GilHoldingLoop  # noqa: E402


def module_apply(transport, target, voxels, ijk_to_ras, options, plain: bool) -> dict:
    runner = ApplyRunner(VolumeUpload(transport, target, voxels, ijk_to_ras, "phantom"), "segment", "segment the body",
                         options)
    loop = GilHoldingLoop(plain=plain)
    runner.start()
    wall = loop.run(runner.poll, lambda: not runner.active, timeout=900)
    events = runner.events()
    assert runner.state == "done", [e.message for e in events if e.kind != "progress"]
    ticks = sorted(loop.ticks)
    return {"wall_s": wall, "longest_stall_ms": 1000 * ticks[-1], "p99_tick_ms": 1000 * ticks[int(0.99 * (len(ticks) - 1))],
            "ticks": len(ticks)}


def threaded_apply(target, voxels, ijk_to_ras, options, limit_s: float) -> dict:
    """The earlier design: HTTP in a Python thread, its events drained by a 200 ms timer on the main thread."""
    events: queue.Queue = queue.Queue()
    host, port = target.url.split("//")[1].rsplit(":", 1)

    def work():
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        headers = {"Authorization": f"Bearer {target.token}"}

        def request(method, path, body=None, extra=None):
            connection.request(method, path, body=body, headers={**headers, **(extra or {})})
            response = connection.getresponse()
            data = b""
            while chunk := response.read(10 * 1024):  # requests' default iter_content chunk
                data += chunk
            return json.loads(data)

        body = json.dumps({"voxels": base64.b64encode(voxels.tobytes()).decode("ascii"), "compression": "none",
                           "dtype": "int16", "shape": list(voxels.shape), "ijk_to_ras": ijk_to_ras.tolist(),
                           "name": "phantom", "modality": "CT"}).encode()  # as the earlier client (requests' json=)
        volume = request("POST", "/v1/volumes", body, {"Content-Type": "application/json"})
        job = request("POST", "/v1/jobs", json.dumps({"volume_id": volume["volume_id"], "task": "segment",
                                                     "prompt": "segment the body", "options": options}),
                      {"Content-Type": "application/json"})
        while request("GET", f"/v1/jobs/{job['job_id']}")["status"] not in ("done", "failed", "cancelled"):
            time.sleep(0.3)
        events.put(scene_result_from_payload(request("GET", f"/v1/jobs/{job['job_id']}/result"), voxels.shape))

    thread = threading.Thread(target=work, daemon=True)
    done = []

    def tick() -> float:  # the old panel's 200 ms timer draining the worker's queue
        while not events.empty():
            done.append(events.get_nowait())
        return 0.2

    loop = GilHoldingLoop(max_interval_s=0.2)
    thread.start()
    try:
        wall = loop.run(tick, lambda: bool(done), timeout=limit_s)
        return {"wall_s": wall, "finished": True, "longest_stall_ms": 1000 * loop.longest_stall_s}
    except TimeoutError:
        return {"wall_s": None, "finished": False, "limit_s": limit_s, "longest_stall_ms": 1000 * loop.longest_stall_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=4, help="slices the job segments (per-slice mode)")
    parser.add_argument("--threaded-limit", type=float, default=120.0, help="time limit of the earlier design's run (s)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()

    shape = (300, 512, 512)
    voxels = phantom(shape)
    ijk_to_ras = np.array([[-0.7, 0, 0, 180], [0, -0.7, 0, 180], [0, 0, 1.25, -200], [0, 0, 0, 1]], float)
    first = shape[0] // 2 - args.slices // 2
    options = {"mode": "per-slice", "slice_range": [first, first + args.slices]}
    server = start_server(args.model, "--device", args.device, "--max-upload-mb", "2048", timeout=900)
    transport = Transport()
    try:
        target = Target(server.url, server.token, handover_dir=server.ready["handover_dir"])
        module_apply(transport, target, voxels, ijk_to_ras, options, plain=True)  # warm-up (courier start, caches)
        runs = {"gil_holding_loop": [], "plain_cpython": []}
        for _ in range(args.repeats):
            for name, plain in (("gil_holding_loop", False), ("plain_cpython", True)):
                runs[name].append(module_apply(transport, target, voxels, ijk_to_ras, options, plain))
        threaded = threaded_apply(Target(server.url, server.token), voxels, ijk_to_ras, options, args.threaded_limit)
    finally:
        transport.close()
        server.stop()
    held, plain = runs["gil_holding_loop"], runs["plain_cpython"]
    summary = {"longest_stall_ms": max(r["longest_stall_ms"] for r in held),
               "p99_tick_ms": statistics.median(r["p99_tick_ms"] for r in held),
               "wall_s_gil_holding": statistics.median(r["wall_s"] for r in held),
               "wall_s_plain": statistics.median(r["wall_s"] for r in plain)}
    summary["wall_ratio"] = summary["wall_s_gil_holding"] / summary["wall_s_plain"]
    record = {"benchmark": "slicer-loop", "host": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "citrusv": __version__, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "volume_shape_kji": list(shape), "job": options, "repeats": args.repeats, "model": str(args.model),
              "summary": summary, "runs": runs, "earlier_threaded_design_under_the_loop": threaded}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"slicer-loop-{socket.gethostname()}-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"longest main-thread stall {summary['longest_stall_ms']:.1f} ms (p99 tick {summary['p99_tick_ms']:.1f} ms); "
          f"Apply {summary['wall_s_gil_holding']:.2f} s under the GIL-holding loop vs {summary['wall_s_plain']:.2f} s in "
          f"plain CPython (ratio {summary['wall_ratio']:.2f})")
    print("earlier threaded design under the same loop: " + (f"{threaded['wall_s']:.1f} s" if threaded["finished"] else
                                                           f"not finished after {threaded['limit_s']:.0f} s")
          + f", longest main-thread stall {threaded['longest_stall_ms']:.0f} ms")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
