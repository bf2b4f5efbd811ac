#!/usr/bin/env python3
"""`citrusv download` from a hub on 127.0.0.1 (Testing/local_hub.py, the hub's file protocol) with the real
huggingface_hub client: a whole checkpoint, a download whose connection drops once mid-shard (resumed in the same
run with a Range request), and a download cancelled mid-shard (SIGTERM, as the panel's Cancel) then run again.

    .venv/bin/python bench/bench_download.py [--model CHECKPOINT_FOLDER]   (default: a tiny checkpoint made here)

Times are wall times of the whole command (process start, hub listing, every file, checksums). Prints one JSON
object. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "Testing"))

from local_hub import LocalHub  # noqa: E402

REPO_ID = "jdh-algo/Citrus-V-8B-v1.0"


def environment(hub: LocalHub, home: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    return env | {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home / "hf-home"),
                  "HF_HUB_CACHE": str(home / "cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}


def command() -> list[str]:
    return [sys.executable, "-m", "citrusv_backend.cli", "download"]


def timed(hub: LocalHub, home: Path, shard: str) -> dict:
    started = time.monotonic()
    done = subprocess.run(command(), env=environment(hub, home), capture_output=True, text=True)
    seconds = time.monotonic() - started
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["event"] == "downloaded", (last, done.stderr[-1000:])
    shard_gets = [rng or "whole file" for method, path, rng in hub.requests if method == "GET" and path.endswith(shard)]
    return {"seconds": round(seconds, 2), "bytes_total": last["bytes_total"], "rate_MBps": round(last["bytes_total"] / seconds / 1e6, 1),
            "progress_lines": len(done.stdout.splitlines()) - 1, f"GET {shard}": shard_gets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.model:
            folder = Path(args.model)
        else:
            from citrusv_backend.model.tiny import make_tiny_checkpoint

            folder = make_tiny_checkpoint(scratch / "tiny")
        shard = sorted(name for name in LocalHub.from_folder(REPO_ID, folder).files if name.endswith(".safetensors"))[0]
        results = {}

        hub = LocalHub.from_folder(REPO_ID, folder).start()
        results["whole"] = timed(hub, scratch / "whole", shard)
        hub.stop()

        hub = LocalHub.from_folder(REPO_ID, folder)
        hub.cut_once = {shard}
        hub.start()
        results["connection_dropped_once"] = timed(hub, scratch / "dropped", shard)
        hub.stop()

        hub = LocalHub.from_folder(REPO_ID, folder)
        hub.stall_once = {shard}
        hub.start()
        home = scratch / "cancelled"
        process = subprocess.Popen(command(), env=environment(hub, home), stdout=subprocess.PIPE, text=True,
                                   stderr=subprocess.DEVNULL)
        parts = home / "cache" / "models--jdh-algo--Citrus-V-8B-v1.0" / "blobs"
        while not any(path.name.endswith(".citrusv-part") and path.stat().st_size >= 10 * 1024**2
                      for path in (parts.glob("*") if parts.is_dir() else [])):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stopped = json.loads(process.communicate()[0].splitlines()[-1])
        hub.release.set()
        kept = sum(path.stat().st_size for path in parts.glob("*.citrusv-part"))
        hub.requests.clear()
        results["cancelled_then_run_again"] = {"cancel_event": stopped["reason"], "part_kept_bytes": kept,
                                               "second_run": timed(hub, home, shard)}
        hub.stop()
    results["checkpoint"] = str(args.model or "tiny (make_tiny_checkpoint)")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
