"""`citrusv batch`: plan the cases, run them on an engine, commit each case folder, keep the manifest.

Safety rules, in the order a case meets them:
- INPUT_DIR is only read; OUTPUT_DIR may not be inside it (nor it inside OUTPUT_DIR), and every case folder
  is checked to be a direct child of OUTPUT_DIR;
- one run at a time per OUTPUT_DIR (a lock file; the OS drops it when the process dies, even by SIGKILL);
- a case is written into OUTPUT_DIR/.staging/<case>.<pid>/ and renamed to OUTPUT_DIR/<case>/ when complete,
  then its manifest line is appended and fsync'ed: only then is it done;
- the first Ctrl-C stops after the current case, a second one (or SIGTERM, SIGHUP) cancels the current case
  cleanly; a signal while nothing is under way (planning, loading the model) stops at once; however close
  together signals come, a rerun of the same command completes the folder.
Exit codes: 0 every case done, 1 some case failed, 2 a usage error, 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .. import __version__
from ..console import random_weights_banner, say
from ..errors import CitrusVError, DependencyError, InputError
from ..model_source import resolve_model_argument
from ..option_fields import check_fields, from_args
from ..paths import writable_folder
from ..signals import SIGNAL_EXIT, STOP_SIGNALS, SignalExit, SignalPipe
from ..volume.arguments import volume_options
from .casework import CaseOutcome, CaseTask
from .discovery import CaseInput, case_folder, discover_cases
from .manifest import Manifest, model_identity, settings_key
from .options import BatchOptions
from .prompts import combine_prompts, load_prompts_file, prompts_for, unused_keys
from .report import BatchProgress, format_duration, write_index, write_summary

STAGING = ".staging"
LOCK_NAME = ".lock"

# ---------------------------------------------------------------------------------------------- folders

def check_folders(input_dir: str, out_dir: str) -> tuple[Path, Path]:
    try:
        source, target = Path(input_dir).resolve(), Path(out_dir).resolve()
    except (OSError, RuntimeError) as error:  # a link that loops (RuntimeError before Python 3.13)
        raise InputError(f"{input_dir} or --out {out_dir}: cannot be resolved ({error})") from None
    if not source.is_dir():
        raise InputError(f"{input_dir}: not a folder; give the folder that holds the volumes")
    if target == source or target.is_relative_to(source):
        raise InputError(f"--out {out_dir} is inside the input folder {source}; the input folder is never written, "
                         f"choose an output folder outside it")
    if source.is_relative_to(target):
        raise InputError(f"the input folder {source} is inside --out {target}; choose an output folder that does "
                         f"not contain the inputs")
    writable_folder(target)
    return source, target


class OutputLock:
    """One batch per output folder: an exclusive lock the OS releases when the process ends, however it ends."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_NAME
        self.handle = None

    def __enter__(self):
        self.handle = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no fcntl (Windows): run one batch per output folder yourself
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise InputError(f"another citrusv batch ({holder}) is writing to {self.path.parent}; wait for it "
                             f"or choose another --out") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        self.handle.close()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable before the manifest says they happened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------- signals

class StopSignals:
    """The first SIGINT: stop after the current case; a second one, SIGTERM or SIGHUP: cancel it now. Inside
    `interruptible()` (planning, loading the model: nothing to finish) a signal raises SignalExit at once.

    The handler only sets plain attributes, writes one byte to a pipe and may raise (see `citrusv_backend.
    signals`): a second signal can arrive while it runs, and nested, it must neither block nor print. The
    messages are printed by the pipe's watcher thread, once each."""

    MESSAGES = {0: "stopping after the current case (Ctrl-C again to stop at once); rerun the same command to finish",
                1: "stopping now: the current case is cancelled (nothing of it is kept); rerun the same command to "
                   "finish"}

    def __init__(self):
        self.stop = False       # stop after the current case
        self.now = False        # cancel the current case
        self.received = None    # the first signal handled
        self.previous = {}
        self._raise = False
        self._pipe: SignalPipe | None = None
        self._told: set[int] = set()

    def install(self) -> None:
        self._pipe = SignalPipe(self._tell)
        for number in STOP_SIGNALS:
            self.previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
        if self._pipe is not None:
            self._pipe.close()  # after every message of a handled signal is printed
            self._pipe = None

    @contextmanager
    def interruptible(self):
        self._raise = True
        try:
            if self.received is not None:
                raise SignalExit(self.received)
            yield
        finally:
            self._raise = False

    def _handle(self, number, _frame) -> None:
        if self.received is None:
            self.received = number
        now = number != signal.SIGINT or self.stop
        self.stop = True
        if now:
            self.now = True
        pipe = self._pipe
        if pipe is not None:
            pipe.notify(1 if now else 0)
        if self._raise:
            raise SignalExit(self.received)

    def _tell(self, kind: int) -> None:
        if kind not in self._told:
            self._told.add(kind)
            say(self.MESSAGES[kind])


