"""The rules of option values, each written once, and argparse types for the options no dataclass declares.

A bad value is a usage error (exit 2) naming the option, before anything is read, loaded or run; the same
rule answers the service's requests with a 422 (option_fields.py derives both). No NaN or infinity gets
through a number option."""
from __future__ import annotations

import argparse
import math

# The bounds of a pixel budget (min_pixels / max_pixels: the size Qwen2.5-VL's resize aims at). It works on
# 28x28 patches: at least one, at most the processor's 16384. (Not the decompression-bomb guard on images
# read from files: inference/images.DECOMPRESSION_BOMB_PIXELS.)
PIXEL_BUDGET_MIN = 28 * 28
PIXEL_BUDGET_MAX = 16384 * 28 * 28


def _number(text: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative")
    return value


def port(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535; 0 picks a free one)")
    return value


def check_pixel_budget(value: int) -> int:
    if not PIXEL_BUDGET_MIN <= value <= PIXEL_BUDGET_MAX:
        raise ValueError(f"{value} pixels: give {PIXEL_BUDGET_MIN} (one 28x28 patch) to {PIXEL_BUDGET_MAX:,}")
    return value


def check_pixel_budget_order(min_pixels: int | None, max_pixels: int | None) -> None:
    if min_pixels and max_pixels and min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not be larger than max_pixels ({max_pixels})")


def window(text: str) -> str:
    """auto/training, clinical, a preset name, or CENTER,WIDTH with finite numbers and a positive width."""
    from .volume.slices.windowing import check_window_spec

    check_window_spec(text)
    return text


def parse_slice_range(text: str) -> tuple[int, int]:
    """FIRST:LAST as the command line and the Slicer panel write a slice range."""
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"{text!r}: use FIRST:LAST (slice indices, LAST excluded)") from None
    return check_slice_range((first, last))


def check_slice_range(value) -> tuple[int, int]:
    """[first, last): slice indices along the slice axis, LAST excluded (whether it fits a volume is checked
    with the volume: VolumeOptions.validate)."""
    first, last = value
    if first < 0 or last <= first:
        raise ValueError(f"slice range {first}:{last}: FIRST:LAST with 0 <= FIRST < LAST (LAST excluded)")
    return int(first), int(last)
