"""The detect task of `VolumePipeline` (a mixin): each target asked on spread slices, its boxes linked into 3D
boxes (geometry in boxes.py)."""
from __future__ import annotations

import math

from ...inference.reports import detect_location
from ..slices.windowing import WindowChoice
from .boxes import box_to_patient, link_boxes
from .results import VolumeResult
from .sampling import spread
from .targets import Target


class DetectTask:
    def _run_detect(self, volume, windows: WindowChoice, targets: list[Target], options, slice_range,
                    result: VolumeResult):
        """Each target asked with the reference eval's template on `detect_slices` spread slices."""
        first, last = slice_range
        indices = spread(first, last, options.detect_slices)
        budget = self._budget("detect", options)
        step = (last - first) / max(len(indices), 1)
        total = len(indices) * len(targets)
        for number, target in enumerate(targets):
            source = self._source(volume, windows.for_target(target.name), options.axis)
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
