"""Undo and redo of refinement steps: each step is a crop diff of the segment's mask, never a full copy.

A step keeps the bounding box of the voxels it changed (offset and shape in (k, j, i)) with the box's voxels
before and after, bit-packed, and the set of corrected slices (the propagation anchors) before and after. Undo
writes the box back as it was; redo writes it as the step left it. A new step after an undo drops the steps
that could have been redone, as every editor does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class MaskChange:
    offset: tuple[int, int, int]
    shape: tuple[int, int, int]
    before: np.ndarray               # np.packbits of the box's voxels before the step
    after: np.ndarray                # ... and after it
    slices: list[int]                # slice indices (along the slice axis) that changed
    anchors_before: frozenset = frozenset()
    anchors_after: frozenset = frozenset()
    kind: str = "refine"

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.shape))

    def unpack(self, which: str) -> np.ndarray:
        packed = self.before if which == "before" else self.after
        count = int(np.prod(self.shape))
        return np.unpackbits(packed, count=count).astype(bool).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.before.nbytes + self.after.nbytes)


@dataclass
class History:
    """Applied steps (undo pops the last) and undone ones (redo pops the last); `version` counts every change."""

    max_steps: int = 64
    done: list[MaskChange] = field(default_factory=list)
    undone: list[MaskChange] = field(default_factory=list)
    version: int = 0

    def record(self, step: MaskChange) -> None:
        self.done.append(step)
        self.undone.clear()
        del self.done[: max(0, len(self.done) - self.max_steps)]
        self.version += 1

    def take_undo(self) -> MaskChange | None:
        if not self.done:
            return None
        step = self.done.pop()
        self.undone.append(step)
        self.version += 1
        return step

    def take_redo(self) -> MaskChange | None:
        if not self.undone:
            return None
        step = self.undone.pop()
        self.done.append(step)
        self.version += 1
        return step

    @property
    def nbytes(self) -> int:
        return sum(step.nbytes for step in self.done + self.undone)

    def describe(self) -> dict:
        return {"version": self.version, "can_undo": bool(self.done), "can_redo": bool(self.undone),
                "undo_steps": len(self.done), "redo_steps": len(self.undone)}


def changed_box(orientation, shape_kji: tuple[int, int, int], changes: dict[int, np.ndarray]) -> tuple[slice, slice, slice] | None:
    """The (k, j, i) bounding box of the changed pixels of display slices (`changes`: slice -> changed pixels)."""
    low = np.full(3, np.iinfo(np.int64).max)
    high = np.full(3, -1)
    height, width = orientation.plane_shape(shape_kji)
    for index, changed in changes.items():
        rows = np.nonzero(changed.any(axis=1))[0]
        cols = np.nonzero(changed.any(axis=0))[0]
        if rows.size == 0:
            continue
        row_span = (rows[0], rows[-1]) if not orientation.flip_rows else (height - 1 - rows[-1], height - 1 - rows[0])
        col_span = (cols[0], cols[-1]) if not orientation.flip_cols else (width - 1 - cols[-1], width - 1 - cols[0])
        for axis, (a, b) in ((orientation.slice_axis, (index, index)), (orientation.row_axis, row_span),
                             (orientation.col_axis, col_span)):
            low[axis] = min(low[axis], a)
            high[axis] = max(high[axis], b)
    if high[0] < 0:
        return None
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(low, high))
