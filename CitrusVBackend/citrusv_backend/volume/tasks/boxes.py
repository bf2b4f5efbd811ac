"""Box geometry of the detect task: boxes found on single slices linked into 3D groups, and a group turned into a
box in patient coordinates (RAS, LPS), in the previews' display pixels and in continuous voxel indices."""
from __future__ import annotations

import numpy as np

from ..outputs.quantify import laterality_of
from ..slices.slice_source import SliceSource


def link_boxes(per_slice: list[tuple[int, list]], max_gap: int, min_iou: float = 0.3) -> list[dict]:
    """Boxes found on slices -> 3D groups: same label, overlapping in-plane, on slices at most `max_gap` apart."""
    groups: list[dict] = []
    for index, boxes in per_slice:
        for box in boxes:
            match = next((g for g in groups if g["label"] == box.label and index - g["last"] <= max_gap
                          and iou(g["box"], box) >= min_iou), None)
            if match is None:
                groups.append({"label": box.label, "box": box, "first": index, "last": index, "slices": [index]})
            else:
                match["box"] = union(match["box"], box)
                match["last"] = index
                match["slices"].append(index)
    return groups


def iou(a, b) -> float:
    ix = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    iy = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = ix * iy
    total = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / total if total > 0 else 0.0


def union(a, b):
    return type(a)(min(a.x1, b.x1), min(a.y1, b.y1), max(a.x2, b.x2), max(a.y2, b.y2), a.label)


def box_to_patient(group: dict, source: SliceSource) -> dict:
    """A linked box group -> a 3D box in patient coordinates (RAS and LPS), from its 8 voxel-space corners."""
    box = group["box"]
    volume = source.volume
    # Box edges lie on pixel borders: pixel centres are at +0.5 in box coordinates.
    rows = np.array([box.y1 - 0.5, box.y2 - 0.5])
    cols = np.array([box.x1 - 0.5, box.x2 - 0.5])
    grid_rows, grid_cols = np.meshgrid(rows, cols, indexing="ij")
    corners = np.concatenate([source.orientation.display_to_index(slice_index, grid_rows, grid_cols, volume.shape)
                              for slice_index in (group["first"] - 0.5, group["last"] + 0.5)])
    lps = volume.geometry.index_to_lps(corners)
    low, high = lps.min(axis=0), lps.max(axis=0)
    ras_low, ras_high = low * [-1, -1, 1], high * [-1, -1, 1]
    centre = (low + high) / 2
    # The same box in the display orientation of previews (the model's coronal/sagittal rows run the other way).
    display_rows, display_cols = source.to_display(rows, cols)
    return {"label": box.label or "", "slices": [int(group["first"]), int(group["last"])],
            "box_model_pixels": [box.x1, box.y1, box.x2, box.y2],
            "box_display_pixels": [float(display_cols.min() + 0.5), float(display_rows.min() + 0.5),
                                   float(display_cols.max() + 0.5), float(display_rows.max() + 0.5)],
            "lps_min": low.tolist(), "lps_max": high.tolist(),
            "ras_min": np.minimum(ras_low, ras_high).tolist(), "ras_max": np.maximum(ras_low, ras_high).tolist(),
            "size_mm": (high - low).tolist(),
            # The box is axis-aligned in voxel space (continuous (k, j, i), edges on voxel borders): with the
            # IJK->RAS matrix a client draws it oriented like the volume instead of as a patient-axis hull.
            "index_min_kji": corners.min(axis=0).tolist(), "index_max_kji": corners.max(axis=0).tolist(),
            "laterality": laterality_of(centre, volume.geometry, volume.shape)}
