"""The Ray engine: one model actor per GPU across a Ray cluster (or N actors on CPUs), fed by this driver.

Each actor loads the model once and runs the very same `CaseProcessor` as the local engine, in a temporary
folder of its own; the case's files come back as bytes and this driver commits them and writes the manifest,
so the output folder only has to exist where the driver runs and the labelmaps are byte for byte those of the
local engine. Inputs are read by the actors from the same path (shared storage: NFS, a mounted bucket), or
with `--ray-ship-inputs` sent through Ray's object store by the driver.

An actor reads its next case in a second thread (concurrency group "io") while the model works on the
current one. Fault tolerance: actors restart (`max_restarts`), and the driver resubmits the cases of a dead
actor to whichever actor is free first, up to MAX_ATTEMPTS times per case.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ray
from ray.exceptions import RayError, RayTaskError

from ..errors import CitrusVError
from .casework import CaseOutcome, CaseTask, load_case, read_case_files, worker_name
from .local import load_processor
from .manifest import sha256_of_input

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3          # runs of one case on actors that died under it, before it is failed
ACTOR_RESTARTS = 4        # restarts of one actor (each reloads the model)
IN_FLIGHT_PER_ACTOR = 2   # one running, one being read ahead
NAMESPACE = "citrusv"


@ray.remote(concurrency_groups={"io": 1, "model": 1})
class CaseActor:
    """A loaded model on one GPU (or CPU slot), running cases for the driver."""

    def __init__(self, model: dict, task: str, options, max_voxels: int):
        self.max_voxels = max_voxels
        self.processor = load_processor(model, model["device"], task, options)
        self.reader = ThreadPoolExecutor(1)
        self.reads: dict = {}
        # Ray does not order calls across concurrency groups: `run` may come before its `prefetch`. A case
        # `run` had to read itself is remembered so the late `prefetch` does not read it a second time.
        self.read_by_run: set = set()
        self.lock = threading.Lock()

    @ray.method(concurrency_group="io")
    def describe(self) -> str:
        return worker_name(self.processor.device)

    @ray.method(concurrency_group="io")
    def prefetch(self, task: CaseTask, shipped: list) -> None:
        """Start reading a case now; `run` picks it up (shipped: [ObjectRef of the input's files] or [])."""
        with self.lock:
            if task.case in self.read_by_run:
                self.read_by_run.discard(task.case)
                return
            self.reads[task.case] = self.reader.submit(self._load, task, shipped)

    @ray.method(concurrency_group="model")
    def run(self, task: CaseTask, shipped: list) -> CaseOutcome:
        started = time.perf_counter()
        with self.lock:
            pending = self.reads.pop(task.case, None)
            if pending is None:
                self.read_by_run.add(task.case)
        with tempfile.TemporaryDirectory(prefix="citrusv-case-") as scratch:
            loaded, scratch_input = pending.result() if pending else self._load(task, shipped)
            waited = time.perf_counter() - started
            outcome = self.processor.process(loaded, Path(scratch) / "out")
            if scratch_input is not None:
                scratch_input.cleanup()
            if outcome.status == "done":
                outcome.file_bytes = read_case_files(Path(scratch) / "out", outcome.files)
        outcome.timings["model_wait_s"] = round(waited, 3)
        return outcome

    def _load(self, task: CaseTask, shipped: list):
        if not shipped:
            return load_case(task, self.max_voxels), None
        scratch = tempfile.TemporaryDirectory(prefix="citrusv-input-")
        path = Path(scratch.name) / Path(task.path).name
        files = ray.get(shipped[0])
        if task.kind == "dicom":
            path.mkdir()
            for name, data in files.items():
                (path / name).write_bytes(data)
        else:
            path.write_bytes(files[path.name])
        return load_case(replace(task, path=str(path)), self.max_voxels), scratch


def input_files(task: CaseTask) -> dict:
    path = Path(task.path)
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return {path.name: path.read_bytes()}


class _Actor:
    def __init__(self, handle, number: int):
        self.handle, self.number = handle, number
        self.in_flight = 0
        self.available = False   # False while starting or restarting
        self.name = f"actor {number}"


class RayEngine:
    name = "ray"

    def __init__(self, model: dict, task: str, options, max_voxels: int, address: str | None, actors: int | None,
                 cpus_per_actor: float, gpus_per_actor: float | None, ship_inputs: bool, workers: int,
                 verbose: bool = False):
        self.model, self.task, self.options, self.max_voxels = model, task, options, max_voxels
        self.address, self.actor_count = address, actors
        self.cpus_per_actor, self.gpus_per_actor = cpus_per_actor, gpus_per_actor
        self.ship_inputs, self.workers, self.verbose = ship_inputs, max(1, workers), verbose
        self.actors: list[_Actor] = []
        self.stats = {"model_wait_s": 0.0, "model_busy_s": 0.0}
        self.describe = "ray"
        self.started_ray = False

    # ------------------------------------------------------------------------------------------ set-up

    def start(self) -> None:
        if not ray.is_initialized():
            self._join_or_start_ray()
        resources = ray.cluster_resources()
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (
            1.0 if resources.get("GPU", 0) >= 1 and self.model["device"] != "cpu" else 0.0)
        count = self.actor_count or (int(resources.get("GPU", 0) // gpus) if gpus else 1)
        if count < 1:
            raise CitrusVError("the Ray cluster has no room for a model actor; check --ray-actors and the resources")
        device = "cpu" if not gpus else "auto"
        model = dict(self.model, device=device)
        options = dict(num_cpus=self.cpus_per_actor, num_gpus=gpus, max_restarts=ACTOR_RESTARTS, max_task_retries=0)
        # Named, so an operator (or a test) can find them: `ray list actors`, ray.get_actor(name, namespace).
        self.actors = [_Actor(CaseActor.options(name=f"citrusv-batch-{os.getpid()}-{n}", **options).remote(
            model, self.task, self.options, self.max_voxels), n) for n in range(count)]
        inputs = "shipped through the object store" if self.ship_inputs else "read from shared storage"
        actors = f"{count} model actor{'s' if count > 1 else ''} ({gpus:g} GPU, {self.cpus_per_actor:g} CPU each)"
        self.describe = f"ray ({ray.get_runtime_context().gcs_address}), {actors}, inputs {inputs}"

    def _join_or_start_ray(self) -> None:
        check_head_reachable(self.address)
        local = {} if self.address else {"include_dashboard": False}
        try:
            ray.init(address=self.address or None, namespace=NAMESPACE, log_to_driver=self.verbose,
                     configure_logging=self.verbose, **local)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise CitrusVError(f"could not join or start Ray ({self.address or 'local'}): {error}") from None
        self.started_ray = True

    def wait_for_actors(self, sink) -> None:
        """Every actor loads the model; one that cannot (wrong path on a node, no memory) stops the batch."""
        sink.say(f"starting {len(self.actors)} model actor(s) on Ray ...")
        for actor in self.actors:
            try:
                actor.name = f"actor {actor.number} ({ray.get(actor.handle.describe.remote())})"
            except RayError as error:
                raise CitrusVError(f"a Ray model actor could not start: {_root_cause(error)}") from None
            actor.available = True
            sink.say(f"  {actor.name} ready")
        sink.model_loaded()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)
        self.actors = []
        if self.started_ray:
            ray.shutdown()

    # ------------------------------------------------------------------------------------------ run

    def run(self, tasks: list[CaseTask], sink) -> None:
        with ThreadPoolExecutor(self.workers) as hashing:
            # Unchanged-looking cases are checksummed here (threads) while the actors load the model.
            checks = {t.case: hashing.submit(sha256_of_input, Path(t.path)) for t in tasks if t.skip_digest}
            self.wait_for_actors(sink)
            self._schedule(deque(tasks), checks, sink)

    def _schedule(self, waiting: deque, checks: dict, sink) -> None:
        running: dict = {}   # ObjectRef -> (task, actor)
        pings: dict = {}     # ObjectRef -> actor coming back after a restart
        while True:
            if sink.cancel_now():
                return  # close() kills the actors; nothing of the running cases is recorded
            if not sink.stop_requested():
                self._submit_ready(waiting, checks, running, sink)
            if not running and (not waiting or sink.stop_requested() or not pings):
                if waiting and not sink.stop_requested():
                    self._fail_all(waiting, sink, "every Ray model actor died")
                return
            ready, _ = ray.wait(list(running) + list(pings), num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in pings:
                    self._actor_back(pings.pop(ref), ref, sink)
                else:
                    task, actor = running.pop(ref)
                    actor.in_flight -= 1
                    self._collect(ref, task, actor, waiting, pings, sink)

    def _submit_ready(self, waiting: deque, checks: dict, running: dict, sink) -> None:
        while waiting:
            actor = min((a for a in self.actors if a.available and a.in_flight < IN_FLIGHT_PER_ACTOR),
                        key=lambda a: a.in_flight, default=None)
            if actor is None:
                return
            task = waiting.popleft()
            if task.skip_digest and self._unchanged(task, checks, sink):
                continue
            shipped = [ray.put(input_files(task))] if self.ship_inputs else []
            actor.handle.prefetch.remote(task, shipped)
            running[actor.handle.run.remote(task, shipped)] = (task, actor)
            actor.in_flight += 1
            sink.stage_reporter(task.case)(f"on {actor.name}", 0.0, "submitted")

    def _unchanged(self, task: CaseTask, checks: dict, sink) -> bool:
        try:
            digest, nbytes = checks.pop(task.case).result()
        except OSError:
            task.skip_digest = None  # unreadable now: the actor records the error
            return False
        if digest == task.skip_digest:
            sink.finished(CaseOutcome(task.case, "skipped", digest, nbytes, worker=worker_name("driver")))
            return True
        task.skip_digest = None
        return False

    def _collect(self, ref, task: CaseTask, actor: _Actor, waiting: deque, pings: dict, sink) -> None:
        try:
            outcome = ray.get(ref)
        except RayTaskError as error:  # a bug outside the per-case error handling: still only this case
            outcome = CaseOutcome(task.case, "failed", error_type="RayTaskError", error=_root_cause(error))
        except RayError as error:  # the actor died, its node died, or Ray killed it for memory
            self._actor_lost(actor, pings, sink, error)
            task.attempts += 1
            if task.attempts >= MAX_ATTEMPTS:
                sink.finished(CaseOutcome(task.case, "failed", error_type="WorkerDied",
                                          error=f"the Ray actor running this case died {task.attempts} times "
                                                f"(out of memory?): {_root_cause(error)}"))
            else:
                sink.say(f"  {task.case}: {actor.name} died; the case goes to the next free actor "
                         f"(attempt {task.attempts + 1} of {MAX_ATTEMPTS})")
                waiting.appendleft(task)
            return
        outcome.attempts = task.attempts + 1
        self.stats["model_wait_s"] += outcome.timings.get("model_wait_s", 0.0)
        self.stats["model_busy_s"] += outcome.timings.get("pipeline_s", 0.0) + outcome.timings.get("write_s", 0.0)
        sink.finished(outcome)

    def _actor_lost(self, actor: _Actor, pings: dict, sink, error) -> None:
        """Stop sending work to it; a ping tells when it is back (restarted) or gone for good."""
        if actor.available:
            actor.available = False
            sink.say(f"{actor.name} died ({_root_cause(error)[:160]}); Ray restarts it")
            pings[actor.handle.describe.remote()] = actor

    def _actor_back(self, actor: _Actor, ref, sink) -> None:
        try:
            actor.name = f"actor {actor.number} ({ray.get(ref)})"
            actor.available = True
            sink.say(f"  {actor.name} is back")
        except RayError as error:
            sink.say(f"{actor.name} is gone for good: {_root_cause(error)[:200]}")

    @staticmethod
    def _fail_all(waiting: deque, sink, reason: str) -> None:
        while waiting:
            sink.finished(CaseOutcome(waiting.popleft().case, "failed", error_type="WorkerDied", error=reason))


def check_head_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Ray retries an unreachable HOST:PORT for minutes; a plain TCP connect says at once that it is wrong."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise CitrusVError(f"cannot reach the Ray head at {address} ({error}); start it with `ray start --head` "
                           f"there, or check --ray-address") from None


def _root_cause(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(error).__name__

