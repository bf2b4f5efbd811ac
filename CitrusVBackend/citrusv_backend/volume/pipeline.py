"""Whole-volume tasks on top of the 2D model: segment (key slice + propagation), detect, report.

Segmentation of one target:
1. key-slice search — the forced-answer segmentation ("Sure, it is [SEG].") on a coarse set of slices, then
   finer around the best; each candidate is scored by SAM2's object score, predicted IoU and mask area;
2. propagation — SAM2's video memory is conditioned with the key-slice mask and run forward and backward
   through the slices until the target has ended (mode "propagate"); or every slice is segmented on its own
   (mode "per-slice", a slice counts when SAM2's object score is positive); or propagation is re-anchored
   with a fresh Citrus-V mask wherever it loses the target while Citrus-V still finds it (mode "hybrid");
3. post-processing — holes filled per slice (on by default: it cannot remove tissue), largest 3D connected
   component (off by default: lesions can be multifocal).
Masks are written into the volume's own voxel grid by the exact inverse of the display mapping.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CitrusVError, InputError
from ..inference.engine import FORCED_SEGMENT_ANSWER, CitrusVEngine, InferenceResult
from ..inference.reports import detect_location
from ..model.processor import TASK_PIXEL_BUDGETS, PixelBudget
from .io import Volume
from .orientation import PLANES, DisplayOrientation, display_orientation
from .propagation import Cancelled, SliceFrames, propagate
from .quantify import laterality_of, measure_segment
from .targets import Target, parse_targets
from .windowing import Window, parse_window

log = logging.getLogger(__name__)

MODES = ("propagate", "per-slice", "hybrid")
TASKS = ("segment", "detect", "report")
ProgressFn = Callable[[str, float, str], None]


class JobCancelled(CitrusVError):
    """The caller cancelled the job; nothing was written."""


@dataclass
class VolumeOptions:
    mode: str = "propagate"
    window: str | None = None              # auto, a CT preset name, or "CENTER,WIDTH"
    plane: str = "axial"                   # axial, coronal, sagittal
    slice_range: tuple[int, int] | None = None  # [first, last) slice indices along the plane
    min_pixels: int | None = None
    max_pixels: int | None = None
    answer: str = FORCED_SEGMENT_ANSWER
    key_candidates: int = 9                # coarse key-slice candidates per target
    stop_after_empty: int = 2              # propagation ends after this many empty slices
    fill_holes: bool = True
    largest_component: bool = False
    report_slices: int = 3                 # slices read by the report task
    detect_slices: int = 16                # slices read by the detect task
    max_new_tokens: int = 1024
    batch_size: int = 4                    # slices per forced-answer prefill / SAM2 encoding

    def validate(self, depth: int) -> tuple[int, int]:
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.plane not in PLANES:
            raise InputError(f"unknown slice plane {self.plane!r}; use one of {', '.join(PLANES)}")
        first, last = self.slice_range or (0, depth)
        if not (0 <= first < last <= depth):
            raise InputError(f"slice range {first}:{last} is outside the volume's 0:{depth} along the {self.plane} axis")
        if self.key_candidates < 1 or self.stop_after_empty < 1 or self.batch_size < 1:
            raise InputError("key_candidates, stop_after_empty and batch_size must be at least 1")
        return first, last


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

    def describe(self) -> dict:
        return {"label": self.label, "name": self.name, "query": self.query, "key_slice": self.key_slice,
                "key_score": round(self.key_score, 4), "laterality": self.laterality, "slices": self.slices,
                "measurements": self.measurements}


@dataclass
class VolumeResult:
    task: str
    prompt: str
    case: str
    labels: np.ndarray                 # (k, j, i) labelmap (0 = background)
    segments: list[Segment] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)
    report_findings: str = ""
    report_impression: str = ""
    problems: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    random_weights: bool = False
    source: "SliceSource | None" = field(default=None, repr=False)   # the slices the task saw (previews)

    def describe(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "case": self.case, "random_weights": self.random_weights,
                "segments": [s.describe() for s in self.segments], "findings": self.findings, "boxes": self.boxes,
                "report": {"findings": self.report_findings, "impression": self.report_impression},
                "problems": self.problems, "timings": self.timings, "settings": self.settings}


class SliceSource:
    """The volume's slices along one plane, display-oriented, windowed to uint8 RGB (computed on demand)."""

    def __init__(self, volume: Volume, plane: str, window: Window):
        self.volume = volume
        self.orientation: DisplayOrientation = display_orientation(volume.geometry.direction, plane)
        self.window = window
        self.depth = volume.shape[self.orientation.slice_axis]
        self.height, self.width = self.orientation.plane_shape(volume.shape)

    def rgb(self, index: int) -> np.ndarray:
        gray = self.window.apply(self.orientation.slice(self.volume.voxels, index))
        return np.repeat(gray[:, :, None], 3, axis=2)


