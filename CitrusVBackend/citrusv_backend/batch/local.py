"""The local engine: the model loaded once per device, volumes read ahead of it by worker processes.

`Prefetcher` keeps a bounded queue of cases being read and checksummed by `--workers` processes (spawned,
so they never inherit torch's threads), in input order, so the model finds the next volume in memory when it
finishes one. The time the model spends waiting for it is measured: that is the fraction the benchmark reports.

One device: the model runs in this process. Several (`--device cuda:0,cuda:1`, or `auto` on a machine with
several GPUs): one model process per device, each fed loaded cases from a shared bounded queue; this process
keeps the manifest. The per-device processes write into the same staging folders as the in-process model.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..errors import CitrusVError
from ..model_source import open_engine
from .casework import (CaseOutcome, CaseProcessor, CaseTask, LoadedCase, describe_failure, load_case,
                       outcome_without_model)

log = logging.getLogger(__name__)

READER_RETRIES = 2  # a reader process that dies twice on the same case fails that case


def _worker_setup(parent: int) -> None:
    """Workers leave Ctrl-C to the main process, which decides when to stop, and end when it is gone
    (even killed by SIGKILL, when nothing else would tell them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class Prefetcher:
    """Yields LoadedCase in task order, read by `workers` processes at most `depth` cases ahead."""

    def __init__(self, tasks: list[CaseTask], workers: int, max_voxels: int, depth: int | None = None):
        self.tasks = deque(tasks)
        self.workers = workers
        self.max_voxels = max_voxels
        self.depth = depth or max(2, 2 * workers)
        self.waited_s = 0.0
        self.pool = None
        self.pending: deque = deque()

    def __enter__(self):
        if self.workers > 0:
            self.pool = self._new_pool()
        return self

    def __exit__(self, kind, error, trace):
        if self.pool is not None:
            # A normal end waits for the (idle) readers: leaving them to interpreter exit races CPython 3.11's
            # executor wake-up pipe ("Bad file descriptor" tracebacks at exit). A stop does not wait for reads.
            self.pool.shutdown(wait=kind is None, cancel_futures=True)

    def _new_pool(self):
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_setup, initargs=(os.getpid(),))

    def start(self):
        """Submit the first reads now, so they overlap the model loading."""
        self._fill()
        return self

    def _fill(self) -> None:
        while self.pool is not None and self.tasks and len(self.pending) < self.depth:
            task = self.tasks.popleft()
            self.pending.append((task, self.pool.submit(load_case, task, self.max_voxels)))

    def __iter__(self):
        while self.pending or self.tasks:
            started = time.perf_counter()
            loaded = self._next()
            self.waited_s += time.perf_counter() - started
            self._fill()
            yield loaded

    def _next(self) -> LoadedCase:
        if self.pool is None:
            return load_case(self.tasks.popleft(), self.max_voxels)
        task, future = self.pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            return self._after_reader_death(task)

    def _after_reader_death(self, task: CaseTask) -> LoadedCase:
        """A reader process died (killed for memory?): new pool, every unfinished read resubmitted."""
        task.attempts += 1
        waiting = [task] + [t for t, _ in self.pending]
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()
        self.pending = deque()
        if task.attempts >= READER_RETRIES:
            waiting.pop(0)
            self.tasks.extendleft(reversed(waiting))
            self._fill()
            return LoadedCase(task, error_type="ReaderDied",
                              error="the process reading this input died twice (out of memory?)")
        self.tasks.extendleft(reversed(waiting))
        self._fill()
        return self._next()


def device_list(device: str) -> list[str]:
    """`cuda:0,cuda:1` -> both; `auto` -> every visible GPU, else the CPU; anything else as given."""
    devices = [d.strip() for d in device.split(",") if d.strip()]
    if devices != ["auto"]:
        return devices or ["auto"]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{n}" for n in range(count)] if count > 1 else ["auto"]


def load_processor(model: dict, device: str, task: str, options) -> CaseProcessor:
    from .. import __version__

    engine = open_engine(model["model"], device, model["dtype"], model["attention"])
    return CaseProcessor(engine, task, options, extra={"model": engine.loaded.describe(), "version": __version__})


