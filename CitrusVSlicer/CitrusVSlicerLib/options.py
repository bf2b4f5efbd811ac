"""The panel's settings -> a job's options, checked by the backend's own rules (backend_options.py, generated
from the backend) so no 422 reaches the user."""
from __future__ import annotations

from .backend_options import PIXEL_BUDGET_MAX, PIXEL_BUDGET_MIN, check_pixel_budget, parse_slice_range  # noqa: F401


def task_options(mode: str, window: str, axis: str, slice_range: str = "", max_pixels: int = 0) -> dict:
    """`max_pixels` 0: the task's default."""
    options = {"mode": mode, "window": window, "axis": axis}
    if slice_range.strip():
        try:
            options["slice_range"] = list(parse_slice_range(slice_range.strip()))
        except ValueError as error:
            raise ValueError(f"Slice range: {error}, e.g. 10:40.") from None
    if max_pixels:
        try:
            options["max_pixels"] = check_pixel_budget(int(max_pixels))
        except ValueError as error:
            raise ValueError(f"Max pixels: 0 (the task's default) or {error}.") from None
    return options
