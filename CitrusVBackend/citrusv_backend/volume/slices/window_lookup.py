"""Windowing integer voxels by table lookup: `window.apply` computed once per possible voxel value.

CT and most MR volumes store 8- or 16-bit integers, so a slice's windowed uint8 image is a function of at
most 65,536 values. The table is built by calling the window's own `apply` on every value of the voxel type
(or of the volume's range, for wider integers), so it equals `apply` for any elementwise mapping — a fixed
window, percentiles computed beforehand, any later normalisation with the same `apply(values)` contract.
`SliceSource` checks that equality on the first slice and falls back to `apply` if a mapping ever looks at
more than one voxel at a time. Floating-point voxels always use `apply`.
"""
from __future__ import annotations

import numpy as np

MAX_RANGE_TABLE = 1 << 20  # wider integer volumes get a table over their own [min, max] when it is this small


class WindowLookup:
    """uint8 display values of integer voxels: table[voxel - offset]."""

    def __init__(self, table: np.ndarray, offset: int, index_dtype):
        self.table = table
        self.offset = offset
        self.index_dtype = index_dtype

    @classmethod
    def for_volume(cls, window, voxels: np.ndarray) -> "WindowLookup | None":
        dtype = voxels.dtype
        if dtype.kind not in "iu":
            return None
        if dtype.itemsize <= 2:  # every value of the type: no pass over the volume needed
            unsigned = np.dtype(f"u{dtype.itemsize}")
            values = np.arange(2 ** (8 * dtype.itemsize), dtype=unsigned).view(dtype)
            return cls(_as_table(window.apply(values)), 0, unsigned)
        low, high = int(voxels.min()), int(voxels.max())
        if high - low >= MAX_RANGE_TABLE:
            return None
        values = np.arange(low, high + 1, dtype=np.int64).astype(dtype)
        return cls(_as_table(window.apply(values)), low, None)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.index_dtype is not None:
            indices = values.view(self.index_dtype)
        else:
            indices = values.astype(np.int64) - self.offset
        return np.take(self.table, indices, mode="clip")


def _as_table(values: np.ndarray) -> np.ndarray:
    table = np.asarray(values)
    if table.dtype != np.uint8 or table.ndim != 1:
        raise TypeError("window.apply must map values elementwise to uint8")
    return table
