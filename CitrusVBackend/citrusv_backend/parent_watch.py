"""Exit when the process that started us goes away: the Slicer module, a crashed Slicer, a killed launcher.

A launcher that wants this (the Slicer module does) gives the child a pipe as stdin, writes nothing to it and keeps
it open. When the launcher exits for any reason, crash included, the operating system closes its end and the child
reads end-of-file: the same signal on Linux, macOS and Windows, and also the launcher's graceful "stop" (it simply
closes the pipe). On POSIX a change of parent process (re-parenting to init or a subreaper) counts too.

The child then stops as on `stop_signal`, delivered to its own handler in the main thread (`citrusv serve`: SIGINT,
so uvicorn shuts down gracefully and the KeyboardInterrupt it re-raises unwinds the clean-up; `citrusv batch`:
SIGTERM, which cancels the current case and keeps every finished one); without a handler, as on Ctrl+C. If it is
still alive `grace_s` later, it exits hard, since nobody is left to stop it.
"""
from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("citrusv")

GRACE_S = 30.0


def watch_parent(stop_signal: int = signal.SIGTERM, grace_s: float = GRACE_S, stdin_fd: int = 0,
                 on_gone=None) -> threading.Thread:
    """Start the watch (daemon threads); `on_gone` defaults to `stop_main_thread(stop_signal)`."""
    fired = threading.Event()
    parent = os.getppid() if os.name != "nt" else None

    def gone(reason: str) -> None:
        if fired.is_set():
            return
        fired.set()
        print(f"[citrusv] {reason}: stopping", file=sys.stderr, flush=True)
        (on_gone or (lambda: stop_main_thread(stop_signal)))()
        time.sleep(grace_s)
        print(f"[citrusv] still running {grace_s:g} s after the parent went away: exiting", file=sys.stderr, flush=True)
        os._exit(3)

    def read_until_eof() -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader's lock makes
        # the interpreter abort at exit ("could not acquire lock for <stdin> at interpreter shutdown").
        try:
            while os.read(stdin_fd, 65536):
                pass  # the launcher never writes; anything it does is ignored
        except OSError:
            pass
        gone("the parent process closed our stdin")

    def poll_parent() -> None:
        while not fired.is_set():
            time.sleep(1.0)
            if os.getppid() != parent:
                gone("the parent process exited")

    reader = threading.Thread(target=read_until_eof, name="citrusv-parent-watch", daemon=True)
    reader.start()
    if parent is not None:
        threading.Thread(target=poll_parent, name="citrusv-parent-poll", daemon=True).start()
    return reader


def stop_main_thread(stop_signal: int = signal.SIGTERM) -> None:
    """Run the main thread's handler of `stop_signal` (uvicorn's, the batch's), or raise KeyboardInterrupt there."""
    if callable(signal.getsignal(stop_signal)):
        _thread.interrupt_main(stop_signal)
    else:
        _thread.interrupt_main()
