"""Interactive refinement of a segmented volume: the text gave the first mask, clicks and boxes correct it.

A `RefinementSession` holds one segment of one volume: its mask, the slices the user corrected (they condition
SAM2's memory, as clicked frames do in SAM2's own video tool), the last low-resolution logits of the slices it
touched, and the slices' SAM2 features (`SliceFeatureStore`). A step:

1. the prompts are mapped from IJK onto the display slices they land on (`volume_prompts`);
2. each such slice is decoded by SAM2's own prompt encoder + mask decoder on that slice's features: the points
   (a box as two corner points first), the current mask as the dense prompt (the slice's last logits, else its
   binary mask turned into logits as SAM2 turns mask inputs into logits), and optionally the target's projected
   [SEG] token after the point tokens ("keep the text prompt": the only case that runs the language model, one
   prefill per slice, cached). No language-model call for a plain click;
3. optionally the prompts are enforced: a box confines the mask on its slices, an exclude point never stays
   inside (see `enforce_prompts`);
4. optionally SAM2's video memory re-propagates from the corrected slices in both directions, conditioned on
   them and on the nearest earlier corrections, until the target has ended (no mask, new or old, on
   `stop_after_empty` slices in a row), the next earlier correction, or the slice range's end;
5. only slices whose mask changed are written, and the step is recorded as a crop diff for undo / redo.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..inference.engine import FORCED_SEGMENT_ANSWER, upsample_mask
from ..model.modeling import SAM2Prompts
from ..model.processor import TASK_PIXEL_BUDGETS, PixelBudget
from ..volume.options import RefineOptions  # noqa: F401  (its home was here)
from ..volume.tasks.propagation import PROPAGATION_OBJECT_ID, SliceFrames, frames_as_video, quiet_progress_bars
from .volume_features import SliceFeatureStore
from .volume_history import History, MaskChange, changed_box
from .volume_prompts import EXCLUDE, INCLUDE, RefinePrompts, SlicePrompt, box_mask, prompts_by_slice

# SAM2 turns a binary mask input into logits this way (`SAM2Base._use_mask_as_output`).
MASK_LOGIT_SCALE, MASK_LOGIT_BIAS = 20.0, -10.0
# SAM2's video predictor clamps previous logits before feeding them back as a mask prompt.
MASK_PROMPT_CLAMP = 32.0


@dataclass
class RefineOutcome:
    """What a step (refine, undo or redo) changed."""

    kind: str
    step: MaskChange | None              # None: no voxel changed
    version: int
    crop: np.ndarray | None = None       # the mask over step.box after the step
    refined_slices: list[int] = field(default_factory=list)
    propagated_slices: list[int] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def changed_slices(self) -> list[int]:
        return self.step.slices if self.step is not None else []


class RefinementSession:
    """One segment of one volume under refinement. Thread-safe: steps and reads take the session's lock."""

    def __init__(self, engine, source, mask: np.ndarray, query: str | None = None,
                 slice_range: tuple[int, int] | None = None, budget: PixelBudget | None = None,
                 answer: str = FORCED_SEGMENT_ANSWER, anchors=(), features: SliceFeatureStore | None = None,
                 max_history: int = 64):
        if mask.shape != source.volume.shape:
            raise InputError(f"the mask has shape {list(mask.shape)}, the volume {list(source.volume.shape)}")
        self.engine = engine
        self.source = source
        self.orientation = source.orientation
        self.mask = np.array(mask, dtype=bool)
        self.voxels = int(self.mask.sum())   # kept up to date by each step (no full-volume count per click)
        self.query = query
        self.answer = answer
        self.slice_range = slice_range or (0, source.depth)
        self.budget = budget or TASK_PIXEL_BUDGETS["segment"]
        self._owns_features = features is None
        self.features = features or SliceFeatureStore(engine, source, self.budget)
        self.anchors: set[int] = {int(a) for a in anchors if self.slice_range[0] <= int(a) < self.slice_range[1]}
        self.history = History(max_steps=max_history)
        self._logits: dict[int, torch.Tensor] = {}   # slice -> [1, 1, 256, 256] last low-res logits
        self._seg_tokens: dict[int, torch.Tensor] = {}
        self.lock = threading.RLock()

    # ------------------------------------------------------------------------------------------ reads

    @property
    def version(self) -> int:
        return self.history.version

    @property
    def nbytes(self) -> int:
        logits = sum(t.numel() * t.element_size() for t in self._logits.values())
        return int(self.mask.nbytes + self.history.nbytes + logits)

    def slice_mask(self, index: int) -> np.ndarray:
        return self.orientation.slice(self.mask, index)

    def describe(self) -> dict:
        with self.lock:
            axes = tuple(a for a in range(3) if a != self.orientation.slice_axis)
            slices = np.nonzero(self.mask.any(axis=axes))[0].tolist()
            # slice_axis_ijk: which voxel index (i 0, j 1, k 2) numbers the slices, so a client can group its points.
            return {"voxels": self.voxels, "slices": slices, "anchors": sorted(self.anchors),
                    "slice_axis_ijk": 2 - self.orientation.slice_axis,
                    "slice_range": list(self.slice_range), "cached_feature_slices": self.features.cached_slices,
                    "query": self.query} | self.history.describe()

    # ------------------------------------------------------------------------------------------ steps

    def refine(self, prompts: RefinePrompts, options: RefineOptions | None = None) -> RefineOutcome:
        options = options or RefineOptions()
        options.validate()
        if not prompts:
            raise InputError("a refinement needs at least one point or a box")
        if options.keep_text and not self.query:
            raise InputError("keep_text needs the segment's text prompt (query); give it when the session starts")
        with self.lock, torch.inference_mode():
            started = time.perf_counter()
            timings: dict = {}
            per_slice = prompts_by_slice(prompts, self.orientation, self.source.volume.shape, self.slice_range)
            encoded = self.features.encoded
            corrected: dict[int, np.ndarray] = {}
            for index, slice_prompt in per_slice.items():
                corrected[index] = self._decode_slice(slice_prompt, options, timings)
            propagated: dict[int, np.ndarray] = {}
            if options.propagate:
                step = time.perf_counter()
                propagated = self._repropagate(corrected, options)
                timings["propagation_s"] = time.perf_counter() - step
            timings["encoded_slices"] = self.features.encoded - encoded
            outcome = self._apply("refine", {**propagated, **corrected}, self.anchors | set(corrected))
            outcome.refined_slices, outcome.propagated_slices = sorted(corrected), sorted(propagated)
            timings["total_s"] = time.perf_counter() - started
            outcome.timings = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in timings.items()}
            return outcome

    def undo(self) -> RefineOutcome | None:
        with self.lock:
            step = self.history.take_undo()
            return None if step is None else self._restore(step, "before", "undo")

    def redo(self) -> RefineOutcome | None:
        with self.lock:
            step = self.history.take_redo()
            return None if step is None else self._restore(step, "after", "redo")

    def bounding_crop(self) -> tuple[tuple[int, int, int], np.ndarray] | None:
        """(offset, the mask's voxels in its bounding box), or None for an empty mask."""
        with self.lock:
            from scipy import ndimage

            found = ndimage.find_objects(self.mask.astype(np.uint8))
            if not found or found[0] is None:
                return None
            box = found[0]
            return tuple(int(s.start) for s in box), self.mask[box].copy()

    # ------------------------------------------------------------------------------------------ decoding

    def _decode_slice(self, prompt: SlicePrompt, options: RefineOptions, timings: dict) -> np.ndarray:
        grounding = self.engine.model.grounding_encoder
        height, width = self.source.height, self.source.width
        step = time.perf_counter()
        features = self.features.features(prompt.index)
        _add(timings, "features_s", time.perf_counter() - step)
        language = None
        if options.keep_text:
            step = time.perf_counter()
            language = self._seg_token(prompt.index)
            _add(timings, "language_model_s", time.perf_counter() - step)
        step = time.perf_counter()
        points = prompt.sam2_points(height, width, grounding.image_size)
        coords, labels = points if points is not None else (None, None)
        mask_logits = self._mask_prompt(prompt.index) if options.mask_prompt else None
        prediction = grounding.decode(features, SAM2Prompts(coords, labels, mask_logits, language))
        low_res = prediction.low_res_logits[:1]
        mask = upsample_mask(low_res, (height, width), "bilinear")[0].cpu().numpy()
        if options.enforce_prompts:
            mask = enforce_prompts(mask, prompt)
        self._logits[prompt.index] = low_res[:, None].detach().to("cpu", torch.float32)
        _add(timings, "decode_s", time.perf_counter() - step)
        return mask

    def _mask_prompt(self, index: int) -> torch.Tensor | None:
        """[1, 1, 256, 256]: the slice's last logits (clamped, as SAM2's video predictor does), else its binary
        mask as logits (SAM2's own mask-to-logits mapping, downsampled with antialiasing); None for no mask."""
        logits = self._logits.get(index)
        if logits is not None:
            return torch.clamp(logits, -MASK_PROMPT_CLAMP, MASK_PROMPT_CLAMP)
        current = self.slice_mask(index)
        if not current.any():
            return None
        size = self.engine.model.grounding_encoder.sam2_model.sam_prompt_encoder.mask_input_size
        as_logits = torch.from_numpy(current).float()[None, None] * MASK_LOGIT_SCALE + MASK_LOGIT_BIAS
        return F.interpolate(as_logits, size=size, mode="bilinear", align_corners=False, antialias=True)

    def _seg_token(self, index: int) -> torch.Tensor:
        token = self._seg_tokens.get(index)
        if token is None:
            token = self.engine.seg_embeddings(self.source.rgb(index), self.query, self.answer, self.budget)[:1]
            self._seg_tokens[index] = token
        return token

    # ------------------------------------------------------------------------------------------ propagation

    def _repropagate(self, corrected: dict[int, np.ndarray], options: RefineOptions) -> dict[int, np.ndarray]:
        """New display masks of the slices SAM2's memory reaches from the corrected slices."""
        first, last = self.slice_range
        low, high = min(corrected), max(corrected)
        earlier = [a for a in self.anchors if a not in corrected]
        below = max((a for a in earlier if a < low), default=None)
        above = min((a for a in earlier if a > high), default=None)
        predictor = self.engine.video_predictor()
        grounding = self.engine.model.grounding_encoder
        device = next(predictor.parameters()).device
        frames = SliceFrames(self.source.rgb, first, last - first, self.budget, grounding.image_size)
        results: dict[int, np.ndarray] = {}
        with self.features.serving(predictor, first), grounding._autocast(device), quiet_progress_bars():
            with frames_as_video(frames, self.source.height, self.source.width):
                state = predictor.init_state(video_path=None, offload_video_to_cpu=True,
                                             offload_state_to_cpu=device.type != "cpu")
            conditioning = dict(corrected)
            for anchor in (below, above):
                if anchor is not None:
                    conditioning[anchor] = self.slice_mask(anchor)
            for index in sorted(conditioning):
                predictor.add_new_mask(state, frame_idx=index - first, obj_id=PROPAGATION_OBJECT_ID,
                                       mask=self._anchor_mask(index, conditioning[index]))
            forward_end = (above - 1) if above is not None else last - 1
            backward_end = (below + 1) if below is not None else first
            if options.max_propagation_slices is not None:
                forward_end = min(forward_end, high + options.max_propagation_slices)
                backward_end = max(backward_end, low - options.max_propagation_slices)
            self._run_direction(predictor, state, low, forward_end, False, high, set(conditioning), options, results)
            if low > backward_end:
                self._run_direction(predictor, state, low, backward_end, True, low, set(conditioning), options,
                                    results)
            predictor.reset_state(state)
        return results

    def _anchor_mask(self, index: int, display_mask: np.ndarray) -> torch.Tensor:
        """The conditioning mask: the slice's logits upsampled to SAM2's frame when known (as the pipeline's key
        slice), else its display mask (SAM2 resizes it itself)."""
        logits = self._logits.get(index)
        if logits is None:
            return torch.from_numpy(np.ascontiguousarray(display_mask))
        size = self.engine.model.grounding_encoder.image_size
        return F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0] > 0

    def _run_direction(self, predictor, state, start: int, end: int, reverse: bool, edge: int, conditioning: set,
                       options: RefineOptions, results: dict) -> None:
        """Track from `start` to `end` (inclusive); beyond `edge` (the outermost corrected slice) stop once the
        target has ended."""
        first = self.slice_range[0]
        outputs = state["output_dict_per_obj"][0]["non_cond_frame_outputs"]
        empty_run = 0
        for frame, _, video_masks in predictor.propagate_in_video(state, start_frame_idx=start - first,
                                                                  max_frame_num_to_track=abs(end - start),
                                                                  reverse=reverse):
            index = first + frame
            if index in conditioning:
                continue
            new = (video_masks[0, 0] > 0).cpu().numpy()
            results[index] = new
            if frame in outputs:
                self._logits[index] = outputs[frame]["pred_masks"].detach().to("cpu", torch.float32)
            if (index < edge) if reverse else (index > edge):
                empty_run = empty_run + 1 if not new.any() and not self.slice_mask(index).any() else 0
                if empty_run >= options.stop_after_empty:
                    break

    # ------------------------------------------------------------------------------------------ writing

    def _apply(self, kind: str, new_slices: dict[int, np.ndarray], anchors_after: set[int]) -> RefineOutcome:
        changes = {index: self.slice_mask(index) != mask for index, mask in new_slices.items()}
        changes = {index: changed for index, changed in changes.items() if changed.any()}
        anchors_before = frozenset(self.anchors)
        self.anchors = set(anchors_after)
        box = changed_box(self.orientation, self.mask.shape, changes)
        if box is None:
            return RefineOutcome(kind, None, self.history.version)
        before = self.mask[box].copy()
        for index in changes:
            self.orientation.put_slice(self.mask, index, new_slices[index])
        after = self.mask[box].copy()
        self.voxels += int(after.sum()) - int(before.sum())
        step = MaskChange(tuple(int(s.start) for s in box), tuple(after.shape), np.packbits(before), np.packbits(after),
                          sorted(changes), anchors_before, frozenset(self.anchors), kind)
        self.history.record(step)
        return RefineOutcome(kind, step, self.history.version, crop=after)

    def _restore(self, step: MaskChange, which: str, kind: str) -> RefineOutcome:
        voxels = step.unpack(which)
        self.voxels += int(voxels.sum()) - int(self.mask[step.box].sum())
        self.mask[step.box] = voxels
        self.anchors = set(step.anchors_before if which == "before" else step.anchors_after)
        for index in step.slices:  # their logits belong to the state being left
            self._logits.pop(index, None)
        return RefineOutcome(kind, step, self.history.version, crop=voxels.copy())

    def close(self) -> None:
        """Free the features if this session made them (a shared store belongs to its owner)."""
        if self._owns_features:
            self.features.close()


