"""Voxels from Slicer's memory into a file, a slice of time at a time, on the main thread.

The file is what the upload sends: for the module's own local backend it is written straight into the server's
private handover folder and the server maps it (no network copy, no second copy in memory); for any other backend
the courier streams it as the raw request body. Writing happens in blocks from the volume node's own array (no copy
of the volume in this process), each `step()` stopping after a short time budget so that the UI keeps running
between steps. Standard library + numpy.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

BLOCK_BYTES = 4 * 1024 * 1024
STEP_BUDGET_S = 0.02


class VolumeFileWriter:
    def __init__(self, voxels: np.ndarray, folder: Path, budget_s: float = STEP_BUDGET_S):
        # Little-endian, C order: a node's scalars already are (no copy on little-endian machines).
        self._array = np.ascontiguousarray(voxels.astype(voxels.dtype.newbyteorder("<"), copy=False))
        self._bytes = memoryview(self._array).cast("B") if self._array.size else memoryview(b"")
        self.total = len(self._bytes)
        self.written = 0
        self.budget_s = budget_s
        self.name = f"volume-{uuid.uuid4().hex}.raw"
        self.path = Path(folder) / self.name
        self._descriptor: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                               getattr(os, "O_BINARY", 0), 0o600)

    @property
    def done(self) -> bool:
        return self.written >= self.total and self._descriptor is None

    @property
    def fraction(self) -> float:
        return self.written / self.total if self.total else 1.0

    def step(self) -> bool:
        """Write for at most the time budget; True once the whole file is written and closed."""
        if self._descriptor is None:
            return True
        started = time.perf_counter()
        while self.written < self.total and time.perf_counter() - started < self.budget_s:
            self.written += os.write(self._descriptor, self._bytes[self.written:self.written + BLOCK_BYTES])
        if self.written >= self.total:
            os.close(self._descriptor)
            self._descriptor = None
            self._bytes.release()
            return True
        return False

    def discard(self) -> None:
        """Stop and remove the file (cancel, failure, or once the upload took it)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        try:
            self.path.unlink()
        except OSError:
            pass
