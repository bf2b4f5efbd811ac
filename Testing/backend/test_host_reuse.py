"""Each thing once per task (windowing per slice, SAM2 image encoding per slice) and host work ahead of the model,
on the real chest CT with the tiny checkpoint and the real SAM2 modules."""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch

from citrusv_backend.errors import JobCancelled
from citrusv_backend.model.feature_cache import SAM2FeatureCache
from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS
from citrusv_backend.volume.input.io import read_volume
from citrusv_backend.volume.options import VolumeOptions
from citrusv_backend.volume.slices.orientation import DisplayOrientation
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import CT_PRESETS
from citrusv_backend.volume.tasks.pipeline import VolumePipeline

pytestmark = pytest.mark.model

RANGE = (14, 20)
BUDGET = TASK_PIXEL_BUDGETS["segment"]


@pytest.fixture(scope="module")
def chest(chest_ct_path):
    return read_volume(chest_ct_path)


def fingerprint(image: torch.Tensor) -> tuple:
    """Tells SAM2 inputs [3, S, S] of different slices apart."""
    return (round(float(image.double().sum()), 2), round(float(image[:, ::37, ::41].double().sum()), 4))


class EncodingCounter:
    """SAM2 image encodings per distinct input image, by the engine's SAM2 and by the video predictor."""

    def __init__(self, monkeypatch, engine):
        self.seen: Counter = Counter()
        for module in (engine.model.grounding_encoder.sam2_model, engine.video_predictor()):
            original = module.forward_image

            def counted(img_batch, original=original):
                for image in img_batch:
                    self.seen[fingerprint(image)] += 1
                return original(img_batch)

            monkeypatch.setattr(module, "forward_image", counted)


class SliceCounter:
    """Display slices cut from one volume's voxels (each cut is windowed once right after)."""

    def __init__(self, monkeypatch, voxels: np.ndarray):
        self.cuts: Counter = Counter()
        original = DisplayOrientation.slice

        def counted(orientation, volume, index):
            if volume is voxels:
                self.cuts[(orientation.slice_axis, index)] += 1
            return original(orientation, volume, index)

        monkeypatch.setattr(DisplayOrientation, "slice", counted)


def test_propagation_reuses_the_key_slice_features_and_no_slice_is_encoded_twice(tiny_engine, chest, monkeypatch):
    encodings = EncodingCounter(monkeypatch, tiny_engine)
    result = VolumePipeline(tiny_engine, workers=1).run(chest, "segment the left lung", "segment",
                                                        VolumeOptions(slice_range=RANGE))
    segment = result.segments[0]
    assert segment.key_slice is not None and result.timings["host"]["propagation"]["slices"] > 1, "propagated"
    key_input = tiny_engine.processor.prepare_image(result.source.gray(segment.key_slice), BUDGET).sam2_pixel_values[0]
    assert encodings.seen[fingerprint(key_input)] == 1, "the key slice is encoded by the search only"
    assert max(encodings.seen.values()) == 1, f"slices encoded twice: {encodings.seen}"
    assert len(encodings.seen) <= RANGE[1] - RANGE[0]  # no warm-up encoding of a frame outside the range either
    assert result.timings["sam2_features"]["hits"] >= 1


def test_two_targets_window_each_slice_once_and_share_its_features(tiny_engine, chest, monkeypatch):
    encodings = EncodingCounter(monkeypatch, tiny_engine)
    slices = SliceCounter(monkeypatch, chest.voxels)
    result = VolumePipeline(tiny_engine, workers=1).run(chest, "segment the liver and the spleen", "segment",
                                                        VolumeOptions(slice_range=RANGE))
    assert [s.name for s in result.segments] == ["liver", "spleen"]
    assert slices.cuts and max(slices.cuts.values()) == 1, f"slices windowed more than once: {slices.cuts}"
    assert max(encodings.seen.values()) == 1, f"slices encoded twice: {encodings.seen}"


def test_per_slice_mode_prepares_ahead_on_workers_with_the_same_result(tiny_engine, chest, monkeypatch):
    options = VolumeOptions(mode="per-slice", slice_range=(15, 20), batch_size=2)
    inline = VolumePipeline(tiny_engine, workers=0).run(chest, "segment the left lung", "segment", options)
    processor = tiny_engine.processor
    threads = []
    original = processor.prepare_image

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(processor, "prepare_image", recorded)
    ahead = VolumePipeline(tiny_engine, workers=2).run(chest, "segment the left lung", "segment", options)
    assert np.array_equal(ahead.labels, inline.labels)
    assert any(name.startswith("citrusv-prefetch") for name in threads)
    host = ahead.timings["host"]["per_slice"]
    assert host["slices"] == 5 and host["wall_s"] > 0 and 0 <= host["model_waiting_share"] <= 1
    assert host["cpu_ms_per_slice"]["preprocess"] > 0 and host["cpu_ms_per_slice"]["postprocess"] > 0
    assert host["critical_ms_per_slice_total"] <= 1000 * host["wall_s"] / host["slices"]
    assert not [t for t in threading.enumerate() if t.name.startswith("citrusv-prefetch")], "workers are gone"


