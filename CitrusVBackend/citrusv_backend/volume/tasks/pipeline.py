"""Whole-volume tasks on top of the 2D model: segment (key slice + propagation), detect, report.

What the model is shown follows its training data (docs/model-inputs.md): slices normalised per
volume as SA-Med2D did (slices/windowing.py), oriented in its array order (slices/orientation.py), asked with the
reference's own prompts (targets.py; reports: the reference's chest-radiograph prompt).

Segmentation (key slice + propagation): segment.py; detection: detect.py (box geometry in boxes.py);
reports: report.py; conversations about one slice (the ask task): conversation.py. This module holds what they
share and the entry point, `VolumePipeline.run`.

Host work is kept off the model's way (`TaskWork`): each slice is windowed once per task, the slices the
model will ask for next are prepared on worker threads while it computes, and every slice's SAM2 image
features are computed once per task (the key slice's features from the search serve propagation).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...errors import InputError, JobCancelled
from ...inference.engine import CitrusVEngine, InferenceResult
from ...inference.hostwork import PREPROCESS, HostStats, Prefetcher, default_workers, worker_pool
from ...model.feature_cache import SAM2FeatureCache
from ...model.image_prep import PreparedImage
from ...model.processor import PixelBudget
from ..input.io import Volume
from ..options import TASKS, VolumeOptions
from ..slices.slice_source import SliceSource
from ..slices.windowing import Window, WindowChoice
from .detect import DetectTask
from .propagation import Cancelled
from .report import ReportTask
from .results import VolumeResult
from .sampling import task_budget
from .segment import SegmentTask
from .targets import Target, detection_targets, parse_targets

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, float, str], None]


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


class VolumePipeline(SegmentTask, DetectTask, ReportTask):
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
        source = self._source(volume, windows.for_target(targets[0].name if targets else prompt or ""), options.axis)
        slice_range = options.validate(source.depth)
        result = VolumeResult(task=task, prompt=prompt, case=volume.name, labels=np.zeros(volume.shape, np.uint8),
                              random_weights=self.engine.loaded.random_weights, source=source,
                              settings={"mode": options.mode, "axis": options.axis, "window": source.window.__dict__,
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
