"""Whole-volume tasks on top of the 2D model: segment (key slice + propagation), detect, report.

What the model is shown follows its training data (README, "What the model sees"): slices normalised per
volume as SA-Med2D did (windowing.py), oriented in SA-Med2D's array order (orientation.py), asked with the
reference's own prompts (targets.py; reports: the reference's chest-radiograph prompt).

Segmentation of one target:
1. key-slice search — the forced-answer segmentation ("Sure, it is [SEG].") on a coarse set of slices, then
   finer around the best; a candidate counts when its mask logits say the target is there (presence.py: the
   trained signal, not SAM2's untrained object-score head) and a neighbouring slice agrees;
2. propagation — SAM2's video memory is conditioned with the key-slice mask and run forward and backward
   through the slices until the target has ended (mode "propagate"; SAM2's object-score suppression is off
   unless asked); or every slice is segmented on its own (mode "per-slice"); or propagation is re-anchored
   with a fresh Citrus-V mask wherever it loses the target while Citrus-V still finds it (mode "hybrid");
   with `answer_mode="free"` the model writes its own answer on the key slice and that answer, when it has
   a [SEG], is forced on every other slice of the target;
3. post-processing — holes filled per slice (on by default: it cannot remove tissue), largest 3D connected
   component (off by default: lesions can be multifocal).
Masks are written into the volume's own voxel grid by the exact inverse of the slice mapping.

Host work is kept off the model's way (`TaskWork`): each slice is windowed once per task, the slices the
model will ask for next are prepared on worker threads while it computes, and every slice's SAM2 image
features are computed once per task (the key slice's features from the search serve propagation).
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, JobCancelled  # noqa: F401  (JobCancelled: re-exported)
from ..inference.engine import FORCED_SEGMENT_ANSWER, MASK_UPSAMPLING, CitrusVEngine, InferenceResult
from ..inference.hostwork import POSTPROCESS, PREPROCESS, HostStats, Prefetcher, default_workers, worker_pool
from ..inference.reports import detect_location
from ..model.feature_cache import SAM2FeatureCache
from ..model.image_prep import PreparedImage
from ..model.processor import SEG_TOKEN, TASK_PIXEL_BUDGETS, PixelBudget
from .io import Volume
from .orientation import PLANES
from .mask_cleanup import postprocess
from .overlaps import multilabel
from .presence import PRESENCE_RULES, Evidence, PresenceRule, consistent_slices
from .propagation import Cancelled, PropagatedSlice, SliceFrames, propagate
from .quantify import laterality_of, measure_segment
from .slice_source import SliceSource  # noqa: F401  (re-exported: SliceSource has long lived here)
from .targets import Target, detection_targets, parse_targets
from .windowing import Window, WindowChoice

log = logging.getLogger(__name__)

MODES = ("propagate", "per-slice", "hybrid")
TASKS = ("segment", "detect", "report")
ANSWER_MODES = ("forced", "free")
REPORT_IMAGES = ("slices", "projection")
# The reference's report prompt, verbatim (demo/citrusv_streamlit_app.py, the "Report" example).
REPORT_PROMPT = "Evaluate the provided chest radiograph and compile a report. Let's think step by step."
REPORT_EXPERIMENTAL = ("EXPERIMENTAL: Citrus-V's reports were trained and benchmarked on chest radiographs (CheXpert "
                       "Plus), not on {what}; findings may be invented. Read the images yourself.")
ProgressFn = Callable[[str, float, str], None]


@dataclass
class VolumeOptions:
    mode: str = "propagate"
    window: str | None = None              # training (default, = auto), clinical, a CT preset, or "CENTER,WIDTH"
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
    presence: str = "mask"                 # how a slice is judged to show the target (presence.py)
    object_score_suppression: bool = False  # let SAM2's propagation blank masks on a negative object score
    answer_mode: str = "forced"            # forced: `answer` everywhere; free: the model's own key-slice answer
    mask_upsampling: str = "bilinear"      # bilinear (smooth) or nearest (the reference clients' resize)
    report_image: str = "slices"           # slices, or projection (a radiograph-like frontal projection; CT)

    def presence_rule(self) -> PresenceRule:
        return PresenceRule(self.presence)

    def validate(self, depth: int) -> tuple[int, int]:
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        for value, allowed, what in ((self.presence, PRESENCE_RULES, "presence rule"),
                                     (self.answer_mode, ANSWER_MODES, "answer mode"),
                                     (self.mask_upsampling, MASK_UPSAMPLING, "mask upsampling"),
                                     (self.report_image, REPORT_IMAGES, "report image")):
            if value not in allowed:
                raise InputError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
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
    labels: np.ndarray                 # (k, j, i) multi-label view (volume/overlaps.multilabel); each segment's
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


@dataclass
class TaskWork:
    """What the steps of one task share: the slices' prefetcher, the SAM2 feature cache, the host-time counts."""

    source: SliceSource
    budget: PixelBudget
    features: SAM2FeatureCache
    host: HostStats
    pool: ThreadPoolExecutor | None
    depth: int
    slices: Prefetcher | None = None


