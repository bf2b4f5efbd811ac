"""The module self-test's steps against a running backend, without Qt: CitrusVSlicerTest runs them inside Slicer
(.github/workflows/slicer.yml), and Testing/module/test_refine_panel.py runs them headless with real MRML, so the
steps themselves are tested here before Slicer ever runs them. `logic` is a logic.ModuleLogic (the module's own).
"""
from __future__ import annotations

import time

import numpy as np
import vtk

from .refinement.segment import read_segment

PHANTOM_IJK_TO_RAS = np.array([[-1.5, 0, 0, 40], [0, -1.5, 0, 30], [0, 0, 4, -50], [0, 0, 0, 1]])


class SelfTestFailure(AssertionError):
    pass


def check(condition, message: str) -> None:
    if not condition:
        raise SelfTestFailure(message)


def phantom() -> np.ndarray:
    """A (24, 64, 64) CT-like box in air: what the self-test segments."""
    voxels = np.full((24, 64, 64), -1000, np.int16)
    voxels[8:16, 20:44, 16:40] = 60
    return voxels


def apply_and_check(logic, volume_node, log=print) -> dict:
    """Segment the phantom through the panel's path (upload, job, download, write); check what was written."""
    started = time.monotonic()
    written = logic.process(volume_node, "segment", "segment the liver", {"slice_range": [8, 12], "mode": "per-slice"})
    log(f"CitrusV self-test: Apply took {time.monotonic() - started:.1f} s; longest main-thread step "
        f"{1000 * logic.longestPollSeconds:.1f} ms")
    segmentation = written["segmentation"]
    check(segmentation is not None, "no segmentation was written")
    check(segmentation.GetDisplayNode() is not None, "the segmentation has no display node")
    check(segmentation.GetNodeReference("CitrusVSourceVolume").GetID() == volume_node.GetID(),
          "the segmentation does not reference its volume")
    check(written["table"] is not None, "no findings table was written")
    check("RANDOM WEIGHTS" in written["report"].GetText(), "the report does not warn about random weights")
    return written


def refine_and_undo(logic, target, volume_node, segmentation_node, segment_id: str, log=print,
                    timeout: float = 300.0) -> bool:
    """An exclude point on a voxel of the segment takes it out; Undo gives the segment back exactly. False when the
    segment is empty (nothing to click on)."""
    before = read_segment(segmentation_node, segment_id, volume_node)
    if not before.any():
        log("CitrusV self-test: the segment is empty, refinement step skipped")
        return False
    errors: list[str] = []
    refinement = logic.startRefine(target, volume_node, segmentation_node, segment_id, {}, {"propagate": False},
                                   lambda text, error: errors.append(text) if error else None)
    k, j, i = (int(v) for v in np.argwhere(before)[0])
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    point = ijk_to_ras.MultiplyPoint([i, j, k, 1.0])[:3]
    refinement.exclude.AddControlPointWorld(vtk.vtkVector3d(*point))  # what a click on that voxel places
    logic.pollUntil(lambda: errors or (refinement.can_undo and not refinement.busy), timeout, "the refinement step")
    check(not errors, f"refinement failed: {errors}")
    check(not read_segment(segmentation_node, segment_id, volume_node)[k, j, i], "the excluded voxel stayed")
    refinement.undo()
    logic.pollUntil(lambda: errors or not refinement.busy, timeout, "Undo")
    check(not errors, f"Undo failed: {errors}")
    check(np.array_equal(read_segment(segmentation_node, segment_id, volume_node), before),
          "Undo did not give the segment back exactly")
    logic.stopRefine()
    return True
