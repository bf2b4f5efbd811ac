"""The signal storm: `citrusv batch` hit by bursts of two to eight SIGINT / SIGTERM microseconds apart while a
case is in progress, try after try; every try must end by itself with 130 or 143 and leave a consistent
output folder. Run by test_batch_signals.py (and by hand: `python signal_storm.py CHECKPOINT INPUTS WORK 50`).

Each try is a real `citrusv batch` process: the command line parsed by `citrusv_backend.cli.main`, its signal
handlers, planning, the case loop, cancellation, commit and reports, and a real exit status. What is not
repeated is the start-up: this driver imports everything and loads the tiny model once (with one torch
thread, so the process can fork), then forks one batch per try; the forked batches use that loaded model
instead of reading it from disk again (the only part of the batch replaced). That is what makes 50 tries
cost about a minute instead of five.

Output: one JSON line per try, then a summary line {"summary": {...}}.
"""
from __future__ import annotations

import faulthandler
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

HANG_S = 25.0          # a try that has not ended this long after its signals is a hang
MAX_DELAY_S = 0.8      # signals land this long (at most) after the batch reports its engine
MAX_GAP_S = 20e-6      # at most between two signals of a burst (plus the time os.kill takes)


def batch_argv(inputs: Path, out: Path, checkpoint: Path) -> list[str]:
    return ["batch", str(inputs), "--out", str(out), "--model", str(checkpoint), "--device", "cpu",
            "--workers", "0", "--prompt", "segment the left lung", "--mode", "per-slice", "--slice-range", "15:18",
            "--batch-size", "1"]


def preload(checkpoint: Path):
    import torch

    torch.set_num_threads(1)  # no OpenMP pool before fork: the forked batches may use torch safely
    torch.set_num_interop_threads(1)
    from citrusv_backend import cli
    from citrusv_backend.batch import local

    engine = cli.open_engine(str(checkpoint), "cpu", "auto", "auto")
    for module in (cli, local):  # wherever the batch looks the opener up
        module.open_engine = lambda *args, **kwargs: engine
    return cli


def run_child(cli, argv: list[str], write_fd: int) -> None:
    os.dup2(write_fd, 2)
    os.dup2(write_fd, 1)
    faulthandler.dump_traceback_later(HANG_S + 10, exit=True)  # a hang prints every thread's stack, exits 1
    try:
        code = cli.main(argv)
    except BaseException as error:  # anything escaping main is a failure of the try
        print(f"storm: escaped main: {error!r}", file=sys.stderr)
        code = 99
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def burst(pid: int, rng: random.Random) -> list[tuple[str, float]]:
    """2-8 signals, each 0-20 us after the previous one (busy-waited: sleep is far too coarse)."""
    sent = []
    start = time.perf_counter()
    for number in [rng.choice((signal.SIGINT, signal.SIGTERM)) for _ in range(rng.randint(2, 8))]:
        until = time.perf_counter() + rng.uniform(0, MAX_GAP_S)
        while time.perf_counter() < until:
            pass
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            break
        sent.append((signal.Signals(number).name, round((time.perf_counter() - start) * 1e6, 1)))
    return sent


def one_try(cli, number: int, inputs: Path, work: Path, checkpoint: Path, rng: random.Random) -> dict:
    out = work / f"try-{number:03d}"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        run_child(cli, batch_argv(inputs, out, checkpoint), write_fd)
    os.close(write_fd)
    log = bytearray()
    seen = threading.Event()

    def pump() -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as stream:
            while chunk := stream.read(65536):
                log.extend(chunk)
                if b"engine: " in log:
                    seen.set()
        seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    started = time.monotonic()
    seen.wait(120)
    delay = rng.uniform(0, MAX_DELAY_S)
    time.sleep(delay)
    sent = burst(pid, rng)
    signalled = time.monotonic()
    status = None
    while time.monotonic() - signalled < HANG_S + 15:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    reader.join(5)
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    text = log.decode("utf-8", "replace")
    result = {"try": number, "signals": sent, "delay_s": round(delay, 3), "exit": code,
              "seconds_to_exit": round(time.monotonic() - signalled, 3), "total_s": round(time.monotonic() - started, 2),
              "hang": code is None or "Timeout (0:" in text, "problems": folder_problems(out)}
    if result["hang"] or code not in (130, 143) or result["problems"]:
        result["log_tail"] = text[-4000:]
    return result


def folder_problems(out: Path) -> list[str]:
    """What a stopped batch must never leave: staging folders, torn manifest lines, case folders not done."""
    problems = []
    if (out / ".staging").exists():
        problems.append("a .staging folder was left")
    done = set()
    manifest = out / "manifest.jsonl"
    for line in (manifest.read_text().splitlines() if manifest.is_file() else []):
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"a torn manifest line: {line[:80]!r}")
            continue
        if entry["status"] == "done":
            done.add(entry["case"])
    folders = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")} if out.is_dir() else set()
    if folders != done:
        problems.append(f"case folders {sorted(folders)} but done cases {sorted(done)}")
    return problems


def main(argv: list[str]) -> int:
    checkpoint, inputs, work, tries = Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
    rng = random.Random(int(argv[4]) if len(argv) > 4 else 13)
    cli = preload(checkpoint)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for number in range(tries):
        result = one_try(cli, number, inputs, work, checkpoint, rng)
        results.append(result)
        print(json.dumps(result), flush=True)
    exits = [r["exit"] for r in results]
    summary = {"tries": len(results), "hangs": sum(r["hang"] for r in results),
               "exits": {str(code): exits.count(code) for code in sorted(set(exits), key=str)},
               "bad_exits": sum(code not in (130, 143) for code in exits),
               "folder_problems": sum(bool(r["problems"]) for r in results),
               "signals_per_try_max": max(len(r["signals"]) for r in results),
               "max_seconds_to_exit": max(r["seconds_to_exit"] for r in results)}
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
