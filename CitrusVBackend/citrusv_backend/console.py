"""What the commands tell people: progress lines on stderr (stdout stays machine-readable) and the banner
that marks random-weight output."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .model_source import DEFAULT_MODEL

BANNER_WIDTH = 96


def say(message: str) -> None:
    """Progress for people: stderr, so stdout stays clean for machine-readable output."""
    print(message, file=sys.stderr, flush=True)


def random_weights_banner(checkpoint: Path) -> str:
    line = "!" * BANNER_WIDTH
    return (f"{line}\n!!  RANDOM WEIGHTS — the model in {checkpoint} is a tiny random test model.\n"
            f"!!  Every answer, mask and box below is NOISE. Use it to test the software, never to read images.\n"
            f"!!  Real results need the released weights: --model {DEFAULT_MODEL}\n{line}")


class ProgressPrinter:
    """One line per stage change, then at most one update a second: readable in a terminal and in logs."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.stage = None
        self.last = 0.0

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        if stage != self.stage or now - self.last >= self.interval or fraction >= 1.0:
            say(f"  [{stage}] {fraction * 100:5.1f}%  {message}")
            self.stage, self.last = stage, now