# ---------------------------------------------------------------------------------------------- planning

@dataclasses.dataclass
class Plan:
    cases: list[CaseInput]
    prompts: dict[str, list[str]]       # case -> prompts as given
    tasks: list[CaseTask]
    keys: dict[str, str]                 # case -> settings key
    ignored: int


def plan_cases(args, source: Path, out_dir: Path, options: dict, model: dict, prior: dict[str, dict]) -> Plan:
    cases, ignored = discover_cases(source, args.pattern, args.recursive)
    if not cases:
        raise InputError(f"no volumes in {source} (pattern {args.pattern!r}"
                         f"{'' if args.recursive else '; add --recursive to look into subfolders'})")
    table = load_prompts_file(Path(args.prompts_file)) if args.prompts_file else {}
    for key in unused_keys(table, cases):
        say(f"note: --prompts-file key {key!r} names no case or folder of {source}")
    prompts = {case.case: prompts_for(case, table, args.prompt) for case in cases}
    missing = [case.relative for case in cases if not prompts[case.case] and args.task != "report"]
    if missing:
        raise InputError(f"no prompt for {len(missing)} case(s), e.g. {', '.join(missing[:3])}: give --prompt or "
                         f"add them to --prompts-file")
    tasks, keys = [], {}
    for case in cases:
        prompt = combine_prompts(prompts[case.case], args.task)
        keys[case.case] = settings_key(args.task, prompt, options, model)
        keep = args.resume and is_kept(prior.get(case.case), case, keys[case.case], out_dir)
        tasks.append(CaseTask(case.case, str(case.path), case.relative, case.kind, prompt,
                              skip_digest=prior[case.case]["input_sha256"] if keep else None,
                              dicom_out=args.dicom_out, on_bad_dicom=args.on_bad_dicom))
    return Plan(cases, prompts, tasks, keys, ignored)


def is_kept(entry: dict | None, case: CaseInput, key: str, out_dir: Path) -> bool:
    """A done entry for the same input path and settings whose files are all still there (checksum: later)."""
    if not entry or entry.get("status") != "done" or entry.get("settings_key") != key:
        return False
    outputs = (entry.get("outputs") or {}).values()
    return entry.get("input") == case.relative and bool(outputs) and all((out_dir / p).is_file() for p in outputs)


# ---------------------------------------------------------------------------------------------- the run

