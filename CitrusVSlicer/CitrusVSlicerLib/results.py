"""What the backend answered, in the shape the scene writers need (plain Python + numpy, no MRML, no Qt)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SegmentMask:
    """One segment as a crop of the input volume's voxel grid: voxels [offset, offset + crop.shape)."""

    label: int
    name: str
    color: tuple[float, float, float]      # 0..1
    offset_kji: tuple[int, int, int]
    crop: np.ndarray                       # bool, (k, j, i)
    measurements: dict = field(default_factory=dict)
    laterality: str | None = None
    key_slice: int | None = None

    def full_mask(self, shape_kji: tuple[int, int, int]) -> np.ndarray:
        mask = np.zeros(shape_kji, bool)
        k, j, i = self.offset_kji
        dk, dj, di = self.crop.shape
        if k < 0 or j < 0 or i < 0 or k + dk > shape_kji[0] or j + dj > shape_kji[1] or i + di > shape_kji[2]:
            raise ValueError(f"segment {self.name!r}: crop {self.offset_kji}+{self.crop.shape} lies outside the volume {shape_kji}")
        mask[k:k + dk, j:j + dj, i:i + di] = self.crop
        return mask


@dataclass
class SceneResult:
    """Everything one Apply produces."""

    task: str
    prompt: str
    segments: list[SegmentMask] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)          # ras_min / ras_max / label / slices
    report_findings: str = ""
    report_impression: str = ""
    answer: str = ""                                          # free text (Ask)
    problems: list[str] = field(default_factory=list)
    random_weights: bool = False
    experimental: str = ""                                    # why the backend calls the result experimental
    dicom: dict | None = None                                 # the backend's DICOM SEG / SR (URLs, UIDs)

    @property
    def report_text(self) -> str:
        parts = []
        if self.random_weights:
            parts.append("RANDOM WEIGHTS: produced by a random test model; the content is noise.")
        if self.experimental:
            parts.append(self.experimental)
        if self.answer:
            parts.append(self.answer)
        if self.report_findings:
            parts.append("FINDINGS:\n" + self.report_findings)
        if self.report_impression:
            parts.append("IMPRESSION:\n" + self.report_impression)
        return "\n\n".join(parts)
