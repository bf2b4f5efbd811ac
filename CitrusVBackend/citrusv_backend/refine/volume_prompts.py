"""Refinement prompts: include / exclude points and a box in the volume's voxel index space (IJK), and where
they land on the display-oriented slices the model sees.

Coordinates are voxel indices (i, j, k) as Slicer's RAS->IJK gives them: integers at voxel centres, fractions
kept. On a slice they become display pixels (x = column, y = row, the SAM convention of pixel indices), and in
SAM2's input frame `x / width * S`, `y / height * S` (S = 1024), exactly as SAM2's image and video predictors
transform them: the SAM2 input is the whole slice stretched to the square, so the mapping is a scale per axis.
A box covers the slices whose centres it spans (at least the one nearest its middle) and travels to SAM2 as
two points labelled 2 and 3, placed before the clicks, as SAM2 orders them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..volume.slices.orientation import DisplayOrientation

INCLUDE, EXCLUDE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 1, 0, 2, 3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class PointPrompt:
    ijk: tuple[float, float, float]
    positive: bool = True


@dataclass(frozen=True)
class BoxPrompt:
    """Two opposite corners (any order) in IJK."""

    corner_a: tuple[float, float, float]
    corner_b: tuple[float, float, float]


@dataclass
class RefinePrompts:
    points: list[PointPrompt] = field(default_factory=list)
    box: BoxPrompt | None = None

    def __bool__(self) -> bool:
        return bool(self.points) or self.box is not None


@dataclass
class SlicePrompt:
    """The prompts that land on one slice, in display pixels."""

    index: int
    points: list[tuple[float, float, int]] = field(default_factory=list)   # (x, y, label 1 / 0)
    box: tuple[float, float, float, float] | None = None                  # (x1, y1, x2, y2), x1 <= x2, y1 <= y2

    def sam2_points(self, height: int, width: int, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """([1, P, 2] coordinates in SAM2's size x size frame, [1, P] int32 labels), or None without prompts."""
        coords, labels = [], []
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            coords += [(x1, y1), (x2, y2)]
            labels += [BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]
        coords += [(x, y) for x, y, _ in self.points]
        labels += [label for _, _, label in self.points]
        if not coords:
            return None
        points = torch.tensor(coords, dtype=torch.float32) / torch.tensor([width, height], dtype=torch.float32) * size
        return points[None], torch.tensor(labels, dtype=torch.int32)[None]


def ijk_to_display(orientation: DisplayOrientation, shape_kji: tuple[int, int, int], ijk) -> tuple[float, float, float]:
    """(i, j, k) -> (position along the slice axis, display row, display column), fractions kept."""
    kji = (float(ijk[2]), float(ijk[1]), float(ijk[0]))
    height, width = orientation.plane_shape(shape_kji)
    row, col = kji[orientation.row_axis], kji[orientation.col_axis]
    row = (height - 1) - row if orientation.flip_rows else row
    col = (width - 1) - col if orientation.flip_cols else col
    return kji[orientation.slice_axis], row, col


def _check_inside(ijk, shape_kji, what: str) -> None:
    if len(ijk) != 3 or not all(math.isfinite(float(v)) for v in ijk):
        raise InputError(f"{what}: give three finite voxel coordinates (i, j, k)")
    for value, size, axis in zip(ijk, shape_kji[::-1], "ijk"):
        if not -0.5 <= float(value) <= size - 0.5:
            raise InputError(f"{what} at {axis}={float(value):g} is outside the volume (0..{size - 1}); "
                             f"place it on the segmented volume")


def prompts_by_slice(prompts: RefinePrompts, orientation: DisplayOrientation, shape_kji: tuple[int, int, int],
                     slice_range: tuple[int, int]) -> dict[int, SlicePrompt]:
    """Slice index -> the prompts on it. Everything must lie inside the volume and the segmented slice range."""
    first, last = slice_range
    slices: dict[int, SlicePrompt] = {}

    def on(index: int, what: str) -> SlicePrompt:
        if not first <= index < last:
            raise InputError(f"{what} is on slice {index}, outside the segmented slices {first}..{last - 1}")
        return slices.setdefault(index, SlicePrompt(index))

    for number, point in enumerate(prompts.points, start=1):
        what = f"point {number}"
        _check_inside(point.ijk, shape_kji, what)
        position, row, col = ijk_to_display(orientation, shape_kji, point.ijk)
        on(int(math.floor(position + 0.5)), what).points.append((col, row, INCLUDE if point.positive else EXCLUDE))
    if prompts.box is not None:
        for corner in (prompts.box.corner_a, prompts.box.corner_b):
            _check_inside(corner, shape_kji, "the box corner")
        a = ijk_to_display(orientation, shape_kji, prompts.box.corner_a)
        b = ijk_to_display(orientation, shape_kji, prompts.box.corner_b)
        low, high = min(a[0], b[0]), max(a[0], b[0])
        covered = range(math.ceil(low - 1e-9), math.floor(high + 1e-9) + 1)
        if len(covered) == 0:  # thinner than a slice, between two centres: the slice nearest its middle
            covered = [int(math.floor((low + high) / 2 + 0.5))]
        rectangle = (min(a[2], b[2]), min(a[1], b[1]), max(a[2], b[2]), max(a[1], b[1]))
        for index in covered:
            on(index, "the box").box = rectangle
    return dict(sorted(slices.items()))


def box_mask(box: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
    """[height, width] bool: the pixels whose centres lie inside the box (edges included)."""
    x1, y1, x2, y2 = box
    cols = np.arange(width)
    rows = np.arange(height)
    return ((rows >= y1 - 1e-9) & (rows <= y2 + 1e-9))[:, None] & ((cols >= x1 - 1e-9) & (cols <= x2 + 1e-9))[None, :]


# ---------------------------------------------------------------------------------------------- reading

def world_to_ijk(position, system: str, lps_to_ijk: np.ndarray) -> tuple[float, float, float]:
    lps = np.asarray(position, dtype=float)
    if system.upper() == "RAS":
        lps = LPS_TO_RAS @ lps
    elif system.upper() != "LPS":
        raise InputError(f"coordinate system {system!r}: use RAS or LPS")
    return tuple(float(v) for v in (lps_to_ijk @ np.append(lps, 1.0))[:3])


def _coordinates(entry: dict, lps_to_ijk: np.ndarray | None, what: str) -> tuple[float, float, float]:
    if "ijk" in entry:
        return tuple(float(v) for v in entry["ijk"])
    for system in ("ras", "lps"):
        if system in entry:
            if lps_to_ijk is None:
                raise InputError(f"{what}: world coordinates need the volume's geometry")
            return world_to_ijk(entry[system], system, lps_to_ijk)
    raise InputError(f"{what}: give 'ijk' (voxel indices), 'ras' or 'lps' (mm)")


def prompts_from_dict(data: dict, lps_to_ijk: np.ndarray | None = None) -> RefinePrompts:
    """{"points": [{"ijk"|"ras"|"lps": [..], "positive": true}], "box": {"ijk_min"|..., "ijk_max"|...}}"""
    if not isinstance(data, dict):
        raise InputError("a refinement step is a JSON object with 'points' and/or 'box'")
    points = []
    for number, entry in enumerate(data.get("points") or [], start=1):
        if not isinstance(entry, dict):
            raise InputError(f"point {number}: an object like {{\"ijk\": [i, j, k], \"positive\": true}}")
        points.append(PointPrompt(_coordinates(entry, lps_to_ijk, f"point {number}"), bool(entry.get("positive", True))))
    box = None
    if data.get("box"):
        entry = data["box"]
        corners = []
        for end in ("min", "max"):
            key = next((f"{s}_{end}" for s in ("ijk", "ras", "lps") if f"{s}_{end}" in entry), None)
            if key is None:
                raise InputError("the box needs two corners: ijk_min / ijk_max (or ras_ / lps_)")
            corners.append(_coordinates({key.split("_")[0]: entry[key]}, lps_to_ijk, "the box"))
        box = BoxPrompt(corners[0], corners[1])
    return RefinePrompts(points, box)


def prompts_from_markups(path: Path, lps_to_ijk: np.ndarray, positive: bool = True) -> RefinePrompts:
    """A Slicer markups file (.mrk.json): control points of point lists, or an ROI (its two extreme corners)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        markups = document["markups"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a Slicer markups .mrk.json file ({error})") from None
    prompts = RefinePrompts()
    for markup in markups:
        system = markup.get("coordinateSystem", "LPS")
        kind = markup.get("type")
        if kind == "ROI":
            prompts.box = _roi_box(markup, system, lps_to_ijk, path)
        elif kind == "Fiducial":  # a point list
            for point in markup.get("controlPoints", []):
                if point.get("positionStatus", "defined") == "defined":
                    prompts.points.append(PointPrompt(world_to_ijk(point["position"], system, lps_to_ijk), positive))
        else:
            raise InputError(f"{path}: markups of type {kind!r} are not prompts (use a point list or an ROI)")
    return prompts


def _roi_box(markup: dict, system: str, lps_to_ijk: np.ndarray, path: Path) -> BoxPrompt:
    """The ROI's box (center, size, orientation axes) as its IJK bounding box."""
    try:
        center = np.asarray(markup["center"], float)
        size = np.asarray(markup["size"], float)
        axes = np.asarray(markup.get("orientation", np.eye(3).ravel()), float).reshape(3, 3)
    except (KeyError, ValueError) as error:
        raise InputError(f"{path}: the ROI needs center and size ({error})") from None
    signs = np.array(list(np.ndindex(2, 2, 2))) * 2 - 1   # the 8 corners
    corners = center + (signs * size / 2) @ axes.T
    ijk = np.array([world_to_ijk(c, system, lps_to_ijk) for c in corners])
    return BoxPrompt(tuple(ijk.min(axis=0)), tuple(ijk.max(axis=0)))