class VolumePipeline:
    """Runs one volume task; `progress(stage, fraction, message)` and `should_cancel()` are optional hooks."""

    def __init__(self, engine: CitrusVEngine, progress: ProgressFn | None = None,
                 should_cancel: Callable[[], bool] | None = None):
        self.engine = engine
        self.progress = progress or (lambda stage, fraction, message: None)
        self.should_cancel = should_cancel or (lambda: False)

    # ------------------------------------------------------------------------------------------ helpers

    def _check_cancel(self) -> None:
        if self.should_cancel():
            raise JobCancelled("cancelled by the user")

    def _budget(self, task: str, options: VolumeOptions) -> PixelBudget:
        default = TASK_PIXEL_BUDGETS[task]
        return PixelBudget(options.min_pixels or default.min_pixels, options.max_pixels or default.max_pixels)

    def _segment_slice(self, source: SliceSource, index: int, target: Target, options: VolumeOptions) -> InferenceResult:
        return self._segment_slices(source, [index], target, options)[0]

    def _segment_slices(self, source: SliceSource, indices: list[int], target: Target,
                        options: VolumeOptions) -> list[InferenceResult]:
        """Forced-answer segmentation of slices, `batch_size` at a time (cancel is checked between batches)."""
        budget = self._budget("segment", options)
        results = []
        for start in range(0, len(indices), options.batch_size):
            self._check_cancel()
            chunk = indices[start:start + options.batch_size]
            results += self.engine.segment_batch([source.rgb(i) for i in chunk], target.query, answer=options.answer,
                                                 min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
        return results

    # ------------------------------------------------------------------------------------------ entry

    def run(self, volume: Volume, prompt: str, task: str = "segment", options: VolumeOptions | None = None) -> VolumeResult:
        options = options or VolumeOptions()
        if task not in TASKS:
            raise InputError(f"unknown volume task {task!r}; use one of {', '.join(TASKS)}")
        if task != "report" and (not isinstance(prompt, str) or not prompt.strip()):
            raise InputError("the prompt is empty; say what to find, e.g. 'segment the liver'")
        window = parse_window(options.window, prompt or "", volume.modality, volume.voxels)
        source = SliceSource(volume, options.plane, window)
        slice_range = options.validate(source.depth)
        result = VolumeResult(task=task, prompt=prompt, case=volume.name, labels=np.zeros(volume.shape, np.uint8),
                              random_weights=self.engine.loaded.random_weights, source=source,
                              settings={"mode": options.mode, "plane": options.plane, "window": window.__dict__,
                                        "slice_range": list(slice_range), "modality": volume.modality})
        started = time.perf_counter()
        try:
            if task == "segment":
                self._run_segment(source, prompt, options, slice_range, result)
            elif task == "detect":
                self._run_detect(source, prompt, options, slice_range, result)
            else:
                self._run_report(source, prompt, options, slice_range, result)
        except Cancelled:
            raise JobCancelled("cancelled by the user") from None
        result.timings["total_s"] = round(time.perf_counter() - started, 3)
        self.progress("done", 1.0, f"{task} finished in {result.timings['total_s']:.1f} s")
        return result

    # ------------------------------------------------------------------------------------------ segment

    def _run_segment(self, source: SliceSource, prompt: str, options: VolumeOptions, slice_range, result: VolumeResult):
        targets = parse_targets(prompt)
        if len(targets) > 254:
            raise InputError("at most 254 targets per prompt")
        for number, target in enumerate(targets, start=1):
            stage = f"{target.name} ({number}/{len(targets)})"
            mask, key, score, slices = self._segment_target(source, target, options, slice_range, stage, result.timings)
            mask = postprocess(mask, source.orientation.slice_axis, options)
            segment = Segment(label=number, name=target.name, query=target.query, mask=mask, key_slice=key,
                              key_score=score, slices=sorted(set(np.nonzero(mask.any(axis=tuple(
                                  a for a in range(3) if a != source.orientation.slice_axis)))[0].tolist())))
            self._measure(segment, source)
            result.labels[mask & (result.labels == 0)] = number
            result.segments.append(segment)
            if not mask.any():
                result.problems.append(f"{target.name}: not found (no slice with a confident mask)")
        result.findings = [segment_finding(s) for s in result.segments]

    def _segment_target(self, source, target: Target, options, slice_range, stage: str, timings: dict):
        step = time.perf_counter()
        if options.mode == "per-slice":
            mask, slices = self._per_slice(source, target, options, slice_range, stage)
            timings[f"per_slice_s[{target.name}]"] = round(time.perf_counter() - step, 3)
            best = max(slices, key=lambda item: item[1]) if slices else (None, 0.0)
            return mask, best[0], best[1], [s for s, _ in slices]
        key, key_result, score = self.find_key_slice(source, target, options, slice_range, stage)
        timings[f"key_slice_search_s[{target.name}]"] = round(time.perf_counter() - step, 3)
        step = time.perf_counter()
        mask = np.zeros(source.volume.shape, bool)
        if key is None:
            return mask, None, 0.0, []
        anchors = {key: key_result}
        propagated = self._propagate(source, anchors, options, slice_range, stage)
        if options.mode == "hybrid":
            propagated = self._reanchor(source, target, anchors, propagated, options, slice_range, stage)
        for index, item in propagated.items():
            source.orientation.put_slice(mask, index, item)
        timings[f"propagation_s[{target.name}]"] = round(time.perf_counter() - step, 3)
        return mask, key, score, sorted(propagated)

    def find_key_slice(self, source, target, options, slice_range, stage):
        """Coarse-to-fine search for the slice where the target is found most confidently."""
        first, last = slice_range
        count = last - first
        candidates = sorted({first + int(round((n + 0.5) * count / options.key_candidates)) for n in range(options.key_candidates)}
                            if count > options.key_candidates else set(range(first, last)))
        candidates = [c for c in candidates if first <= c < last]
        scored: dict[int, tuple[float, InferenceResult]] = {}

        def score(indices: list[int]) -> None:
            fresh = [i for i in dict.fromkeys(indices) if i not in scored and first <= i < last]
            for index, result in zip(fresh, self._segment_slices(source, fresh, target, options)):
                scored[index] = (slice_score(result), result)
                self.progress(f"key slice: {stage}", min(len(scored) / (len(candidates) + 6), 0.99),
                              f"slice {index}: score {scored[index][0]:.3f}")

        score(candidates)
        step = max(1, count // (2 * options.key_candidates))
        while step >= 1:
            best = max(scored, key=lambda i: scored[i][0])
            score([best - step, best + step])
            step //= 2
        best = max(scored, key=lambda i: scored[i][0])
        best_score, best_result = scored[best]
        if best_score <= 0 or not best_result.masks:
            return None, None, 0.0
        return best, best_result, best_score

    def _key_mask(self, result: InferenceResult, size: int) -> np.ndarray:
        """The key-slice mask in SAM2's square frame: the low-res logits upsampled like SAM2 itself does."""
        logits = torch.from_numpy(result.masks[0].low_res_logits)[None, None]
        return (F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)[0, 0] > 0).numpy()

    def _propagate(self, source, anchors: dict, options, slice_range, stage) -> dict[int, np.ndarray]:
        first, last = slice_range
        grounding = self.engine.model.grounding_encoder
        size = grounding.image_size
        frames = SliceFrames(source.rgb, first, last - first, self._budget("segment", options), size)
        predictor = self.engine.video_predictor()
        frame_anchors = {index - first: self._key_mask(result, size) for index, result in anchors.items()}
        progress = lambda done, total: self.progress(f"propagation: {stage}", min(done / max(total, 1), 0.99),  # noqa: E731
                                                     f"{done} slices")
        propagated = propagate(predictor, frames, source.height, source.width, frame_anchors,
                               stop_after_empty=options.stop_after_empty,
                               autocast=grounding._autocast(next(predictor.parameters()).device),
                               on_slice=progress, should_cancel=self.should_cancel)
        return {first + frame: item.mask for frame, item in propagated.items()}

    def _reanchor(self, source, target, anchors, propagated, options, slice_range, stage):
        """Where propagation lost the target, ask Citrus-V again; a confident mask becomes a new anchor."""
        first, last = slice_range
        for _ in range(8):  # each round adds at most one anchor per direction
            found = [i for i, m in propagated.items() if m.any()]
            if not found:
                break
            new = {}
            for edge, direction in ((max(found), 1), (min(found), -1)):
                probe = edge + direction
                if first <= probe < last and probe not in anchors:
                    result = self._segment_slice(source, probe, target, options)
                    if slice_score(result) > 0 and result.masks:
                        new[probe] = result
            if not new:
                break
            anchors.update(new)
            propagated = self._propagate(source, anchors, options, slice_range, stage)
        return propagated

    def _per_slice(self, source, target, options, slice_range, stage):
        first, last = slice_range
        mask = np.zeros(source.volume.shape, bool)
        kept = []
        indices = list(range(first, last))
        for start in range(0, len(indices), options.batch_size):
            chunk = indices[start:start + options.batch_size]
            for index, result in zip(chunk, self._segment_slices(source, chunk, target, options)):
                score = slice_score(result)
                if score > 0 and result.masks[0].mask.any():
                    source.orientation.put_slice(mask, index, result.masks[0].mask)
                    kept.append((index, score))
            self.progress(f"per-slice: {stage}", (start + len(chunk)) / len(indices), f"slice {chunk[-1]}")
        return mask, kept

    def _measure(self, segment: Segment, source: SliceSource) -> None:
        volume = source.volume
        measurements = measure_segment(segment.mask, volume.geometry, volume.voxels, source.orientation.slice_axis)
        segment.measurements = measurements.to_dict()
        if segment.mask.any():
            segment.laterality = laterality_of(measurements.centroid_lps, volume.geometry, volume.shape)

    # ------------------------------------------------------------------------------------------ detect

    def _run_detect(self, source, prompt, options, slice_range, result: VolumeResult):
        first, last = slice_range
        indices = spread(first, last, options.detect_slices)
        budget = self._budget("detect", options)
        per_slice = []
        for done, index in enumerate(indices, start=1):
            self._check_cancel()
            answer = self.engine.run(source.rgb(index), prompt, task="detect", min_pixels=budget.min_pixels,
                                     max_pixels=budget.max_pixels, max_new_tokens=options.max_new_tokens)
            per_slice.append((index, answer.boxes))
            result.problems.extend(f"slice {index}: {p}" for p in answer.problems)
            self.progress("detect", done / len(indices), f"slice {index}: {len(answer.boxes)} box(es)")
        step = (last - first) / max(len(indices), 1)
        result.boxes = [box_to_patient(b, source) for b in link_boxes(per_slice, max_gap=max(1, math.ceil(step)))]
        result.findings = [{"finding": b["label"] or "detection", "location": detect_location(b["label"] or "") or "",
                            "laterality": b["laterality"], "slice": b["slices"][0], "segment": ""} for b in result.boxes]

    # ------------------------------------------------------------------------------------------ report

    def _run_report(self, source, prompt, options, slice_range, result: VolumeResult):
        first, last = slice_range
        indices = spread(first, last, options.report_slices)
        budget = self._budget("report", options)
        query = prompt.strip() if prompt and prompt.strip() else "Evaluate the provided image and compile a report. Let's think step by step."
        findings_text, impression_text = [], []
        for done, index in enumerate(indices, start=1):
            self._check_cancel()
            answer = self.engine.run(source.rgb(index), query, task="report", min_pixels=budget.min_pixels,
                                     max_pixels=budget.max_pixels, max_new_tokens=options.max_new_tokens)
            report = answer.report
            if report is not None:
                if report.findings_text:
                    findings_text.append(f"[slice {index}] {report.findings_text}")
                if report.impression_text:
                    impression_text.append(f"[slice {index}] {report.impression_text}")
                for finding in report.findings:
                    result.findings.append({"finding": finding.text, "location": finding.location or "",
                                            "laterality": finding.laterality or "", "negated": finding.negated,
                                            "slice": index, "segment": ""})
            result.problems.extend(f"slice {index}: {p}" for p in answer.problems)
            self.progress("report", done / len(indices), f"slice {index} read")
        result.report_findings = "\n".join(findings_text)
        result.report_impression = "\n".join(impression_text)


# ---------------------------------------------------------------------------------------------- pure helpers

def slice_score(result: InferenceResult) -> float:
    """Confidence that the slice shows the target: P(object) x predicted IoU, zero for empty/full masks."""
    if not result.masks:
        return 0.0
    found = result.masks[0]
    area = float(found.mask.mean())
    if area == 0.0 or area > 0.9:
        return 0.0
    probability = 1.0 / (1.0 + math.exp(-found.object_score))
    return probability * max(found.iou, 0.0) if found.object_score > 0 else 0.0


def spread(first: int, last: int, count: int) -> list[int]:
    """`count` slice indices spread evenly over [first, last), centred in their bins."""
    count = max(1, min(count, last - first))
    return sorted({first + int((n + 0.5) * (last - first) / count) for n in range(count)})


def postprocess(mask: np.ndarray, slice_axis: int, options: VolumeOptions) -> np.ndarray:
    from scipy import ndimage

    if options.fill_holes and mask.any():
        mask = mask.copy()
        for index in np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != slice_axis)))[0]:
            plane = [slice(None)] * 3
            plane[slice_axis] = index
            mask[tuple(plane)] = ndimage.binary_fill_holes(mask[tuple(plane)])
    if options.largest_component and mask.any():
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = ndimage.sum_labels(mask, components, index=range(1, count + 1))
            mask = components == (int(np.argmax(sizes)) + 1)
    return mask


def segment_finding(segment: Segment) -> dict:
    m = segment.measurements
    return {"finding": segment.name, "location": detect_location(segment.name) or segment.name,
            "laterality": segment.laterality or "", "volume_ml": m.get("volume_ml"),
            "long_axis_mm": m.get("long_axis_mm"), "short_axis_mm": m.get("short_axis_mm"),
            "mean_intensity": m.get("intensity_mean"), "slice": segment.key_slice, "segment": segment.name}


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
    return {"label": box.label or "", "slices": [int(group["first"]), int(group["last"])],
            "box_display_pixels": [box.x1, box.y1, box.x2, box.y2],
            "lps_min": low.tolist(), "lps_max": high.tolist(),
            "ras_min": np.minimum(ras_low, ras_high).tolist(), "ras_max": np.maximum(ras_low, ras_high).tolist(),
            "size_mm": (high - low).tolist(),
            # The box is axis-aligned in voxel space (continuous (k, j, i), edges on voxel borders): with the
            # IJK->RAS matrix a client draws it oriented like the volume instead of as a patient-axis hull.
            "index_min_kji": corners.min(axis=0).tolist(), "index_max_kji": corners.max(axis=0).tolist(),
            "laterality": laterality_of(centre, volume.geometry, volume.shape)}
