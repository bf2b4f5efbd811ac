"""Propagating a key-slice mask through a volume with SAM2's video memory (slices as frames, in memory).

The frames are the volume's slices in the model's orientation, preprocessed exactly like the key slice's SAM2 input
(Qwen smart-resize, LANCZOS stretch to the SAM2 size, ImageNet normalisation) and computed lazily, so a
300-slice volume never holds 300 x 3 x 1024 x 1024 floats: a few frames ahead of SAM2 are prepared on worker
threads while it computes the current one. Propagation runs from the key slice forward and backward and
stops in each direction once the target has been absent for `stop_after_empty` slices.

SAM2's own video predictor blanks a slice's mask whenever its object-score logit is negative; Citrus-V never
trained that head, so the suppression is off unless asked (`suppress_absent_objects`) and presence is judged
by the caller's rule on the slice's 256x256 mask logits (see presence.py).

With a feature cache, a frame whose SAM2 image features are already known (the key slice, encoded by the
key-slice search; every frame of an earlier propagation of the same task) is not encoded again, and the
frames SAM2 encodes are kept for the next propagation.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np
import torch

from ...inference.hostwork import POSTPROCESS, HostStats, Prefetcher
from ...model.feature_cache import SAM2FeatureCache, split_backbone
from ...model.image_prep import FastImagePrep
from ...model.processor import PixelBudget, smart_resize

PROPAGATION_OBJECT_ID = 1


class SliceFrames:
    """Read-only sequence of SAM2 input tensors [3, S, S] for slices `first .. first + count - 1`.

    `slice_pixels(index)`: the slice as uint8 (gray or RGB). With `pool`, frames in the order `expect` names are
    prepared ahead (at most `depth` held); with `features` and `feature_key(index)`, frames whose SAM2
    features are cached are skipped, and propagation reuses and fills the cache."""

    def __init__(self, slice_pixels: Callable[[int], np.ndarray], first: int, count: int, budget: PixelBudget,
                 size: int, prep: FastImagePrep | None = None, pool=None, depth: int = 3, host: HostStats | None = None,
                 features: SAM2FeatureCache | None = None, feature_key: Callable[[int], Hashable] | None = None):
        self.slice_pixels = slice_pixels
        self.first = first
        self.count = count
        self.budget = budget
        self.size = size
        self.prep = prep or FastImagePrep(None, size)
        self.host = host
        self.features = features
        self.feature_key = feature_key
        self._ahead = Prefetcher(self._prepare, pool, depth, host)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, frame: int) -> torch.Tensor:
        if not 0 <= frame < self.count:
            raise IndexError(frame)
        return self._ahead.get(frame)

    def _prepare(self, frame: int) -> torch.Tensor:
        pixels = self.slice_pixels(self.first + frame)
        height, width = smart_resize(*pixels.shape[:2], min_pixels=self.budget.min_pixels, max_pixels=self.budget.max_pixels)
        return self.prep.prepare(pixels, height, width, qwen=False).sam2_pixel_values[0]

    def key_of(self, frame: int) -> Hashable | None:
        return None if self.feature_key is None else self.feature_key(self.first + frame)

    def cached(self, frame: int) -> bool:
        return self.features is not None and self.key_of(frame) in self.features

    def expect(self, order) -> None:
        """SAM2 will ask for these frames next, in this order: prepare the ones it will not find cached."""
        self._ahead.cancel()
        self._ahead.schedule(f for f in order if not self.cached(f))

    def stop(self) -> None:
        self._ahead.cancel()


@contextmanager
def reuse_image_features(predictor, frames: SliceFrames):
    """SAM2's per-frame image features from `frames.features` when there, kept there when computed; and no
    warm-up encoding of frame 0 in `init_state` (its result is never used: the one-frame cache is replaced by
    the first anchor's features)."""
    original = predictor._get_image_feature
    warming = {"on": True}

    def get_image_feature(inference_state, frame_idx, batch_size):
        if warming["on"]:
            return None
        cache, key = frames.features, frames.key_of(frame_idx)
        computed = False
        if cache is not None and frame_idx not in inference_state["cached_features"]:
            found = cache.get(key)
            if found is not None:
                # The predictor never reads the cached image itself, only expands it to the batch size.
                placeholder = torch.zeros((), device=found.fpn[0].device).expand(1, 3, frames.size, frames.size)
                inference_state["cached_features"] = {frame_idx: (placeholder, found.as_backbone_out())}
            else:
                computed = True
        features = original(inference_state, frame_idx, batch_size)
        if computed:
            cache.put(key, split_backbone(inference_state["cached_features"][frame_idx][1])[0])
        return features

    predictor._get_image_feature = get_image_feature
    try:
        yield warming
    finally:
        del predictor._get_image_feature  # the class's method again


@contextmanager
def frames_as_video(frames: SliceFrames, height: int, width: int):
    """Let `SAM2VideoPredictor.init_state` take our in-memory frames instead of a JPEG folder or an mp4."""
    import sam2.sam2_video_predictor as video_module

    original = video_module.load_video_frames
    video_module.load_video_frames = lambda **_: (frames, height, width)
    try:
        yield
    finally:
        video_module.load_video_frames = original


@contextmanager
def quiet_progress_bars():
    """SAM2 draws its own tqdm bars on stderr; our progress callback reports instead."""
    import sam2.sam2_video_predictor as video_module

    original = video_module.tqdm
    video_module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        video_module.tqdm = original


@dataclass
class PropagatedSlice:
    mask: np.ndarray      # [H, W] bool in the slices' orientation
    logits_max: float     # the strongest logit: below 0 means SAM2 sees no target here
    present: bool         # the caller's presence rule on the 256x256 logits (default: any positive pixel)
    object_score: float   # SAM2's object-score logit for the slice (reported)


PresenceTest = Callable[[np.ndarray, float], bool]   # (256x256 logits, object score) -> target present


class Cancelled(Exception):
    """Raised inside long loops when the caller asked to stop."""


@contextmanager
def object_score_suppression(predictor, enabled: bool):
    """SAM2's blanking of masks with a negative object score, on or off for one run (see model/sam2_video.py)."""
    previous = predictor.suppress_absent_objects
    predictor.suppress_absent_objects = enabled
    try:
        yield
    finally:
        predictor.suppress_absent_objects = previous


def propagate(predictor, frames: SliceFrames, height: int, width: int, anchors: dict[int, np.ndarray],
              stop_after_empty: int = 2, autocast=None, on_slice: Callable[[int, int], None] | None = None,
              should_cancel: Callable[[], bool] | None = None, presence: PresenceTest | None = None,
              mask_upsampling: str = "bilinear", suppress_absent_objects: bool = False) -> dict[int, PropagatedSlice]:
    """Masks per frame index, from `anchors` (frame -> key mask [S, S] bool in the SAM2 frame).

    Each anchor conditions SAM2's memory; tracking starts at the earliest anchor going forward and at the
    latest going backward, and stops after `stop_after_empty` consecutive slices without the target beyond
    all anchors. `mask_upsampling`: "bilinear" (SAM2's own upsampling of the logits) or "nearest" (the
    reference clients' nearest resize of the 256x256 binary mask).
    """
    device = next(predictor.parameters()).device
    autocast = autocast or torch.autocast("cuda", enabled=False)
    host = frames.host
    results: dict[int, PropagatedSlice] = {}
    with torch.inference_mode(), autocast, quiet_progress_bars(), \
            object_score_suppression(predictor, suppress_absent_objects), \
            reuse_image_features(predictor, frames) as warming:
        try:
            with frames_as_video(frames, height, width):
                state = predictor.init_state(video_path=None, offload_video_to_cpu=True,
                                             offload_state_to_cpu=device.type != "cpu")
            warming["on"] = False
            for frame, mask in sorted(anchors.items()):
                predictor.add_new_mask(state, frame_idx=frame, obj_id=PROPAGATION_OBJECT_ID, mask=torch.as_tensor(mask))
            done = 0
            for reverse in (False, True):
                start = (max if reverse else min)(anchors)
                frames.expect(range(start - 1, -1, -1) if reverse else range(start + 1, len(frames)))
                empty_run = 0
                for frame, _, logits in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                    if should_cancel and should_cancel():
                        raise Cancelled()
                    if host and logits.is_cuda:
                        torch.cuda.synchronize(logits.device)  # the model's own time is not host time
                    with host.work(POSTPROCESS, critical=True) if host else nullcontext():
                        results[frame] = tracked_slice(predictor, state, frame, logits, (height, width), presence,
                                                       mask_upsampling)
                    done += 1
                    if host:
                        host.count()
                    if on_slice:
                        on_slice(done, len(frames))
                    beyond_anchors = frame < min(anchors) if reverse else frame > max(anchors)
                    empty_run = empty_run + 1 if (beyond_anchors and not results[frame].present) else 0
                    if empty_run >= stop_after_empty:
                        break
        finally:
            frames.stop()
    return results


def tracked_slice(predictor, state: dict, frame: int, logits: torch.Tensor, size: tuple[int, int],
                  presence: PresenceTest | None, mask_upsampling: str) -> PropagatedSlice:
    """One propagated frame: its mask (upsampled as asked), presence and object score."""
    from ...inference.engine import upsample_mask

    scores = logits[0, 0].float()
    low_res = predictor.last_low_res_masks[0, 0].float().cpu()
    if mask_upsampling == "nearest":
        mask = upsample_mask(low_res[None], size, "nearest")[0].numpy()
    else:
        mask = (scores > 0).cpu().numpy()
    object_score = frame_object_score(state, frame)
    present = presence(low_res.numpy(), object_score) if presence else bool(mask.any())
    return PropagatedSlice(mask, float(scores.max()), present, object_score)


def frame_object_score(state: dict, frame: int) -> float:
    """SAM2's object-score logit of one tracked frame (NaN when SAM2 kept none)."""
    outputs = state["output_dict_per_obj"][0]
    out = outputs["cond_frame_outputs"].get(frame) or outputs["non_cond_frame_outputs"].get(frame)
    scores = None if out is None else out.get("object_score_logits")
    return float(scores.flatten()[0]) if scores is not None else float("nan")
