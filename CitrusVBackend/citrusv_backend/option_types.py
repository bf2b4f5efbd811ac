"""argparse types that check every value when it is parsed: a bad one is a usage error (exit 2) naming the
option, before anything is read, loaded or run. No NaN or infinity gets through a number option."""
from __future__ import annotations

import argparse
import math

# Qwen2.5-VL's resize works on 28x28 patches: at least one, at most the processor's 16384.
MIN_IMAGE_PIXELS = 28 * 28
MAX_IMAGE_PIXELS = 16384 * 28 * 28


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


def pixel_count(text: str) -> int:
    value = _number(text, int)
    if not MIN_IMAGE_PIXELS <= value <= MAX_IMAGE_PIXELS:
        raise argparse.ArgumentTypeError(f"{value} pixels: give {MIN_IMAGE_PIXELS} (one 28x28 patch) to "
                                         f"{MAX_IMAGE_PIXELS:,}")
    return value


def window(text: str) -> str:
    """auto/training, clinical, a preset name, or CENTER,WIDTH with finite numbers and a positive width."""
    from .volume.windowing import CLINICAL, CT_PRESETS, TRAINING

    if text in ("auto", "", TRAINING, CLINICAL) or text in CT_PRESETS:
        return text
    parts = text.split(",")
    try:
        center, width = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto ({TRAINING}), {CLINICAL}, one of {', '.join(CT_PRESETS)}, or CENTER,WIDTH") from None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: CENTER and WIDTH must be finite numbers and WIDTH positive")
    return text


def slice_range(text: str) -> str:
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use FIRST:LAST (slice indices, LAST excluded)") from None
    if first < 0 or last <= first:
        raise argparse.ArgumentTypeError(f"{text!r}: FIRST:LAST with 0 <= FIRST < LAST")
    return text
