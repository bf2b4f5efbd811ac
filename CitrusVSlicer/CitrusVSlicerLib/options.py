"""The panel's settings -> a job's options, checked against what the backend accepts (so no 422 reaches the user)."""
from __future__ import annotations

MIN_PIXELS, MAX_PIXELS = 28 * 28, 16384 * 28 * 28   # the backend's bounds of max_pixels (0 here: the task's default)


def task_options(mode: str, window: str, axis: str, slice_range: str = "", max_pixels: int = 0) -> dict:
    options = {"mode": mode, "window": window, "axis": axis}
    if slice_range.strip():
        try:
            first, last = (int(part) for part in slice_range.split(":"))
        except ValueError:
            raise ValueError("Slice range must be FIRST:LAST, e.g. 10:40.") from None
        if not 0 <= first < last:
            raise ValueError("Slice range must be FIRST:LAST with 0 <= FIRST < LAST (LAST is excluded).")
        options["slice_range"] = [first, last]
    if max_pixels:
        if not MIN_PIXELS <= max_pixels <= MAX_PIXELS:
            raise ValueError(f"Max pixels must be 0 (the task's default) or between {MIN_PIXELS:,} and {MAX_PIXELS:,}.")
        options["max_pixels"] = int(max_pixels)
    return options
