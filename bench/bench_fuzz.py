#!/usr/bin/env python3
"""10,000 fuzzed requests against `citrusv serve`: how many got a 5xx (the answer must be none), the statuses,
the latencies, and the server's memory and health afterwards.

    .venv/bin/python bench/bench_fuzz.py --model TINY_OR_REAL_CHECKPOINT [--requests 10000] [--seed 2026]

The requests are those of the fuzz test (Testing/service/fuzzing.py: mutated volume uploads, jobs, 2D images,
chat completions and volume files; random bodies, ids and credentials), in the same proportions, seeded, sent
one at a time to a server with the fuzz test's small limits. Writes bench/results/fuzz-<hostname>-<date>.json.
Not part of the test suite (the suite sends 3,100 of them on every run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "Testing" / "service"))

from fuzzing import FuzzRecord, make_bases, run_fuzz  # noqa: E402
from service_helpers import server_memory  # noqa: E402

from citrusv_backend import __version__  # noqa: E402
from citrusv_backend.server.process import start_server  # noqa: E402

PROPORTIONS = {"volume": 600, "job": 500, "image": 200, "chat": 200, "file": 600, "random body": 500,
               "random id": 300, "random credentials": 200}  # those of Testing/service/test_service_fuzz.py
LIMITS = ["--volume-budget-mb", "3", "--volume-ttl", "4", "--max-upload-mb", "4", "--max-voxels", "2000000",
          "--max-new-tokens", "16", "--read-timeout", "2", "--header-timeout", "2", "--max-connections", "24"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    scale = args.requests / sum(PROPORTIONS.values())
    counts = {kind: max(1, math.ceil(n * scale)) for kind, n in PROPORTIONS.items()}
    env = {k: v for k, v in os.environ.items() if k != "CITRUSV_TOKEN"} | {
        "HF_HUB_OFFLINE": "1", "CITRUSV_TOKEN": "bench-fuzz-token-0123456789abcdef"}
    log = Path(tempfile.mkdtemp(prefix="citrusv-bench-fuzz-")) / "server.log"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with start_server(args.model, "--device", args.device, *LIMITS, env=env, log_path=log) as server:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
            before = server_memory(server)
            record = FuzzRecord(strict=False)
            started = time.perf_counter()
            bases = make_bases(http)
            run_fuzz(http, bases, counts, record, args.seed)
            # hypothesis may run fewer examples than asked (a few duplicates are skipped): top up with more
            # seeds until the requested number of requests has been sent.
            for extra_round in range(1, 20):
                if record.total >= args.requests:
                    break
                missing = args.requests - record.total
                run_fuzz(http, bases, {"random body": missing}, record, args.seed + 1000 * extra_round)
            wall = time.perf_counter() - started
            after = server_memory(server)
            health = http.get("/healthz").json()
    server_log_lines = log.read_text(errors="replace").count("\n")
    latencies = record.latencies_ms
    report = {
        "benchmark": "fuzz", "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "citrusv": __version__, "python": platform.python_version(), "cpus": os.cpu_count(), "model": args.model,
        "device": args.device, "seed": args.seed, "server_limits": LIMITS,
        "requests": record.total, "per_kind": dict(record.kinds),
        "statuses": {str(code): count for code, count in sorted(record.statuses.items())},
        "server_errors_5xx": len(record.server_errors), "server_error_examples": record.server_errors[:10],
        "wall_s": round(wall, 1), "requests_per_s": round(record.total / wall, 1),
        "latency_ms": {"median": round(statistics.median(latencies), 2), "p95": round(percentile(latencies, 0.95), 2),
                       "p99": round(percentile(latencies, 0.99), 2), "max": round(max(latencies), 2)},
        "server_rss_mb": {"before": round(before["rss"] / 2**20, 1), "after": round(after["rss"] / 2**20, 1),
                          "peak": round(after["peak"] / 2**20, 1)},
        "healthy_after": health == {"status": "ok", "worker_alive": True}, "server_log_lines": server_log_lines,
    }
    path = Path(args.out) / f"fuzz-{platform.node()}-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("requests", "server_errors_5xx", "statuses", "wall_s", "latency_ms",
                                             "server_rss_mb", "healthy_after")}, indent=1))
    print(f"written to {path}")
    return 0 if not record.server_errors and report["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
