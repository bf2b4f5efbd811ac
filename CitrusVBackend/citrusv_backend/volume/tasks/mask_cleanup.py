"""Cleaning a segment's mask: holes filled slice by slice, optionally only the largest 3D component kept."""
from __future__ import annotations

import numpy as np


def fill_holes(plane: np.ndarray) -> np.ndarray:
    """`ndimage.binary_fill_holes` of a 2D mask, computed on its bounding box plus a one-pixel border.

    Exact: a hole is background not connected to the image border; outside the box everything is background
    connected to the border (the border ring around the box among it), so nothing outside changes and the
    box, padded with that ring, has the same holes."""
    from scipy import ndimage

    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return plane.copy()
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    filled = plane.copy()
    filled[top:bottom, left:right] = ndimage.binary_fill_holes(np.pad(plane[top:bottom, left:right], 1))[1:-1, 1:-1]
    return filled


def postprocess(mask: np.ndarray, slice_axis: int, options) -> np.ndarray:
    """A target's 3D mask after its slices: holes filled per slice (`options.fill_holes`), the largest 3D
    component kept (`options.largest_component`)."""
    from scipy import ndimage

    if options.fill_holes and mask.any():
        mask = mask.copy()
        for index in np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != slice_axis)))[0]:
            plane = [slice(None)] * 3
            plane[slice_axis] = index
            mask[tuple(plane)] = fill_holes(mask[tuple(plane)])
    if options.largest_component and mask.any():
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = ndimage.sum_labels(mask, components, index=range(1, count + 1))
            mask = components == (int(np.argmax(sizes)) + 1)
    return mask
