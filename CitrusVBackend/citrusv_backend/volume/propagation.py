"""Propagating a key-slice mask through a volume with SAM2's video memory (slices as frames, in memory).

The frames are the volume's display-oriented slices, preprocessed exactly like the key slice's SAM2 input
(Qwen smart-resize, LANCZOS stretch to the SAM2 size, ImageNet normalisation) and computed lazily, so a
300-slice volume never holds 300 x 3 x 1024 x 1024 floats. Propagation runs from the key slice forward and
backward and stops in each direction once the target has been absent for `stop_after_empty` slices.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..model.processor import PixelBudget, resize_for_qwen, sam2_pixel_values

PROPAGATION_OBJECT_ID = 1


class SliceFrames:
    """Read-only sequence of SAM2 input tensors [3, S, S] for slices `first .. first + count - 1`."""

    def __init__(self, rgb_slice: Callable[[int], np.ndarray], first: int, count: int, budget: PixelBudget, size: int):
        self.rgb_slice = rgb_slice
        self.first = first
        self.count = count
        self.budget = budget
        self.size = size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, frame: int) -> torch.Tensor:
        from PIL import Image

        if not 0 <= frame < self.count:
            raise IndexError(frame)
        resized = resize_for_qwen(Image.fromarray(self.rgb_slice(self.first + frame)), self.budget)
        return sam2_pixel_values(resized, self.size)[0]


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
    mask: np.ndarray      # [H, W] bool in display orientation
    logits_max: float     # the strongest logit: below 0 means SAM2 sees no target here


class Cancelled(Exception):
    """Raised inside long loops when the caller asked to stop."""


def propagate(predictor, frames: SliceFrames, height: int, width: int, anchors: dict[int, np.ndarray],
              stop_after_empty: int = 2, autocast=None, on_slice: Callable[[int, int], None] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> dict[int, PropagatedSlice]:
    """Masks per frame index, from `anchors` (frame -> key mask [S, S] bool in the SAM2 frame).

    Each anchor conditions SAM2's memory; tracking starts at the earliest anchor going forward and at the
    latest going backward, and stops after `stop_after_empty` consecutive empty slices beyond all anchors.
    """
    device = next(predictor.parameters()).device
    autocast = autocast or torch.autocast("cuda", enabled=False)
    results: dict[int, PropagatedSlice] = {}
    with torch.inference_mode(), autocast, quiet_progress_bars():
        with frames_as_video(frames, height, width):
            state = predictor.init_state(video_path=None, offload_video_to_cpu=True,
                                         offload_state_to_cpu=device.type != "cpu")
        for frame, mask in sorted(anchors.items()):
            predictor.add_new_mask(state, frame_idx=frame, obj_id=PROPAGATION_OBJECT_ID, mask=torch.as_tensor(mask))
        done = 0
        for reverse in (False, True):
            start = (max if reverse else min)(anchors)
            empty_run = 0
            for frame, _, logits in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                if should_cancel and should_cancel():
                    raise Cancelled()
                scores = logits[0, 0].float()
                mask = (scores > 0).cpu().numpy()
                results[frame] = PropagatedSlice(mask, float(scores.max()))
                done += 1
                if on_slice:
                    on_slice(done, len(frames))
                beyond_anchors = frame < min(anchors) if reverse else frame > max(anchors)
                empty_run = empty_run + 1 if (beyond_anchors and not mask.any()) else 0
                if empty_run >= stop_after_empty:
                    break
    return results
