"""What a volume task returns: one `Segment` per target (its own mask in the volume's grid, key slice, evidence,
measurements) and the `VolumeResult` every output is written from; a segment's findings row and measurements."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...inference.engine import FORCED_SEGMENT_ANSWER
from ...inference.reports import detect_location
from ..input.io import Volume
from ..outputs.quantify import laterality_of, measure_segment
from ..slices.slice_source import SliceSource


@dataclass
class Segment:
    label: int
    name: str
    query: str
    mask: np.ndarray                 # (k, j, i) bool in the volume's grid
    key_slice: int | None
    key_score: float
    measurements: dict = field(default_factory=dict)
    laterality: str | None = None
    slices: list[int] = field(default_factory=list)
    answer: str = FORCED_SEGMENT_ANSWER     # the answer forced on the slices
    answer_source: str = "forced"           # forced or generated (answer_note says why)
    answer_note: str = ""
    key_evidence: dict | None = None        # mask-logit figures and the (reported) object score of the key slice
    reason: str = ""                        # why the target was not found (empty when it was)
    color: tuple[int, int, int] | None = None   # RGB 0-255 when the segment's owner chose it (an export from Slicer)

    @property
    def found(self) -> bool:
        return bool(self.mask.any())

    def describe(self) -> dict:
        return {"label": self.label, "name": self.name, "query": self.query, "key_slice": self.key_slice,
                "key_score": round(self.key_score, 4), "laterality": self.laterality, "slices": self.slices,
                "measurements": self.measurements, "answer": self.answer, "answer_source": self.answer_source,
                "answer_note": self.answer_note, "key_evidence": self.key_evidence, "found": self.found,
                "reason": self.reason or None,
                "score": round(self.key_score, 4) if self.key_slice is not None else None}


@dataclass
class VolumeResult:
    task: str
    prompt: str
    case: str
    labels: np.ndarray                 # (k, j, i) multi-label view (outputs/overlaps.multilabel); each segment's
                                       # own voxels are its `mask`: every output and number uses those
    segments: list[Segment] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)
    report_findings: str = ""
    report_impression: str = ""
    problems: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    random_weights: bool = False
    experimental: str = ""             # why this result is experimental (reports), shown in every output
    report_image: np.ndarray | None = field(default=None, repr=False)   # the projection a report was written from
    source: "SliceSource | None" = field(default=None, repr=False)   # the slices the task saw (previews)

    def describe(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "case": self.case, "random_weights": self.random_weights,
                "experimental": self.experimental,
                "segments": [s.describe() for s in self.segments], "findings": self.findings, "boxes": self.boxes,
                "report": {"findings": self.report_findings, "impression": self.report_impression},
                "problems": self.problems, "timings": self.timings, "settings": self.settings}


def measure_into(segment: Segment, volume: Volume, slice_axis: int) -> None:
    """The segment's measurements and laterality, from its own mask (what every output of it carries)."""
    measurements = measure_segment(segment.mask, volume.geometry, volume.voxels, slice_axis)
    segment.measurements = measurements.to_dict()
    segment.laterality = (laterality_of(measurements.centroid_lps, volume.geometry, volume.shape)
                          if segment.mask.any() else None)


def segment_finding(segment: Segment) -> dict:
    """A findings row; a target not found has no figures (never a volume), only its reason."""
    m = segment.measurements if segment.found else {}
    return {"finding": segment.name, "location": detect_location(segment.name) or segment.name,
            "laterality": segment.laterality or "", "volume_ml": m.get("volume_ml"),
            "long_axis_mm": m.get("long_axis_mm"), "short_axis_mm": m.get("short_axis_mm"),
            "mean_intensity": m.get("intensity_mean"), "slice": segment.key_slice, "segment": segment.name,
            "found": segment.found, "reason": segment.reason or None}