class BatchRun:
    """What engines report to: stages, finished cases (committed and recorded here), stop requests.

    Thread-safe: the per-device engine reports from a collector thread."""

    def __init__(self, args, out_dir: Path, plan: Plan, options: dict, model: dict, engine_name: str, prior: dict,
                 signals: StopSignals):
        self.args, self.out_dir, self.plan, self.prior = args, out_dir, plan, prior
        self.options, self.model, self.engine_name = options, model, engine_name
        self.tasks = {task.case: task for task in plan.tasks}
        self.manifest = Manifest(out_dir)
        self.progress = BatchProgress(len(plan.tasks))
        self.signals = signals
        self.lock = threading.Lock()
        self.entries: dict[str, dict] = {}   # case -> this run's entry (or the kept one when skipped)
        self.random_weights = False
        self.checkpoint = None

    # engine callbacks ------------------------------------------------------------------------

    def say(self, message: str) -> None:
        say(message)

    def stop_requested(self) -> bool:
        return self.signals.stop

    def cancel_now(self) -> bool:
        return self.signals.now

    def interruptible(self):
        """A block (loading the model) that a stop signal ends at once, with SignalExit."""
        return self.signals.interruptible()

    def model_loaded(self, loaded=None) -> None:
        """The model is ready (`loaded` when it is in this process): the throughput clock starts now."""
        if loaded is not None:
            info = loaded.describe()
            self.checkpoint = loaded.checkpoint_dir
            say(f"  loaded in {info['load_seconds']:.1f} s on {info['device']} ({info['dtype']}, "
                f"{info['attention']} attention)")
        with self.lock:
            self.progress.restart_clock()

    def stage_reporter(self, case: str):
        def report(stage: str, fraction: float, message: str) -> None:
            with self.lock:
                self.progress.stage(case, stage, fraction, message)
        return report

    def staging_dir(self, case: str) -> Path:
        folder = self.out_dir / STAGING / f"{case}.{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def cancelled(self, case: str) -> None:
        shutil.rmtree(self.out_dir / STAGING / f"{case}.{os.getpid()}", ignore_errors=True)

    def finished(self, outcome: CaseOutcome) -> None:
        with self.lock:
            task = self.tasks[outcome.case]
            if outcome.status == "skipped":
                self.entries[outcome.case] = self.prior[outcome.case]
                self.progress.finished(outcome.case, "skipped", None, None)
                return
            outputs = {}
            if outcome.status == "done":
                try:
                    outputs = self.commit(outcome)
                except (OSError, CitrusVError) as error:
                    outcome.status, outcome.error_type = "failed", "OutputError"
                    outcome.error = f"could not write the results into {self.out_dir}: {error}"
            self.cancelled(outcome.case)  # whatever is left of the staging folder
            entry = self.entry(task, outcome, outputs)
            self.manifest.append(entry)
            self.entries[outcome.case] = entry
            self.random_weights |= outcome.random_weights
            self.progress.finished(outcome.case, outcome.status, entry["timings"]["total_s"], outcome.error)

    # committing ------------------------------------------------------------------------------

    def commit(self, outcome: CaseOutcome) -> dict[str, str]:
        """Staging folder -> OUTPUT_DIR/<case> (replacing an older one); returns the files relative to OUTPUT_DIR."""
        final = case_folder(self.out_dir, outcome.case)
        staging = self.out_dir / STAGING / f"{outcome.case}.{os.getpid()}"
        if outcome.file_bytes is not None:
            staging.mkdir(parents=True, exist_ok=True)
            for name, data in outcome.file_bytes.items():
                (staging / Path(name).name).write_bytes(data)
        for name in outcome.files.values():
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_folder(staging)
        if final.exists():
            old = self.out_dir / STAGING / f"{outcome.case}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_folder(self.out_dir)
        return {kind: f"{outcome.case}/{name}" for kind, name in outcome.files.items()}

    def entry(self, task: CaseTask, outcome: CaseOutcome, outputs: dict) -> dict:
        timings = dict(outcome.timings)
        timings["total_s"] = round(sum(timings.get(k, 0.0) for k in ("read_s", "pipeline_s", "write_s")), 3)
        return {
            "case": task.case, "input": task.relative, "input_path": task.path, "input_kind": task.kind,
            "input_sha256": outcome.digest, "input_bytes": outcome.nbytes, "status": outcome.status,
            "task": self.args.task, "prompts": self.plan.prompts[task.case], "prompt": task.prompt,
            "options": self.options, "settings_key": self.plan.keys[task.case],
            "model": self.model | {"device": self.args.device, "dtype": self.args.dtype},
            "code_version": __version__, "engine": self.engine_name, "worker": outcome.worker,
            "attempts": outcome.attempts, "finished_at": utc_now(), "timings": timings, "outputs": outputs,
            "segments": outcome.segments, "warnings": outcome.warnings,
            "dicom": {kind: path for kind, path in outputs.items() if kind.startswith("dicom_")},
            "boxes": outcome.boxes, "random_weights": outcome.random_weights,
            "error": outcome.error, "error_type": outcome.error_type,
        }

    # reports ---------------------------------------------------------------------------------

    def summary_entries(self) -> list[dict]:
        return [self.entries.get(case.case) or {"case": case.case, "input": case.relative, "status": "not run"}
                for case in self.plan.cases]

    def write_reports(self) -> None:
        entries = self.summary_entries()
        write_summary(self.out_dir, entries)
        write_index(self.out_dir, entries, f"CitrusV batch: {self.args.task} of {Path(self.args.input_dir).resolve()}")


def make_engine(args, model: dict, options):
    if args.engine == "ray":
        try:
            from .ray_engine import RayEngine
        except ImportError:
            raise DependencyError("--engine ray needs Ray: pip install 'citrusv-backend[cluster]'") from None
        return RayEngine(model, args.task, options, args.max_voxels, args.ray_address, args.ray_actors,
                         args.ray_cpus_per_actor, args.ray_gpus_per_actor, args.ray_ship_inputs, args.workers,
                         verbose=args.verbose)
    from .local import LocalEngine

    return LocalEngine(model, args.task, options, args.workers, args.max_voxels)


def validate_arguments(args) -> None:
    """The batch's options as declared (arguments made in code are checked too), and the rule between them."""
    check_fields(from_args(BatchOptions, args))
    if args.engine == "local" and (args.ray_address or args.ray_actors or args.ray_ship_inputs):
        raise InputError("--ray-* options need --engine ray")


