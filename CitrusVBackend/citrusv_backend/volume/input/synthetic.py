"""A CT-like test volume for benchmarks: no file, no download, the same voxels for the same seed."""
from __future__ import annotations

import numpy as np

from ..outputs.quantify import VoxelGeometry
from .io import Volume


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0):
    """A CT-like volume: air, a body ellipse of soft tissue, two lungs, a spine, a round lesion."""
    depth, rows, cols = shape
    k, j, i = np.meshgrid(np.arange(depth), np.arange(rows), np.arange(cols), indexing="ij")
    y, x = (j - rows / 2) / (rows / 2), (i - cols / 2) / (cols / 2)
    voxels = np.full(shape, -1000, np.int16)
    voxels[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40
    for side in (-1, 1):
        voxels[((x - side * 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -850
    voxels[(x ** 2 + (y - 0.5) ** 2) < 0.01] = 700
    lesion = ((x - 0.35) ** 2 + (y + 0.1) ** 2) * (cols / 2) ** 2 + ((k - depth / 2) * 2.0) ** 2 < (0.08 * cols) ** 2
    voxels[lesion] = 60
    voxels += np.random.default_rng(seed).normal(0, 15, shape).astype(np.int16)
    return Volume(voxels, VoxelGeometry((0.8, 0.8, 2.0)), f"synthetic_{depth}x{rows}x{cols}")
