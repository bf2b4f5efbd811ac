"""Which slices a task looks at and at what pixel budget, shared by the tasks and refinement."""
from __future__ import annotations

from ...model.processor import TASK_PIXEL_BUDGETS, PixelBudget
from ..options import VolumeOptions


def task_budget(task: str, options: VolumeOptions) -> PixelBudget:
    """The Qwen resize bounds of a task's slices: the options' own, else the task's defaults."""
    default = TASK_PIXEL_BUDGETS[task]
    return PixelBudget(options.min_pixels or default.min_pixels, options.max_pixels or default.max_pixels)


def spread(first: int, last: int, count: int) -> list[int]:
    """`count` slice indices spread evenly over [first, last), centred in their bins."""
    count = max(1, min(count, last - first))
    return sorted({first + int((n + 0.5) * (last - first) / count) for n in range(count)})
