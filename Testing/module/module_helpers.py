"""Helpers shared by the module tests (not fixtures)."""
from __future__ import annotations

import time


def run_until(poll, done, timeout: float = 300.0, step: float = 0.02):
    """Call `poll()` until `done()` (tests drive the module's polling as the panel's timer would)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done after {timeout} s"
        poll()
        time.sleep(step)
