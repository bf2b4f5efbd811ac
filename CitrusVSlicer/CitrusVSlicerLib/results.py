"""What the backend answered, in the shape the scene writers and the panel need (plain Python + numpy, no MRML, no Qt).

Every target of a run is accounted for: a found one is a `SegmentMask` (its own crop: segments may overlap), a
target the model did not find is a `MissingTarget` with the backend's reason. `table_rows()` gives the findings
table a row per target (found or not), `report_text` and `status_text` say in words what happened, problems
included, so that a run that finds nothing says why.
"""
from __future__ import annotations

import hashlib
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
    key_slice: int | None = None           # slice index along the run's slice axis where the model saw it best
    answer: str = ""                       # the model's text answer for this target
    score: float | None = None             # the key slice's score (the backend's key_score)

    def full_mask(self, shape_kji: tuple[int, int, int]) -> np.ndarray:
        mask = np.zeros(shape_kji, bool)
        k, j, i = self.offset_kji
        dk, dj, di = self.crop.shape
        if k < 0 or j < 0 or i < 0 or k + dk > shape_kji[0] or j + dj > shape_kji[1] or i + di > shape_kji[2]:
            raise ValueError(f"segment {self.name!r}: crop {self.offset_kji}+{self.crop.shape} lies outside the volume {shape_kji}")
        mask[k:k + dk, j:j + dj, i:i + di] = self.crop
        return mask

    def digest(self) -> str:
        return mask_digest(self.offset_kji, self.crop)

    def evidence(self) -> str:
        """Key slice and score in words (tooltips, the answer area)."""
        parts = []
        if self.key_slice is not None:
            parts.append(f"key slice {self.key_slice}")
        if self.score is not None:
            parts.append(f"score {self.score:.3g}")
        return ", ".join(parts)


@dataclass
class MissingTarget:
    """A target the model did not find: no segment is made; the table and the panel show the reason."""

    name: str
    reason: str
    answer: str = ""
    key_slice: int | None = None
    score: float | None = None


