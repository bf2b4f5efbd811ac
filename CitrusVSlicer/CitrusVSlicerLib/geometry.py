"""A volume node's voxel geometry as numpy (no Qt): the one place that reads IJK->RAS from MRML, below the writers
and the key-slice and conversation code that all need it."""
from __future__ import annotations

import numpy as np
import vtk


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    """The volume's 4x4 IJK->RAS (its own, without parent transforms)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
