"""Stop signals for the long-running commands (`batch`, `serve`): exit codes and signal-safe handlers.

A Python signal handler runs in the main thread between two bytecodes of whatever it interrupted — including
another signal handler, when two signals arrive microseconds apart. So a handler here never takes a lock
(`threading.Event.set` does, and deadlocks when it interrupts itself), never prints (a nested write to the
same buffered stream raises) and never allocates much: it sets plain attributes, writes one byte to a pipe
that a watcher thread reads, or raises. Printing and waking happen outside, on that thread.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
SIGNAL_EXIT = {number: 128 + int(number) for number in STOP_SIGNALS}  # 130 SIGINT, 143 SIGTERM, 129 SIGHUP


class SignalExit(BaseException):
    """Raised by `exit_on_signals` in the main thread. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way (a model loader's fallbacks) swallows it."""

    def __init__(self, number: int):
        super().__init__(f"stopped by signal {signal.Signals(number).name}")
        self.number = number
        self.code = SIGNAL_EXIT.get(number, 128 + int(number))


@contextmanager
def exit_on_signals(signals=STOP_SIGNALS):
    """While the block runs (work with nothing to finish cleanly: loading, planning), a stop signal raises
    SignalExit in the main thread, so `finally` blocks run and the command exits 128 + the signal's number.
    Only the first one raises: a second signal (a Ctrl-C then a SIGTERM) must not break into the clean-up that
    the first one started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def stop(number, _frame) -> None:
        if not raised:
            raised.append(number)
            raise SignalExit(number)

    previous = {number: signal.signal(number, stop) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class SignalPipe:
    """The self-pipe pattern: `notify(byte)` may be called from a signal handler (one non-blocking write, no
    lock); a watcher thread calls `on_byte(byte)` for each byte, outside any handler. `close` stops the
    watcher after it has handled every byte written before."""

    def __init__(self, on_byte: Callable[[int], None]):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._on_byte = on_byte
        self._thread = threading.Thread(target=self._watch, name="signal-watcher", daemon=True)
        self._thread.start()

    def notify(self, byte: int) -> None:
        try:
            os.write(self._write, bytes([byte]))
        except OSError:  # the pipe is full (thousands of signals) or closed: the flags already say it all
            pass

    def close(self, timeout: float = 5.0) -> None:
        descriptor, self._write = self._write, -1  # first, so a late handler writes nowhere (not to a reused fd)
        if descriptor >= 0:
            os.close(descriptor)
        self._thread.join(timeout)

    def _watch(self) -> None:
        try:
            while data := os.read(self._read, 64):
                for byte in data:
                    try:
                        self._on_byte(byte)
                    except Exception:  # a closed stderr: nothing more to tell
                        pass
        finally:
            os.close(self._read)
