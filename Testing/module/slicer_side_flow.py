"""Install + Start + Apply + result download, run by the Slicer-layout interpreter in Slicer's launcher environment.

Started by test_slicer_runtime.py as `bin/python-real slicer_side_flow.py ARGS_JSON` with the launcher's variables
(never by the test runner's own Python). It drives the module's library exactly as the panel does (polling, no
waiting inside the library), then prints one JSON line ("CITRUSV-RESULT {...}") with what it saw, including what
the backend process really loaded (/proc/PID/maps) and its environment (/proc/PID/environ).
"""
import json
import os
import sys
import time
from pathlib import Path

arguments = json.loads(sys.argv[1])
sys.executable = arguments["python_slicer"]  # as qSlicerCoreApplication sets it: the PythonSlicer launcher
sys.path.insert(0, arguments["module_dir"])

import numpy as np  # noqa: E402  (Slicer's numpy, from the layout's site-packages)

from CitrusVSlicerLib.first_use import FirstUse  # noqa: E402
from CitrusVSlicerLib.manager import BackendManager  # noqa: E402
from CitrusVSlicerLib.runner import ApplyRunner  # noqa: E402
from CitrusVSlicerLib.upload import VolumeUpload  # noqa: E402
from CitrusVSlicerLib.settings import MemoryStore  # noqa: E402


def poll_until(manager, done, timeout, what):
    deadline = time.monotonic() + timeout
    while not done():
        manager.poll()
        for line in manager.drain_logs():
            print(line, flush=True)
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not done within {timeout} s")
        time.sleep(0.05)
    for line in manager.drain_logs():
        print(line, flush=True)


def mapped_files(pid: int) -> set:
    files = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            files.add(parts[5].strip())
    return files


