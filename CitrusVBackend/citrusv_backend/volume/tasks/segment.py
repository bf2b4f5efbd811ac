"""The segment task of `VolumePipeline` (a mixin: the pipeline's shared steps are on `self`).

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
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InputError
from ...inference.engine import InferenceResult
from ...inference.hostwork import POSTPROCESS
from ...model.processor import SEG_TOKEN
from ..options import VolumeOptions
from ..outputs.overlaps import multilabel
from ..slices.slice_source import SliceSource
from ..slices.windowing import WindowChoice
from .mask_cleanup import postprocess
from .presence import Evidence, consistent_slices
from .propagation import PropagatedSlice, SliceFrames, propagate
from .results import Segment, VolumeResult, measure_into, segment_finding
from .targets import Target


class SegmentTask:
    """Key slice + SAM2 propagation (or per-slice, or hybrid) for each target of the prompt."""

    def _run_segment(self, volume, windows: WindowChoice, targets: list[Target], options: VolumeOptions, slice_range,
                     result: VolumeResult):
        if len(targets) > 254:
            raise InputError("at most 254 targets per prompt")
        for number, target in enumerate(targets, start=1):
            source = self._source(volume, windows.for_target(target.name), options.axis)
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
