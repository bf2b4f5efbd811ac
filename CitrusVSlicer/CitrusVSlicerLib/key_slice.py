"""Where a segment's key slice is: its index along the run's slice axis -> a position in the volume, and the segment tags
that carry a segment's evidence (answer, key slice, score) in the scene.

The backend counts an axis' slices along the voxel axis closest to that axis' patient axis (S for axial, A for
coronal, R for sagittal; a greedy assignment on the largest direction cosines, as its orientation.dominant_axes does),
in the array's own order, never flipped. `slice_axis_ijk` and `key_slice_position` are numpy only (no MRML, no Qt);
the panel's "Jump to key slice" button hands the position to `jump_to_key_slice`.
"""
from __future__ import annotations

import numpy as np

from .geometry import ijk_to_ras_matrix

PATIENT_AXIS_OF = {"sagittal": 0, "coronal": 1, "axial": 2}    # R/L, A/P, S/I
ANSWER_TAG, KEY_SLICE_TAG, SCORE_TAG, AXIS_TAG = "CitrusV.Answer", "CitrusV.KeySlice", "CitrusV.Score", "CitrusV.Axis"
# Segments made before the slice axis had one name everywhere (issue 20) carry it under this tag; still read.
LEGACY_AXIS_TAG = "CitrusV.Plane"
DELIVERED_TAG = "CitrusV.DeliveredMask"  # the digest of the mask as the backend delivered it (results.mask_digest)


def slice_axis_ijk(ijk_to_ras: np.ndarray, axis: str) -> int:
    """The voxel axis (0 = i, 1 = j, 2 = k) that slice axis `axis`'s slices are counted along."""
    if axis not in PATIENT_AXIS_OF:
        raise ValueError(f"unknown slice axis {axis!r}; use one of {', '.join(PATIENT_AXIS_OF)}")
    axes = np.asarray(ijk_to_ras, float)[:3, :3]
    cosines = np.abs(axes / np.linalg.norm(axes, axis=0))          # [patient axis, voxel axis]
    assigned: list[int | None] = [None, None, None]                 # voxel axis -> patient axis
    for flat in np.argsort(-cosines, axis=None, kind="stable"):
        patient, voxel = divmod(int(flat), 3)
        if assigned[voxel] is None and patient not in assigned:
            assigned[voxel] = patient
    return assigned.index(PATIENT_AXIS_OF[axis])


def key_slice_position(ijk_to_ras: np.ndarray, shape_kji, axis: str, index: int, center_ijk=None) -> np.ndarray:
    """The RAS point on slice `index` along `axis` (at `center_ijk` in-plane, else the volume's centre)."""
    voxel_axis = slice_axis_ijk(ijk_to_ras, axis)
    depth = int(shape_kji[2 - voxel_axis])
    if not 0 <= int(index) < depth:
        raise ValueError(f"key slice {index} is outside the volume's 0..{depth - 1} along the {axis} axis")
    ijk = (np.array(shape_kji[::-1], float) - 1) / 2 if center_ijk is None else np.array(center_ijk, float)
    ijk[voxel_axis] = int(index)
    return (np.asarray(ijk_to_ras, float) @ np.r_[ijk, 1.0])[:3]


# ---------------------------------------------------------------------------------------------- segments (MRML)

def tag_evidence(segment, mask, axis: str) -> None:
    """Keep a delivered segment's answer, key slice, score and slice axis (and its delivered voxels' digest) on it."""
    segment.SetTag(ANSWER_TAG, mask.answer or "")
    segment.SetTag(KEY_SLICE_TAG, "" if mask.key_slice is None else str(int(mask.key_slice)))
    segment.SetTag(SCORE_TAG, "" if mask.score is None else f"{mask.score:.6g}")
    segment.SetTag(AXIS_TAG, axis)
    segment.SetTag(DELIVERED_TAG, mask.digest())


def segment_evidence(segment) -> dict:
    """What tag_evidence kept: {"answer", "key_slice" (int or None), "score" (float or None), "axis"}."""
    from .refinement.segment import segment_tag

    key, score = segment_tag(segment, KEY_SLICE_TAG), segment_tag(segment, SCORE_TAG)
    return {"answer": segment_tag(segment, ANSWER_TAG), "key_slice": int(key) if key else None,
            "score": float(score) if score else None, "axis": segment_tag(segment, AXIS_TAG) or segment_tag(segment, LEGACY_AXIS_TAG) or "axial"}


def jump_to_key_slice(scene, volume_node, segmentation_node, segment_id: str) -> np.ndarray:
    """Move every slice view to the segment's key slice, centred on the segment; the world position. ValueError
    (in words) when the segment has no key slice."""
    import slicer

    from .refinement.segment import node_to_world, read_segment

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    evidence = segment_evidence(segment)
    if evidence["key_slice"] is None:
        raise ValueError(f"segment {segment.GetName()!r} has no key slice (it was not made by a CitrusV run)")
    mask = read_segment(segmentation_node, segment_id, volume_node)
    center = np.argwhere(mask).mean(axis=0)[::-1] if mask.any() else None       # (i, j, k)
    ras = key_slice_position(ijk_to_ras_matrix(volume_node), mask.shape, evidence["axis"], evidence["key_slice"],
                             center)
    world = node_to_world(volume_node, [ras])[0]
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *world, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return world
