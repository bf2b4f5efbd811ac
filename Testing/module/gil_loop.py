"""A main loop that holds the GIL the way Slicer's does, for tests and benchmarks of the module's I/O.

In Slicer, Qt's event loop runs in C++ and PythonQt never releases the GIL around it (no PyEval_SaveThread in
Slicer, CTK or PythonQt): between the short Python callbacks that timers and signals run, the main thread sits in
C holding the GIL, so other Python threads cannot run. Here the loop waits for its next timer inside a C function
called through ctypes.PyDLL, which, unlike ctypes.CDLL, keeps the GIL held during the call; Python runs only in
`tick()`, as a QTimer's slot would. `plain=True` waits with time.sleep instead (the GIL released): plain CPython.

Each tick's duration is recorded: while a tick runs, the UI would not repaint or react, so the longest tick is
the longest main-thread stall.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

_LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))   # PyDLL: the GIL stays held inside usleep
_LIBC.usleep.argtypes = [ctypes.c_uint]
EVENT_PROCESSING_S = 0.0005   # what one turn of Qt's loop costs at least (events, painting) before a 0 ms timer fires


def hold_gil_for(seconds: float) -> None:
    _LIBC.usleep(int(seconds * 1e6))


class GilHoldingLoop:
    def __init__(self, plain: bool = False, max_interval_s: float = 0.2):
        self.plain = plain
        self.max_interval_s = max_interval_s
        self.ticks: list[float] = []

    def run(self, tick, done, timeout: float) -> float:
        """Call `tick()` (it returns the seconds until it wants the next call) until `done()`; the wall time.

        A tick's stall is all the time between two waits, not just `tick()` itself: another Python thread that
        takes the GIL for a long C call (base64, JSON, zlib) when the main thread runs Python also freezes the UI."""
        started = last = time.perf_counter()
        while not done():
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"not done after {timeout:.0f} s ({len(self.ticks)} ticks)")
            delay = tick()
            wait = max(EVENT_PROCESSING_S, min(delay if delay is not None else self.max_interval_s, self.max_interval_s))
            before_wait = time.perf_counter()
            self.ticks.append(before_wait - last)
            if self.plain:
                time.sleep(wait)
            else:
                hold_gil_for(wait)
            # The wait ends when usleep does; anything after it (a GIL hand-over at the next bytecode, before even
            # perf_counter could run) belongs to the next tick's stall, so the end is not read from the clock here.
            last = before_wait + wait
        return time.perf_counter() - started

    @property
    def longest_stall_s(self) -> float:
        return max(self.ticks, default=0.0)


def worker_iterations(plain: bool, seconds: float = 1.0, tick_s: float = 0.2) -> int:
    """How far a Python worker thread gets in `seconds` while the loop runs 200 ms timer ticks (the old module's
    design): the fixture's own check that it reproduces PythonQt's starvation."""
    count = [0]
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            count[0] += 1
            time.sleep(0.0005)  # a blocking call (socket read, sleep) that releases and then needs the GIL again

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    end = time.perf_counter() + seconds
    loop = GilHoldingLoop(plain=plain, max_interval_s=tick_s)
    try:
        loop.run(lambda: tick_s, lambda: time.perf_counter() > end, timeout=seconds + 5)
    finally:
        stop.set()
        thread.join(5)
    return count[0]