@dataclass
class SceneResult:
    """Everything one Apply produces."""

    task: str
    prompt: str
    segments: list[SegmentMask] = field(default_factory=list)
    missing: list[MissingTarget] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)          # ras_min / ras_max / label / slices
    report_findings: str = ""
    report_impression: str = ""
    answer: str = ""                                          # free text (Ask)
    problems: list[str] = field(default_factory=list)
    random_weights: bool = False
    experimental: str = ""                                    # why the backend calls the result experimental
    dicom: dict | None = None                                 # the backend's DICOM SEG / SR (URLs, UIDs)
    axis: str = "axial"                                       # the slice axis the key slices are counted along

    @property
    def found_findings(self) -> list[dict]:
        """The findings that describe something found (not the backend's rows for targets it did not find)."""
        missing = {m.name for m in self.missing}
        return [f for f in self.findings if not f.get("segment") or f["segment"] not in missing]

    @property
    def found_nothing(self) -> bool:
        return not (self.segments or self.found_findings or self.boxes or self.answer or self.report_findings
                    or self.report_impression)

    def other_problems(self) -> list[str]:
        """The problems not already said by a missing target's reason (the backend may say both)."""
        reasons = [m.reason for m in self.missing if m.reason]
        return [p for p in self.problems if not any(reason in p or p in reason for reason in reasons)]

    def table_rows(self) -> list[dict]:
        """The findings table's rows: the backend's findings with their segment's evidence, then one row per target
        that was not found (found = "no", with the reason)."""
        by_name = {s.name: s for s in self.segments}
        missing = {m.name: m for m in self.missing}
        rows, listed = [], set()
        for finding in self.findings:
            name = finding.get("segment") or ""
            if name in missing:  # the backend's row for a target it did not find: no segment, so no numbers
                listed.add(name)
                rows.append(self._missing_row(missing[name], finding.get("location")))
                continue
            row = dict(finding)
            segment = by_name.get(name)
            if segment is not None:
                listed.add(name)
                row.update(found="yes", answer=segment.answer, score=segment.score)
                row.setdefault("slice", segment.key_slice)
            rows.append(row)
        for segment in self.segments:  # a found segment the backend gave no finding for still gets its row
            if segment.name not in listed:
                rows.append({"finding": segment.name, "segment": segment.name, "found": "yes", "answer": segment.answer,
                             "score": segment.score, "slice": segment.key_slice, "laterality": segment.laterality})
        rows += [self._missing_row(target) for target in self.missing if target.name not in listed]
        return rows

    @staticmethod
    def _missing_row(target: MissingTarget, location: str | None = None) -> dict:
        return {"finding": target.name, "location": location, "found": "no", "reason": target.reason,
                "answer": target.answer, "score": target.score, "slice": target.key_slice}

    def targets_text(self) -> str:
        lines = []
        for segment in self.segments:
            volume = segment.measurements.get("volume_ml")
            details = ", ".join(part for part in (segment.evidence(),
                                                  f"{volume:.4g} mL" if volume is not None else "") if part)
            lines.append(f"- {segment.name}: found" + (f" ({details})" if details else "")
                         + (f". Answer: {segment.answer}" if segment.answer else ""))
        for target in self.missing:
            lines.append(f"- {target.name}: NOT FOUND: {target.reason or 'no reason given'}"
                         + (f". Answer: {target.answer}" if target.answer else ""))
        return "\n".join(lines)

    @property
    def report_text(self) -> str:
        parts = []
        if self.random_weights:
            parts.append("RANDOM WEIGHTS: produced by a random test model; the content is noise.")
        if self.experimental:
            parts.append(self.experimental)
        if self.found_nothing and not self.missing:
            parts.append("NOTHING FOUND.")
        targets = self.targets_text()
        if targets:
            parts.append("TARGETS:\n" + targets)
        problems = self.other_problems()
        if problems:
            parts.append("PROBLEMS:\n" + "\n".join(f"- {p}" for p in problems))
        if self.answer:
            parts.append(self.answer)
        if self.report_findings:
            parts.append("FINDINGS:\n" + self.report_findings)
        if self.report_impression:
            parts.append("IMPRESSION:\n" + self.report_impression)
        return "\n\n".join(parts)

    @property
    def status_text(self) -> str:
        """One line for the panel's status: what was found, what was not and why, and the problems."""
        missing = "; ".join(f"{m.name}: {m.reason or 'no reason given'}" for m in self.missing)
        problems = self.other_problems()
        if self.found_nothing:
            why = "; ".join(part for part in (missing, *problems) if part)
            text = "Nothing found" + (f": {why}." if why else " (the backend gave no reason).")
        else:
            counts = [f"{len(self.segments)} segment(s)" if self.segments else "",
                      f"{len(self.found_findings)} finding(s)" if self.found_findings else "",
                      f"{len(self.boxes)} box(es)" if self.boxes else ""]
            text = "Done: " + ", ".join(c for c in counts if c) if any(counts) else "Done"
            if self.segments:
                text += " (" + ", ".join(s.name for s in self.segments) + ")"
            text += "."
            if missing:
                text += f" Not found: {missing}."
            if problems:
                text += f" Problems: {'; '.join(problems)}."
        if self.random_weights:
            text += " RANDOM TEST WEIGHTS: results are noise."
        return text


def mask_digest(offset_kji, crop: np.ndarray) -> str:
    """A fingerprint of a mask's voxels on the volume's grid, whatever box it was cropped to (an export compares the
    segment in the scene with the one the backend delivered)."""
    found = np.argwhere(crop)
    if not len(found):
        return "empty"
    low, high = found.min(axis=0), found.max(axis=0) + 1
    tight = np.ascontiguousarray(crop[low[0]:high[0], low[1]:high[1], low[2]:high[2]], dtype=bool)
    digest = hashlib.sha1(np.asarray(np.asarray(offset_kji) + low, np.int64).tobytes())
    digest.update(np.asarray(tight.shape, np.int64).tobytes())
    digest.update(np.packbits(tight).tobytes())
    return digest.hexdigest()