class VolumePipeline:
    """Runs one volume task; `progress(stage, fraction, message)` and `should_cancel()` are optional hooks.

    `workers` threads prepare slices ahead of the model (0: inline), at most `prefetch_depth` at a time;
    `feature_cache`: SAM2 features to reuse across tasks (by default a fresh cache per task)."""

    def __init__(self, engine: CitrusVEngine, progress: ProgressFn | None = None,
                 should_cancel: Callable[[], bool] | None = None, workers: int | None = None,
                 prefetch_depth: int = 8, feature_cache: SAM2FeatureCache | None = None):
        self.engine = engine
        self.progress = progress or (lambda stage, fraction, message: None)
        self.should_cancel = should_cancel or (lambda: False)
        self._sources: dict[Window, SliceSource] = {}
        self._answers: dict[str, str] = {}     # target query -> the answer forced on its slices (this run)
        self.workers = default_workers() if workers is None else workers
        self.prefetch_depth = prefetch_depth
        self.feature_cache = feature_cache
        self._task: TaskWork | None = None     # the running task's work on its first source
        self._other_work: dict[int, TaskWork] = {}  # ... and on further sources (per-target clinical windows)

    # ------------------------------------------------------------------------------------------ helpers

    def _check_cancel(self) -> None:
        if self.should_cancel():
            raise JobCancelled("cancelled by the user")

    def _budget(self, task: str, options: VolumeOptions) -> PixelBudget:
        return task_budget(task, options)

    def _segment_slice(self, source: SliceSource, index: int, target: Target, options: VolumeOptions) -> InferenceResult:
        return self._segment_slices(source, [index], target, options)[0]

    def _feature_cache(self) -> SAM2FeatureCache:
        return self.feature_cache if self.feature_cache is not None else SAM2FeatureCache()

    def _work(self, source: SliceSource, options: VolumeOptions) -> TaskWork:
        """The running task's shared state on `source` (a task's sources share its worker pool, SAM2 feature cache
        and host counts: the cache keys name the source), or (a step called on its own) a fresh one without
        worker threads."""
        run = self._task
        if run is None:
            task = TaskWork(source, self._budget("segment", options), self._feature_cache(),
                            HostStats(), None, self.prefetch_depth)
        elif run.source is source:
            task = run
        else:
            task = self._other_work.get(id(source))
            if task is None:
                task = TaskWork(source, run.budget, run.features, run.host, run.pool, run.depth)
                self._other_work[id(source)] = task
        if task.slices is None:
            task.slices = Prefetcher(lambda index: self._prepare_slice(task, index), task.pool, task.depth,
                                     task.host, PREPROCESS)
        return task

    def _prepare_slice(self, task: TaskWork, index: int) -> PreparedImage:
        """A slice's image inputs (a worker's job); no SAM2 input when its features are already cached."""
        needs_sam2 = task.source.feature_key(index, task.budget) not in task.features
        return self.engine.processor.prepare_image(task.source.gray(index), task.budget, sam2=needs_sam2)

    def _segment_slices(self, source: SliceSource, indices: list[int], target: Target,
                        options: VolumeOptions) -> list[InferenceResult]:
        """Forced-answer segmentation of slices, `batch_size` at a time (cancel is checked between batches);
        the slices are prepared ahead while the model computes the batch before."""
        task = self._work(source, options)
        processor = self.engine.processor
        answer = self._answers.get(target.query, options.answer)
        task.slices.schedule(indices)
        results = []
        for start in range(0, len(indices), options.batch_size):
            self._check_cancel()
            chunk = indices[start:start + options.batch_size]
            keys = [source.feature_key(i, task.budget) for i in chunk]
            prepared = [task.slices.get(i) for i in chunk]
            with task.host.work(PREPROCESS, critical=True):
                for n, (index, key) in enumerate(zip(chunk, keys)):
                    if prepared[n].sam2_pixel_values is None and key not in task.features:  # evicted meanwhile
                        prepared[n] = processor.prepare_image(source.gray(index), task.budget)
                inputs = [processor.inputs_for(p, target.query, answer) for p in prepared]
            results += self.engine.segment_inputs(inputs, target.query, answer, options.mask_upsampling,
                                                  feature_keys=keys, feature_cache=task.features, host=task.host)
            task.host.count(len(chunk))
        return results

    def _source(self, volume: Volume, window: Window, plane: str) -> SliceSource:
        """One SliceSource per window of the job (several only with per-target `clinical` windows)."""
        if window not in self._sources:
            self._sources[window] = SliceSource(volume, plane, window)
        return self._sources[window]

    # ------------------------------------------------------------------------------------------ entry

    def run(self, volume: Volume, prompt: str, task: str = "segment", options: VolumeOptions | None = None) -> VolumeResult:
        options = options or VolumeOptions()
        if task not in TASKS:
            raise InputError(f"unknown volume task {task!r}; use one of {', '.join(TASKS)}")
        if task != "report" and (not isinstance(prompt, str) or not prompt.strip()):
            raise InputError("the prompt is empty; say what to find, e.g. 'segment the liver'")
        targets = parse_targets(prompt) if task == "segment" else detection_targets(prompt) if task == "detect" else []
        self._sources, self._answers = {}, {}
        windows = WindowChoice(options.window, volume.modality, volume.voxels)
        source = self._source(volume, windows.for_target(targets[0].name if targets else prompt or ""), options.plane)
        slice_range = options.validate(source.depth)
        result = VolumeResult(task=task, prompt=prompt, case=volume.name, labels=np.zeros(volume.shape, np.uint8),
                              random_weights=self.engine.loaded.random_weights, source=source,
                              settings={"mode": options.mode, "plane": options.plane, "window": source.window.__dict__,
                                        "slice_range": list(slice_range), "modality": volume.modality,
                                        "orientation": "model: SA-Med2D array order; previews: radiological",
                                        "presence": options.presence_rule().describe(),
                                        "object_score_suppression": options.object_score_suppression,
                                        "answer_mode": options.answer_mode, "mask_upsampling": options.mask_upsampling})
        if windows.per_target and targets:
            result.settings["windows"] = {t.name: windows.for_target(t.name).__dict__ for t in targets}
        started = time.perf_counter()
        with worker_pool(self.workers) as pool:
            self._task = TaskWork(source, self._budget("segment", options), self._feature_cache(),
                                  HostStats(), pool, self.prefetch_depth)
            counted = (self._task.features.hits, self._task.features.misses)  # a shared cache has earlier counts
            self._other_work = {}
            try:
                if task == "segment":
                    self._run_segment(volume, windows, targets, options, slice_range, result)
                elif task == "detect":
                    self._run_detect(volume, windows, targets, options, slice_range, result)
                else:
                    self._run_report(source, prompt, options, slice_range, result)
            except Cancelled:
                raise JobCancelled("cancelled by the user") from None
            finally:
                work, self._task = self._task, None
                for each in [work, *self._other_work.values()]:
                    if each.slices is not None:
                        each.slices.cancel()
                self._other_work = {}
                for each in self._sources.values():
                    each.forget_slices()
        result.timings["host"] = work.host.summary()
        result.timings["sam2_features"] = work.features.describe() | {"hits": work.features.hits - counted[0],
                                                                       "misses": work.features.misses - counted[1]}
        result.timings["total_s"] = round(time.perf_counter() - started, 3)
        self.progress("done", 1.0, f"{task} finished in {result.timings['total_s']:.1f} s")
        return result

    # ------------------------------------------------------------------------------------------ segment

    def _run_segment(self, volume, windows: WindowChoice, targets: list[Target], options: VolumeOptions, slice_range,
                     result: VolumeResult):
        if len(targets) > 254:
            raise InputError("at most 254 targets per prompt")
        for number, target in enumerate(targets, start=1):
            source = self._source(volume, windows.for_target(target.name), options.plane)
            stage = f"{target.name} ({number}/{len(targets)})"
            segment = Segment(label=number, name=target.name, query=target.query, mask=np.zeros(volume.shape, bool),
                              key_slice=None, key_score=0.0, answer=options.answer)
            self._segment_target(source, target, options, slice_range, stage, result.timings, segment)
            host = self._work(source, options).host
            with host.phase("finish"), host.work(POSTPROCESS, critical=True):
                mask = postprocess(segment.mask, source.orientation.slice_axis, options)
            segment.mask = mask
            segment.slices = sorted(set(np.nonzero(mask.any(axis=tuple(
                a for a in range(3) if a != source.orientation.slice_axis)))[0].tolist()))
            self._measure(segment, source)
            result.segments.append(segment)
            if not mask.any():
                segment.reason = (f"no slice whose mask logits show the target"
                                  f"{'' if options.presence == 'mask' else ' under the ' + options.presence + ' rule'}")
                result.problems.append(f"{target.name}: not found ({segment.reason})")
        result.labels = multilabel(result.segments, volume.shape)   # a view; each segment keeps its own mask
        result.findings = [segment_finding(s) for s in result.segments]

    def _segment_target(self, source, target: Target, options, slice_range, stage: str, timings: dict,
                        segment: Segment) -> None:
        """Fills `segment` (mask, key slice and score, the answer used)."""
        step = time.perf_counter()
        rule = options.presence_rule()
        host = self._work(source, options).host
        if options.mode == "per-slice":
            if options.answer_mode == "free":
                self._choose_answer(source, target, (slice_range[0] + slice_range[1] - 1) // 2, None, options, segment)
            with host.phase("per_slice"):
                slices = self._per_slice(source, target, options, slice_range, stage, segment.mask)
            timings[f"per_slice_s[{target.name}]"] = round(time.perf_counter() - step, 3)
            if slices:
                segment.key_slice, segment.key_score, evidence = max(slices, key=lambda item: item[1])
                segment.key_evidence = evidence.to_dict()
            return
        with host.phase("key_slice_search"):
            key, key_result, score = self.find_key_slice(source, target, options, slice_range, stage)
        timings[f"key_slice_search_s[{target.name}]"] = round(time.perf_counter() - step, 3)
        if key is None:
            return
        if options.answer_mode == "free":
            key_result = self._choose_answer(source, target, key, key_result, options, segment)
            score = rule.score(Evidence.from_result(key_result))
        segment.key_slice, segment.key_score = key, score
        segment.key_evidence = Evidence.from_result(key_result).to_dict()
        step = time.perf_counter()
        anchors = {key: key_result}
        propagated = self._propagate(source, anchors, options, slice_range, stage)
        if options.mode == "hybrid":
            propagated = self._reanchor(source, target, anchors, propagated, options, slice_range, stage)
        for index, item in propagated.items():
            if item.present:
                source.orientation.put_slice(segment.mask, index, item.mask)
        timings[f"propagation_s[{target.name}]"] = round(time.perf_counter() - step, 3)

    def _choose_answer(self, source, target: Target, index: int, forced_result, options, segment: Segment):
        """Free generation on slice `index`: its text becomes the target's forced answer when it has a [SEG]
        (cached for the run). Returns the result to use on that slice."""
        budget = self._budget("segment", options)
        self._check_cancel()
        generated = self.engine.run(source.gray(index), target.query, task="segment", answer=None,
                                    min_pixels=budget.min_pixels, max_pixels=budget.max_pixels,
                                    max_new_tokens=options.max_new_tokens, mask_upsampling=options.mask_upsampling)
        segment.answer_source = "forced"
        if not (SEG_TOKEN in generated.text and generated.masks):
            segment.answer_note = (f"the model's own answer on slice {index} had no {SEG_TOKEN} "
                                   f"({generated.text[:200]!r}); {options.answer!r} was forced instead")
            return forced_result
        if forced_result is not None and not options.presence_rule().present(Evidence.from_result(generated)):
            segment.answer_note = (f"the model's own answer on key slice {index} ({generated.text[:200]!r}) gives a mask "
                                   f"that does not show the target; {options.answer!r} was forced instead")
            return forced_result
        self._answers[target.query] = generated.text
        segment.answer, segment.answer_source = generated.text, "generated"
        segment.answer_note = f"the model's own answer on slice {index}, forced on the other slices"
        return generated

    def find_key_slice(self, source, target, options, slice_range, stage):
        """Coarse-to-fine search for the slice where the target is found most confidently.

        A candidate counts when the presence rule accepts its mask; the best one must also have a neighbouring
        slice that shows the target (else it is an isolated blip and the next best is tried)."""
        first, last = slice_range
        count = last - first
        rule = options.presence_rule()
        candidates = sorted({first + int(round((n + 0.5) * count / options.key_candidates)) for n in range(options.key_candidates)}
                            if count > options.key_candidates else set(range(first, last)))
        candidates = [c for c in candidates if first <= c < last]
        scored: dict[int, tuple[float, InferenceResult]] = {}

        def score(indices: list[int]) -> None:
            fresh = [i for i in dict.fromkeys(indices) if i not in scored and first <= i < last]
            for index, result in zip(fresh, self._segment_slices(source, fresh, target, options)):
                scored[index] = (rule.score(Evidence.from_result(result)), result)
                self.progress(f"key slice: {stage}", min(len(scored) / (len(candidates) + 6), 0.99),
                              f"slice {index}: score {scored[index][0]:.3f}")

        score(candidates)
        step = max(1, count // (2 * options.key_candidates))
        while step >= 1:
            best = max(scored, key=lambda i: scored[i][0])
            score([best - step, best + step])
            step //= 2
        for best in sorted((i for i in scored if scored[i][0] > 0), key=lambda i: -scored[i][0])[:3]:
            if rule.neighbour_support and count > 1:
                score([best - 1, best + 1])
                if not any(scored.get(n, (0.0,))[0] > 0 for n in (best - 1, best + 1)):
                    continue
            return best, scored[best][1], scored[best][0]
        return None, None, 0.0

    def _key_mask(self, result: InferenceResult, size: int) -> np.ndarray:
        """The key-slice mask in SAM2's square frame: the low-res logits upsampled like SAM2 itself does."""
        logits = torch.from_numpy(result.masks[0].low_res_logits)[None, None]
        return (F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)[0, 0] > 0).numpy()

    def _propagate(self, source, anchors: dict, options, slice_range, stage) -> dict[int, PropagatedSlice]:
        first, last = slice_range
        grounding = self.engine.model.grounding_encoder
        size = grounding.image_size
        task = self._work(source, options)
        frames = SliceFrames(source.gray, first, last - first, task.budget, size, prep=self.engine.processor.fast,
                             pool=task.pool, depth=max(2, task.depth // 2), host=task.host, features=task.features,
                             feature_key=lambda index: source.feature_key(index, task.budget))
        predictor = self.engine.video_predictor()
        frame_anchors = {index - first: self._key_mask(result, size) for index, result in anchors.items()}
        progress = lambda done, total: self.progress(f"propagation: {stage}", min(done / max(total, 1), 0.99),  # noqa: E731
                                                     f"{done} slices")
        rule = options.presence_rule()
        with task.host.phase("propagation"):
            propagated = propagate(predictor, frames, source.height, source.width, frame_anchors,
                                   stop_after_empty=options.stop_after_empty,
                                   autocast=grounding._autocast(next(predictor.parameters()).device),
                                   on_slice=progress, should_cancel=self.should_cancel,
                                   presence=lambda logits, object_score: rule.present(
                                       Evidence.from_logits(logits, object_score)),
                                   mask_upsampling=options.mask_upsampling,
                                   suppress_absent_objects=options.object_score_suppression)
        return {first + frame: item for frame, item in propagated.items()}

    def _reanchor(self, source, target, anchors, propagated, options, slice_range, stage):
        """Where propagation lost the target, ask Citrus-V again; a mask the presence rule accepts becomes a new
        anchor (it lies next to a slice that shows the target, so it has a neighbour's support)."""
        with self._work(source, options).host.phase("reanchor"):
            return self._reanchor_rounds(source, target, anchors, propagated, options, slice_range, stage)

    def _reanchor_rounds(self, source, target, anchors, propagated, options, slice_range, stage):
        first, last = slice_range
        rule = options.presence_rule()
        for _ in range(8):  # each round adds at most one anchor per direction
            found = [i for i, item in propagated.items() if item.present]
            if not found:
                break
            new = {}
            for edge, direction in ((max(found), 1), (min(found), -1)):
                probe = edge + direction
                if first <= probe < last and probe not in anchors:
                    result = self._segment_slice(source, probe, target, options)
                    if rule.present(Evidence.from_result(result)):
                        new[probe] = result
            if not new:
                break
            anchors.update(new)
            propagated = self._propagate(source, anchors, options, slice_range, stage)
        return propagated

    def _per_slice(self, source, target, options, slice_range, stage, mask: np.ndarray):
        """Every slice alone; a slice counts when the presence rule accepts it and a neighbour agrees."""
        first, last = slice_range
        rule = options.presence_rule()
        indices = list(range(first, last))
        evidence: dict[int, Evidence | None] = {}
        masks: dict[int, np.ndarray] = {}
        task = self._work(source, options)
        host = task.host
        task.slices.schedule(indices)
        for start in range(0, len(indices), options.batch_size):
            chunk = indices[start:start + options.batch_size]
            for index, result in zip(chunk, self._segment_slices(source, chunk, target, options)):
                with host.work(POSTPROCESS, critical=True):
                    evidence[index] = Evidence.from_result(result)
                    if rule.present(evidence[index]):
                        masks[index] = result.masks[0].mask
            self.progress(f"per-slice: {stage}", (start + len(chunk)) / len(indices), f"slice {chunk[-1]}")
        kept = consistent_slices({i: i in masks for i in indices}, first, last, rule)
        for index in sorted(kept):
            source.orientation.put_slice(mask, index, masks[index])
        return [(index, rule.score(evidence[index]), evidence[index]) for index in sorted(kept)]

    def _measure(self, segment: Segment, source: SliceSource) -> None:
        measure_into(segment, source.volume, source.orientation.slice_axis)

    # ------------------------------------------------------------------------------------------ detect

    def _run_detect(self, volume, windows: WindowChoice, targets: list[Target], options, slice_range,
                    result: VolumeResult):
        """Each target asked with the reference eval's template on `detect_slices` spread slices."""
        first, last = slice_range
        indices = spread(first, last, options.detect_slices)
        budget = self._budget("detect", options)
        step = (last - first) / max(len(indices), 1)
        total = len(indices) * len(targets)
        for number, target in enumerate(targets):
            source = self._source(volume, windows.for_target(target.name), options.plane)
            if target.query != target.detect_query():
                result.problems.append(f"{target.query!r} was asked as written: the reference's detection template "
                                       f"needs a target name, e.g. 'the liver' or 'detect the kidneys'")
            per_slice = []
            for done, index in enumerate(indices, start=1):
                self._check_cancel()
                answer = self.engine.run(source.gray(index), target.query, task="detect", min_pixels=budget.min_pixels,
                                         max_pixels=budget.max_pixels, max_new_tokens=options.max_new_tokens)
                per_slice.append((index, answer.boxes))
                result.problems.extend(f"{target.name}, slice {index}: {p}" for p in answer.problems)
                self.progress("detect", (number * len(indices) + done) / total,
                              f"{target.name}, slice {index}: {len(answer.boxes)} box(es)")
            for group in link_boxes(per_slice, max_gap=max(1, math.ceil(step))):
                result.boxes.append(box_to_patient(group, source) | {"target": target.name})
        result.findings = [{"finding": b["label"] or b["target"], "location": detect_location(b["label"] or b["target"]) or "",
                            "laterality": b["laterality"], "slice": b["slices"][0], "segment": ""} for b in result.boxes]

    # ------------------------------------------------------------------------------------------ report

    def _run_report(self, source, prompt, options, slice_range, result: VolumeResult):
        """The reference's chest-radiograph prompt (unless the user gives one) on spread slices, or on a
        radiograph-like projection of the volume; experimental either way (trained on chest X-rays)."""
        budget = self._budget("report", options)
        query = prompt.strip() if prompt and prompt.strip() else REPORT_PROMPT
        result.settings["report_prompt"] = query
        result.settings["report_image"] = options.report_image
        if options.report_image == "projection":
            from .projection import radiograph_projection

            result.experimental = REPORT_EXPERIMENTAL.format(what="projections of CT volumes")
            result.report_image = radiograph_projection(source.volume)
            images = [("projection", result.report_image)]
        else:
            what = f"{source.volume.modality} slices"
            result.experimental = REPORT_EXPERIMENTAL.format(what=what) + \
                (" For a chest CT, --report-image projection shows the model a radiograph-like image."
                 if source.volume.modality.upper() == "CT" else "")
            images = [(index, None) for index in spread(*slice_range, options.report_slices)]
        findings_text, impression_text = [], []
        for done, (where, image) in enumerate(images, start=1):
            self._check_cancel()
            answer = self.engine.run(source.gray(where) if image is None else image, query, task="report",
                                     min_pixels=budget.min_pixels, max_pixels=budget.max_pixels,
                                     max_new_tokens=options.max_new_tokens)
            label = "projection" if image is not None else f"slice {where}"
            report = answer.report
            if report is not None:
                if report.findings_text:
                    findings_text.append(f"[{label}] {report.findings_text}")
                if report.impression_text:
                    impression_text.append(f"[{label}] {report.impression_text}")
                for finding in report.findings:
                    result.findings.append({"finding": finding.text, "location": finding.location or "",
                                            "laterality": finding.laterality or "", "negated": finding.negated,
                                            "slice": where if image is None else None, "segment": ""})
            result.problems.extend(f"{label}: {p}" for p in answer.problems)
            self.progress("report", done / len(images), f"{label} read")
        result.report_findings = "\n".join(findings_text)
        result.report_impression = "\n".join(impression_text)


# ---------------------------------------------------------------------------------------------- pure helpers

def task_budget(task: str, options: VolumeOptions) -> PixelBudget:
    """The Qwen resize bounds of a task's slices: the options' own, else the task's defaults."""
    default = TASK_PIXEL_BUDGETS[task]
    return PixelBudget(options.min_pixels or default.min_pixels, options.max_pixels or default.max_pixels)


def spread(first: int, last: int, count: int) -> list[int]:
    """`count` slice indices spread evenly over [first, last), centred in their bins."""
    count = max(1, min(count, last - first))
    return sorted({first + int((n + 0.5) * (last - first) / count) for n in range(count)})


def measure_into(segment: Segment, volume: Volume, slice_axis: int) -> None:
    """The segment's measurements and laterality, from its own mask (what every output of it carries)."""
    measurements = measure_segment(segment.mask, volume.geometry, volume.voxels, slice_axis)
    segment.measurements = measurements.to_dict()
    segment.laterality = (laterality_of(measurements.centroid_lps, volume.geometry, volume.shape)
                          if segment.mask.any() else None)


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