def test_cancel_stops_prefetching_too(tiny_engine, chest):
    calls = {"n": 0}

    def cancel_on_second_batch() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    pipeline = VolumePipeline(tiny_engine, should_cancel=cancel_on_second_batch, workers=2)
    with pytest.raises(JobCancelled):
        pipeline.run(chest, "segment the left lung", "segment", VolumeOptions(mode="per-slice", slice_range=(0, 30),
                                                                              batch_size=1))
    assert calls["n"] == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("citrusv-prefetch")]


def test_cached_features_give_the_same_masks_without_encoding_again(tiny_engine, chest, monkeypatch):
    processor = tiny_engine.processor
    source = SliceSource(chest, "axial", CT_PRESETS["lung"])
    query, answer = "Please help segment the left lung in this scan.", "Sure, it is [SEG]."
    indices = [15, 16, 17]
    inputs = [processor.inputs_for(processor.prepare_image(source.gray(i), BUDGET), query, answer) for i in indices]
    keys = [source.feature_key(i, BUDGET) for i in indices]
    plain = tiny_engine.segment_inputs(inputs, query, answer)
    cache = SAM2FeatureCache()
    first = tiny_engine.segment_inputs(inputs, query, answer, feature_keys=keys, feature_cache=cache)
    encodings = EncodingCounter(monkeypatch, tiny_engine)
    partly = tiny_engine.segment_inputs(inputs[1:] + inputs[:1], query, answer, feature_keys=keys[1:] + keys[:1],
                                        feature_cache=cache)
    assert not encodings.seen, "every image came from the cache"
    for a, b, c in zip(plain, first, partly[-1:] + partly[:-1]):
        for x, y, z in zip(a.masks, b.masks, c.masks):
            assert np.array_equal(x.low_res_logits, y.low_res_logits) and np.array_equal(x.low_res_logits, z.low_res_logits)
            assert np.array_equal(x.mask, z.mask) and x.iou == z.iou and x.object_score == z.object_score


def test_a_cache_kept_across_tasks_serves_the_next_task(tiny_engine, chest, monkeypatch):
    """Interactive use: the same volume asked again (another prompt) finds its slices' features."""
    cache = SAM2FeatureCache()
    pipeline = VolumePipeline(tiny_engine, workers=1, feature_cache=cache)
    options = VolumeOptions(mode="per-slice", slice_range=(15, 18))
    first = pipeline.run(chest, "segment the left lung", "segment", options)
    encodings = EncodingCounter(monkeypatch, tiny_engine)
    again = pipeline.run(chest, "segment the left lung", "segment", options)
    assert not encodings.seen and len(cache) == 3
    assert np.array_equal(first.labels, again.labels)
    other = SliceSource(read_volume_copy(chest), "axial", CT_PRESETS["lung"])
    assert other.feature_key(15, BUDGET) != SliceSource(chest, "axial", CT_PRESETS["lung"]).feature_key(15, BUDGET)
    assert SliceSource(chest, "coronal", CT_PRESETS["lung"]).identity != SliceSource(chest, "axial", CT_PRESETS["lung"]).identity


def read_volume_copy(volume):
    from dataclasses import replace

    return replace(volume, voxels=volume.voxels.copy())


def test_the_device_made_sam2_inputs_give_the_same_volume_result(tiny_engine, chest, monkeypatch):
    """The path a CUDA model takes (SAM2 inputs made on the device by prefetch workers), forced onto the CPU:
    key-slice search and propagation give the same masks as the host path."""
    options = VolumeOptions(slice_range=(15, 19))
    host = VolumePipeline(tiny_engine, workers=1).run(chest, "segment the left lung", "segment", options)
    fast = tiny_engine.processor.fast
    assert fast.on_device is None and fast.use_device("cpu", force=True)
    try:
        made = Counter()
        original = type(fast.on_device).__call__
        monkeypatch.setattr(type(fast.on_device), "__call__",
                            lambda self, resized: made.update([threading.current_thread().name]) or original(self, resized))
        device = VolumePipeline(tiny_engine, workers=1).run(chest, "segment the left lung", "segment", options)
    finally:
        fast.on_device = None
    assert any(name.startswith("citrusv-prefetch") for name in made), made
    assert host.segments[0].key_slice == device.segments[0].key_slice
    assert np.array_equal(host.labels, device.labels)