def run_batch(args, figures: dict | None = None) -> int:
    """The exit code; `figures`, when given, receives the run's numbers (counts, seconds, model wait) for benchmarks.
    The stop signals are handled from the first moment to the last."""
    signals = StopSignals()
    signals.install()
    try:
        return _run_batch(args, signals, figures)
    except SignalExit as stopped:
        say(f"stopped by {signal.Signals(stopped.number).name} before any case ran; nothing was written; rerun the "
            f"same command to run the batch")
        return stopped.code
    finally:
        signals.restore()


def _run_batch(args, signals: StopSignals, figures: dict | None) -> int:
    validate_arguments(args)
    source, out_dir = check_folders(args.input_dir, args.out)
    options = volume_options(args)
    # What decides the outputs beyond the pipeline's options (and so the resume key): the DICOM settings.
    options_dict = dataclasses.asdict(options) | {"dicom_out": args.dicom_out, "on_bad_dicom": args.on_bad_dicom}
    with OutputLock(out_dir):
        manifest = Manifest(out_dir)
        manifest.repair_tail()
        prior = manifest.latest()
        with signals.interruptible():
            model_name = resolve_model_argument(args.model)
            model = model_identity(model_name)
            plan = plan_cases(args, source, out_dir, options_dict, model, prior)
            engine = make_engine(args, {"model": model_name, "device": args.device, "dtype": args.dtype,
                                        "attention": args.attention}, options)
        shutil.rmtree(out_dir / STAGING, ignore_errors=True)  # left by a killed run; we hold the lock
        run = BatchRun(args, out_dir, plan, options_dict, model, engine.name, prior, signals)
        kept = sum(task.skip_digest is not None for task in plan.tasks)
        say(f"batch: {len(plan.tasks)} case(s) in {source}"
            + (f" ({plan.ignored} other file(s) ignored)" if plan.ignored else "")
            + (f"; {kept} done before with the same settings (kept if their input is unchanged)" if kept else "")
            + f"; results in {out_dir}")
        started = time.monotonic()
        try:
            with signals.interruptible():
                engine.start()
            say(f"engine: {engine.describe}")
            engine.run(plan.tasks, run)
        except SignalExit:
            pass  # stopped while starting or loading: the report below says so and gives the exit code
        finally:
            engine.close()
            shutil.rmtree(out_dir / STAGING, ignore_errors=True)
            run.write_reports()
        if run.random_weights:
            say(random_weights_banner(run.checkpoint or Path(model_name)))
        if figures is not None:
            figures.update(run_figures(run, engine, time.monotonic() - started))
        return final_report(run, engine, out_dir, time.monotonic() - started)


def run_figures(run: BatchRun, engine, seconds: float) -> dict:
    wait, busy = engine.stats["model_wait_s"], engine.stats["model_busy_s"]
    since_ready = time.monotonic() - run.progress.started
    return {"cases": len(run.plan.tasks), **run.progress.counts, "wall_s": round(seconds, 3),
            "model_ready_s": round(since_ready, 3), "model_wait_s": round(wait, 3), "model_busy_s": round(busy, 3),
            "model_wait_fraction": wait / (wait + busy) if busy else None,
            "cases_per_hour": run.progress.processed / since_ready * 3600 if since_ready > 0 else None}


def final_report(run: BatchRun, engine, out_dir: Path, seconds: float) -> int:
    entries = run.summary_entries()
    count = {status: sum(e["status"] == status for e in entries) for status in ("done", "failed", "not run")}
    skipped = run.progress.counts["skipped"]
    say(f"batch finished in {format_duration(seconds)}: {count['done']} done"
        + (f" ({skipped} unchanged, kept)" if skipped else "")
        + f", {count['failed']} failed, {count['not run']} not run")
    wait, busy = engine.stats["model_wait_s"], engine.stats["model_busy_s"]
    if busy > 0:
        say(f"  the model waited for input {100 * wait / (wait + busy):.1f}% of its time "
            f"({wait:.1f} s of {wait + busy:.1f} s)")
    say(f"  results:  {out_dir}/<case>/\n  manifest: {out_dir / 'manifest.jsonl'}\n"
        f"  summary:  {out_dir / 'summary.csv'}\n  overview: {out_dir / 'index.html'}")
    if run.signals.received:
        say(f"stopped by {signal.Signals(run.signals.received).name}: {count['not run']} case(s) not run; rerun the "
            f"same command to finish them")
        return SIGNAL_EXIT[run.signals.received]
    if count["failed"]:
        say(f"{count['failed']} of {len(entries)} case(s) FAILED:")
        for entry in entries:
            if entry["status"] == "failed":
                say(f"  {entry['case']} ({entry['input']}): {entry['error']}")
    if count["not run"]:
        say(f"{count['not run']} case(s) were not run (the engine stopped early, see above); rerun the same command")
    return 1 if count["failed"] or count["not run"] else 0