def main() -> None:
    report = {"python": sys.version.split()[0], "prefix": sys.prefix, "messages": [], "timeline": {}}
    manager = BackendManager(arguments["module_dir"], env_dir=arguments["env_dir"], log_dir=arguments["log_dir"],
                             work_dir=arguments["work_dir"])
    first_use = FirstUse(manager, MemoryStore())
    say = report["messages"].append          # what the panel's status line says, step by step
    check = first_use.preflight(None, None, arguments["model"])   # the tiny model's own need, from its folder
    say(check.device_summary())
    plan = manager.install_plan(None, arguments.get("base_python"))
    if arguments.get("python_version"):
        plan.python_version = arguments["python_version"]
    run = manager.start_install(plan)
    started = time.monotonic()
    poll_until(manager, lambda: not run.is_running(), 1500, "install")
    report.update(install_state=run.state, install_s=round(time.monotonic() - started, 1), base_python=run.base_python,
                  install_log_tail=run.lines[-15:])
    report["timeline"]["install_s"] = report["install_s"]
    if run.state != "done":
        print("CITRUSV-RESULT " + json.dumps(report), flush=True)
        return
    say("Backend installed. Press Start.")
    sample = first_use.sample_volume()        # Load sample CT: shipped by the environment just installed
    report["sample_volume"] = str(sample) if sample else None
    model = arguments["model"]
    if arguments.get("hub_model"):
        # The weights as their own step, from a hub on 127.0.0.1 (HF_ENDPOINT) into the weights folder.
        model = arguments["hub_model"]
        manager.extra_env.update(HF_ENDPOINT=arguments["hub_url"], HF_HUB_OFFLINE="0")
        first_use.settings.weights_folder = arguments["weights_folder"]
        step = first_use.next_step(model)
        say(step.message)
        report["start_step_before_download"] = step.action
        started = time.monotonic()
        download = first_use.start_download(model)
        progress = []

        def downloaded() -> bool:
            if download.progress is not None:
                text = download.status_text()
                if not progress or progress[-1] != text:
                    progress.append(text)
            return not download.is_running()

        poll_until(manager, downloaded, 600, "download")
        report["timeline"]["download_s"] = round(time.monotonic() - started, 2)
        report.update(download_state=download.state, download_progress=progress[:2] + progress[-3:],
                      download_path=download.path, download_log_tail=list(download.lines)[-10:])
        moving = [line for line in progress if line.startswith("Downloading") and "(100%)" not in line]
        say(moving[len(moving) // 2] if moving else progress[0] if progress else "(no progress line)")
        say(download.status_text())
        model = first_use.download_finished() or model
        report["start_step_after_download"] = first_use.next_step(model).action
    started = time.monotonic()
    process = manager.start_local(model, "cpu")
    say(f"Starting the backend with {model} (loading the model can take a minute)...")
    poll_until(manager, lambda: manager.state in ("running", "crashed", "exited"), 600, "start")
    report["timeline"]["start_s"] = round(time.monotonic() - started, 2)
    report["backend_state"] = manager.state
    say("Backend ready." if manager.state == "running" else str(manager.failure))
    if manager.state != "running":
        report["backend_log_tail"] = list(process.lines)[-30:]
        print("CITRUSV-RESULT " + json.dumps(report), flush=True)
        return
    maps = mapped_files(process.pid)
    slicer_home = os.environ["SLICER_HOME"]
    report["backend_files_from_slicer"] = sorted(f for f in maps if f.startswith(slicer_home + "/lib/Python") or
                                                 f.startswith(slicer_home + "/bin"))
    report["backend_numpy"] = sorted(f for f in maps if "numpy" in f and f.endswith(".so"))[:1]
    report["backend_torch"] = sorted(f for f in maps if "libtorch_python" in f)[:1]
    environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    report["backend_launcher_variables"] = sorted(
        entry.split(b"=", 1)[0].decode() for entry in environ
        if entry.split(b"=", 1)[0] in (b"PYTHONHOME", b"PYTHONPATH", b"PYTHONNOUSERSITE", b"PIP_REQUIRE_VIRTUALENV",
                                      b"SLICER_HOME", b"QT_PLUGIN_PATH", b"LibraryPaths")
        or (entry.startswith(b"LD_LIBRARY_PATH=") and slicer_home.encode() in entry)
        or (entry.startswith(b"SSL_CERT_FILE=") and slicer_home.encode() in entry))

    voxels = np.full((16, 48, 40), -1000, np.int16)
    voxels[4:12, 10:38, 8:30] = 50
    angle = np.radians(12.0)  # an oblique grid, flipped in-plane axes as in LPS files
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) \
        @ np.diag([-1.2, -1.2, 3.0])
    ijk_to_ras[:3, 3] = [30, 20, -40]
    runner = ApplyRunner(VolumeUpload(manager.transport, manager.local_target(), voxels, ijk_to_ras, "phantom"),
                         "segment", "segment the liver", {"mode": "per-slice", "slice_range": [5, 8]})
    runner.start()
    started = time.monotonic()
    events = []
    while runner.active and time.monotonic() - started < 600:
        manager.poll()
        delay = runner.poll()
        events.extend(runner.events())
        time.sleep(min(delay, 0.05))
    events.extend(runner.events())
    final = events[-1] if events else None
    report["timeline"]["first_apply_s"] = round(time.monotonic() - started, 2)
    if final is not None and final.kind == "done":
        say(f"Done: {len(final.result.segments)} segment(s), {len(final.result.findings)} finding(s)."
            + (" RANDOM TEST WEIGHTS: results are noise." if final.result.random_weights else ""))
    else:
        say(final.message if final else "(no result)")
    report.update(apply_state=runner.state, apply_s=round(time.monotonic() - started, 2),
                  apply_message=final.message if final else "", used_handover=bool(manager.local_target().handover_dir),
                  stages=sorted({e.stage for e in events if e.kind == "progress"}))
    if final is not None and final.kind == "done":
        result = final.result
        report.update(segments=[(s.name, list(s.offset_kji), list(s.crop.shape), int(s.crop.sum())) for s in result.segments],
                      findings=len(result.findings), random_weights=result.random_weights)
    courier = manager.transport.courier
    report["courier_python"] = os.path.realpath(f"/proc/{courier.pid}/exe") if courier else None
    pid = process.pid
    manager.shutdown()
    report["backend_gone"] = not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    print("CITRUSV-RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
