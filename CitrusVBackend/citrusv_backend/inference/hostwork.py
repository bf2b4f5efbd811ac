"""Host-side work around the model: measured per stage, and done ahead on worker threads.

`HostStats` counts, per stage, the CPU seconds of host work wherever it ran (a prefetch worker or the model
thread) and the wall seconds the *model thread* spent on it or waiting for it: the critical path, the time
the model could not compute. `Prefetcher` prepares items (slices' model inputs, propagation frames) ahead,
in the order they will be asked for, on a shared thread pool, while the model computes the current ones:
PIL and numpy release the GIL, so the work overlaps. It holds at most `depth` prepared items (no
full-volume copies), drops what it holds on `cancel`, and computes inline when no pool is given.
"""
from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Generic, Hashable, Iterable, TypeVar

T = TypeVar("T")

PREPROCESS = "preprocess"
POSTPROCESS = "postprocess"


def default_workers() -> int:
    """Prefetch threads: one core is the model thread's, the rest (at most 4) prepare slices."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class HostStats:
    """Per phase (key-slice search, propagation, ...) and stage (preprocess, postprocess): host seconds.

    `cpu`: thread CPU time of the work, on whichever thread it ran; `critical`: wall time the model thread spent
    on it or blocked waiting for it. A phase's waiting share is its critical time over its wall time."""

    def __init__(self):
        self.cpu: dict[tuple[str, str], float] = defaultdict(float)
        self.critical: dict[tuple[str, str], float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.slices: dict[str, int] = defaultdict(int)
        self.current = "task"
        self._entered: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str):
        """Work from here on belongs to phase `name`; a phase inside another pauses the outer one's clock."""
        if name == self.current:
            yield
            return
        outer, self.current = self.current, name
        self._entered.add(name)
        started = time.perf_counter()
        self.wall[outer] -= started  # the outer phase's clock stops here ...
        try:
            yield
        finally:
            ended = time.perf_counter()
            self.wall[name] += ended - started
            self.wall[outer] += ended  # ... and runs again from here
            self.current = outer

    def count(self, slices: int = 1) -> None:
        """The current phase handled `slices` more slices (the denominator of the per-slice figures)."""
        self.slices[self.current] += slices

    @contextmanager
    def work(self, stage: str, critical: bool):
        """Host work of `stage`; `critical`: it runs on the model thread (the model waits meanwhile)."""
        key = (self.current, stage)
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            with self._lock:
                self.cpu[key] += cpu
                if critical:
                    self.critical[key] += wall

    def waited(self, stage: str, seconds: float) -> None:
        """The model thread blocked `seconds` for a prefetched item of `stage`."""
        with self._lock:
            self.critical[(self.current, stage)] += seconds

    def summary(self) -> dict:
        """Per phase: slices, wall s, ms per slice per stage (CPU anywhere / on the critical path), waiting share."""
        phases = {}
        for name in sorted({p for p, _ in self.cpu} | {p for p, _ in self.critical} | self._entered):
            per = max(self.slices.get(name, 0), 1)
            stages = sorted({s for p, s in self.cpu if p == name} | {s for p, s in self.critical if p == name})
            cpu = {s: self.cpu.get((name, s), 0.0) for s in stages}
            critical = {s: self.critical.get((name, s), 0.0) for s in stages}
            wall = self.wall.get(name, 0.0) if name in self._entered else 0.0
            entry = {"slices": self.slices.get(name, 0), "wall_s": round(wall, 4),
                     "cpu_ms_per_slice": {s: round(1000 * v / per, 3) for s, v in cpu.items()},
                     "critical_ms_per_slice": {s: round(1000 * v / per, 3) for s, v in critical.items()},
                     "cpu_ms_per_slice_total": round(1000 * sum(cpu.values()) / per, 3),
                     "critical_ms_per_slice_total": round(1000 * sum(critical.values()) / per, 3)}
            if wall > 0:
                entry["model_waiting_share"] = round(sum(critical.values()) / wall, 4)
            phases[name] = entry
        return phases


class Prefetcher(Generic[T]):
    """`prepare(key)` ahead of `get(key)`, in `schedule` order, at most `depth` results held at once."""

    def __init__(self, prepare: Callable[[Hashable], T], pool: ThreadPoolExecutor | None, depth: int = 4,
                 stats: HostStats | None = None, stage: str = PREPROCESS):
        self.prepare = prepare
        self.pool = pool
        self.depth = max(1, depth)
        self.stats = stats
        self.stage = stage
        self._queue: list[Hashable] = []
        self._held: dict[Hashable, Future] = {}
        self._cancelled = threading.Event()

    def _timed_prepare(self, key: Hashable, critical: bool) -> T:
        if self.stats is None:
            return self.prepare(key)
        with self.stats.work(self.stage, critical=critical):
            return self.prepare(key)

    def _in_worker(self, key: Hashable) -> T | None:
        if self._cancelled.is_set():
            return None
        return self._timed_prepare(key, critical=False)

    def _fill(self) -> None:
        while self._queue and len(self._held) < self.depth and self.pool is not None and not self._cancelled.is_set():
            key = self._queue.pop(0)
            if key not in self._held:
                self._held[key] = self.pool.submit(self._in_worker, key)

    def schedule(self, keys: Iterable[Hashable]) -> None:
        """Ask for `keys` to be prepared next (after what is already queued); duplicates are ignored."""
        self._cancelled.clear()
        known = set(self._queue) | set(self._held)
        self._queue += [k for k in dict.fromkeys(keys) if k not in known]
        self._fill()

    def get(self, key: Hashable) -> T:
        """The prepared item: ready, or waited for while a worker prepares it, or prepared here (never
        scheduled, or still queued)."""
        future = self._held.pop(key, None)
        if key in self._queue:
            self._queue.remove(key)
        value = None
        # Not started yet: the model thread would only wait, so it prepares the item itself.
        if future is not None and not future.cancel():
            ready, started = future.done(), time.perf_counter()
            value = future.result()
            if self.stats is not None and not ready:
                self.stats.waited(self.stage, time.perf_counter() - started)
        if value is None:
            value = self._timed_prepare(key, critical=True)
        self._fill()
        return value

    def cancel(self) -> None:
        """Forget everything scheduled; running preparations finish but are dropped."""
        self._cancelled.set()
        self._queue.clear()
        for future in self._held.values():
            future.cancel()
        self._held.clear()


@contextmanager
def worker_pool(workers: int):
    """A thread pool for one task (None for `workers` 0: everything inline); pending work is dropped at exit."""
    if workers <= 0:
        yield None
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="citrusv-prefetch")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