def _add(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


# ---------------------------------------------------------------------------------------------- prompts

def enforce_prompts(mask: np.ndarray, prompt: SlicePrompt) -> np.ndarray:
    """Make a slice's mask obey its prompts where SAM2 did not.

    A box confines: nothing outside it stays. An exclude point never stays inside: the connected region that
    still holds it is split between it and the include points in the same region (each pixel goes to the
    nearest point); with no include point there, between it and the region's centre (its deepest pixel), and
    when it is that centre the region goes. With trained weights SAM2 mostly does this itself.
    """
    from scipy import ndimage

    mask = mask.copy()
    if prompt.box is not None:
        mask &= box_mask(prompt.box, *mask.shape)
    includes = [(y, x) for x, y, label in prompt.points if label == INCLUDE]
    for x, y, label in prompt.points:
        if label != EXCLUDE:
            continue
        row, col = _pixel(y, mask.shape[0]), _pixel(x, mask.shape[1])
        if not mask[row, col]:
            continue
        regions, _ = ndimage.label(mask)
        region = regions == regions[row, col]
        sites = [(r, c) for r, c in includes if region[_pixel(r, mask.shape[0]), _pixel(c, mask.shape[1])]]
        if not sites:
            depth = ndimage.distance_transform_edt(region)
            centre = np.unravel_index(int(np.argmax(depth)), depth.shape)
            if np.hypot(centre[0] - y, centre[1] - x) < 1.0:
                mask[region] = False
                continue
            sites = [centre]
        rows, cols = np.nonzero(region)
        to_exclude = np.hypot(rows - y, cols - x)
        to_include = np.min([np.hypot(rows - r, cols - c) for r, c in sites], axis=0)
        drop = to_exclude < to_include
        mask[rows[drop], cols[drop]] = False
        mask[row, col] = False
    return mask


def _pixel(value: float, size: int) -> int:
    return min(max(math.floor(value + 0.5), 0), size - 1)