class LocalEngine:
    name = "local"

    def __init__(self, model: dict, task: str, options, workers: int, max_voxels: int):
        self.model, self.task, self.options = model, task, options
        self.workers, self.max_voxels = workers, max_voxels
        self.devices = device_list(model["device"])
        self.stats = {"model_wait_s": 0.0, "model_busy_s": 0.0}
        models = f"{len(self.devices)} model{'s' if len(self.devices) > 1 else ''} ({', '.join(self.devices)})"
        self.describe = f"local, {models}, {workers} I/O worker{'s' if workers != 1 else ''}"

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, tasks: list[CaseTask], sink) -> None:
        with Prefetcher(tasks, self.workers, self.max_voxels) as prefetcher:
            prefetcher.start()
            if len(self.devices) == 1:
                self._run_in_process(prefetcher, sink)
            else:
                self._run_device_processes(prefetcher, sink)

    # ------------------------------------------------------------------------------------------ one device

    def _run_in_process(self, prefetcher: Prefetcher, sink) -> None:
        from ..errors import JobCancelled

        processor = None  # loaded when the first case needs it: a rerun of a finished folder loads nothing
        for loaded in prefetcher:
            if sink.stop_requested():
                break
            outcome = outcome_without_model(loaded)
            if outcome is None:
                if processor is None:
                    processor = self._load_in_process(sink)
                    prefetcher.waited_s = 0.0  # waiting during the model load is not the model waiting
                started = time.perf_counter()
                try:
                    outcome = processor.process(loaded, sink.staging_dir(loaded.task.case),
                                                progress=sink.stage_reporter(loaded.task.case),
                                                should_cancel=sink.cancel_now)
                except JobCancelled:
                    sink.cancelled(loaded.task.case)
                    break
                self.stats["model_busy_s"] += time.perf_counter() - started
            sink.finished(outcome)
        self.stats["model_wait_s"] = prefetcher.waited_s

    def _load_in_process(self, sink) -> CaseProcessor:
        sink.say(f"loading model {self.model['model']} on {self.devices[0]} ...")
        with sink.interruptible():  # nothing to finish yet: a stop signal ends the load at once
            processor = load_processor(self.model, self.devices[0], self.task, self.options)
        sink.model_loaded(processor.engine.loaded)
        return processor

    # ------------------------------------------------------------------------------------------ a process per device

    def _run_device_processes(self, prefetcher: Prefetcher, sink) -> None:
        self.load_errors, self.ready = [], False
        context = multiprocessing.get_context("spawn")
        inbox, outbox, cancel = context.Queue(maxsize=len(self.devices)), context.Queue(), context.Event()
        processes = [context.Process(target=device_worker, daemon=True, name=f"model-{number}-{device}",
                                     args=(self.model, device, self.task, self.options, inbox, outbox, cancel,
                                           os.getpid()))
                     for number, device in enumerate(self.devices)]
        for process in processes:
            process.start()
        collector = threading.Thread(target=self._collect, args=(outbox, processes, sink, cancel), daemon=True)
        collector.start()
        try:
            for loaded in prefetcher:
                if sink.stop_requested() or not collector.is_alive():
                    break
                outcome = outcome_without_model(loaded)
                if outcome is not None:
                    sink.finished(outcome)
                    continue
                while not sink.stop_requested() and collector.is_alive():
                    try:
                        inbox.put((loaded, sink.staging_dir(loaded.task.case)), timeout=0.5)
                        break
                    except queue.Full:
                        continue
        finally:
            for _ in processes:
                _put_until_collector_ends(inbox, None, collector)
            collector.join()
            for process in processes:
                process.join(timeout=10)
        if len(self.load_errors) == len(processes):
            raise CitrusVError(f"no model process could load the model: {self.load_errors[0]}")

    def _collect(self, outbox, processes, sink, cancel) -> None:
        """Results of the model processes, until every one has exited (or died: its case is failed)."""
        running = {p.name: None for p in processes}  # process name -> case it works on
        reporters = {}
        while running:
            if sink.cancel_now():
                cancel.set()
            try:
                message = outbox.get(timeout=0.5)
            except queue.Empty:
                for process in processes:
                    if process.name in running and not process.is_alive():
                        self._process_died(process, running.pop(process.name), sink)
                continue
            kind, name, payload = message
            if kind == "start":
                running[name] = payload
                reporters[payload] = sink.stage_reporter(payload)
            elif kind == "stage":
                reporters.get(payload[0], lambda *a: None)(*payload[1:])
            elif kind == "outcome":
                running[name] = None
                self.stats["model_busy_s"] += payload.timings.get("pipeline_s", 0) + payload.timings.get("write_s", 0)
                self.stats["model_wait_s"] += payload.timings.pop("model_wait_s", 0.0)
                sink.finished(payload)
            elif kind == "loaded":
                sink.say(f"  model process {name}: {payload}")
                if not self.ready:
                    self.ready = True
                    sink.model_loaded()
            elif kind == "load_failed":
                self.load_errors.append(payload)
                sink.say(f"model process {name} could not load the model: {payload}")
            elif kind == "cancelled":
                sink.cancelled(payload)
            elif kind == "exit":
                running.pop(name, None)

    @staticmethod
    def _process_died(process, case: str | None, sink) -> None:
        sink.say(f"model process {process.name} died (exit code {process.exitcode})")
        if case is not None:
            sink.finished(CaseOutcome(case, "failed", error_type="WorkerDied",
                                      error=f"the model process on {process.name} died while running this case "
                                            f"(exit code {process.exitcode}; out of memory?)"))


def _put_until_collector_ends(inbox, item, collector) -> None:
    while collector.is_alive():
        try:
            inbox.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def device_worker(model: dict, device: str, task: str, options, inbox, outbox, cancel, parent: int) -> None:
    """A model process: load once, then run cases from `inbox` until a None arrives."""
    from ..errors import JobCancelled

    _worker_setup(parent)
    name = multiprocessing.current_process().name
    try:
        try:
            processor = load_processor(model, device, task, options)
        except Exception as error:
            outbox.put(("load_failed", name, describe_failure(error)[1]))
            return
        info = processor.engine.loaded.describe()
        outbox.put(("loaded", name, f"loaded in {info['load_seconds']:.1f} s on {info['device']} ({info['dtype']})"))
        while True:
            idle = time.perf_counter()
            item = inbox.get()
            if item is None:
                break
            waited = time.perf_counter() - idle
            loaded, staging = item
            case = loaded.task.case
            outbox.put(("start", name, case))
            progress = _ThrottledStage(outbox, name, case)
            try:
                outcome = processor.process(loaded, Path(staging), progress=progress, should_cancel=cancel.is_set)
            except JobCancelled:
                outbox.put(("cancelled", name, case))
                continue
            outcome.timings["model_wait_s"] = round(waited, 3)
            outbox.put(("outcome", name, outcome))
    finally:
        outbox.put(("exit", name, None))


class _ThrottledStage:
    """Stage messages from a model process, at most one a second per case (plus stage changes)."""

    def __init__(self, outbox, name: str, case: str):
        self.outbox, self.name, self.case = outbox, name, case
        self.stage, self.last = None, 0.0

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        if stage != self.stage or now - self.last >= 1.0:
            self.outbox.put(("stage", self.name, (self.case, stage, fraction, message)))
            self.stage, self.last = stage, now
