"""Presence is decided from the mask logits (what Citrus-V trained), not from SAM2's untrained object-score head.

Two tiny models disagree on purpose: "object-absent" (object-score head says absent, masks clear) and
"faint-masks" (object-score head says present, masks undecided). The former rule (object score > 0) gets
both wrong; the mask rule gets both right; the object score stays a reported figure.
"""
from __future__ import annotations

import numpy as np
import pytest

from citrusv_backend.errors import InputError
from citrusv_backend.inference.engine import CitrusVEngine
from citrusv_backend.model.tiny import make_tiny_checkpoint
from citrusv_backend.volume.input.io import read_volume
from citrusv_backend.volume.options import VolumeOptions
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import training_window
from citrusv_backend.volume.tasks.pipeline import VolumePipeline
from citrusv_backend.volume.tasks.presence import Evidence, PresenceRule, consistent_slices

RANGE = (16, 19)
PROMPT = "segment the left lung"


def logits_with(area: float, inside: float, outside: float = -6.0, side: int = 256) -> np.ndarray:
    logits = np.full((side, side), outside, np.float32)
    logits.flat[: int(round(area * side * side))] = inside
    return logits


@pytest.mark.unit
@pytest.mark.parametrize("area, inside, present", [
    (0.2, 8.0, True),        # a clear mask
    (0.2, 0.3, False),       # marked, but undecided (mean P = 0.57)
    (0.0, 0.0, False),       # nothing marked
    (4 / 65536, 9.0, False),  # four pixels: noise
    (0.95, 9.0, False),      # nearly everything: a failure, not a target
])
def test_mask_rule_reads_area_and_mean_logit(area, inside, present):
    evidence = Evidence.from_logits(logits_with(area, inside), object_score=-5.0, iou=0.1)
    assert PresenceRule().present(evidence) is present
    assert (PresenceRule().score(evidence) > 0) is present
    assert PresenceRule("object-score").present(evidence) is False  # object score -5: "absent" under that rule
    assert evidence.to_dict()["object_score"] == -5.0


@pytest.mark.unit
def test_rules_are_switchable_and_checked():
    clear_but_absent = Evidence.from_logits(logits_with(0.2, 8.0), object_score=-3.0, iou=0.9)
    faint_but_present = Evidence.from_logits(logits_with(0.2, 0.2), object_score=3.0, iou=0.9)
    assert [PresenceRule(rule).present(clear_but_absent) for rule in ("mask", "object-score", "both")] == [True, False, False]
    assert [PresenceRule(rule).present(faint_but_present) for rule in ("mask", "object-score", "both")] == [False, True, False]
    with pytest.raises(InputError, match="presence rule"):
        PresenceRule("magic")


@pytest.mark.unit
def test_isolated_slices_need_a_neighbour():
    rule = PresenceRule()
    present = {10: True, 11: True, 12: False, 13: False, 14: True, 15: False}
    assert consistent_slices(present, 10, 16, rule) == {10, 11}
    assert consistent_slices(present, 10, 16, PresenceRule(neighbour_support=False)) == {10, 11, 14}
    assert consistent_slices({3: True}, 3, 4, rule) == {3}, "a one-slice range has no neighbour to ask"


@pytest.fixture(scope="module")
def chest(chest_ct_path):
    return read_volume(chest_ct_path)


def biased_engine(session_dir, heads: str) -> CitrusVEngine:
    directory = session_dir / f"tiny-{heads}"
    if not (directory / "config.json").is_file():
        make_tiny_checkpoint(directory, seed=0, heads=heads)
    return CitrusVEngine.load(directory, device="cpu")


@pytest.fixture(scope="module")
def object_absent(session_dir):
    return biased_engine(session_dir, "object-absent")


@pytest.fixture(scope="module")
def faint_masks(session_dir):
    return biased_engine(session_dir, "faint-masks")


def key_slice_evidence(engine, chest) -> Evidence:
    source = SliceSource(chest, "axial", training_window(chest.voxels))
    result = engine.segment(source.rgb(17), "<image>\nPlease help segment the left lung in this scan.")
    return Evidence.from_result(result)


@pytest.mark.model
def test_the_test_models_disagree_as_designed(object_absent, faint_masks, chest):
    absent = key_slice_evidence(object_absent, chest)
    assert absent.object_score < 0 and absent.mean_logit > 1.0 and 0.01 < absent.area < 0.9
    faint = key_slice_evidence(faint_masks, chest)
    assert faint.object_score > 0 and 0 < faint.mean_logit < 0.5 and faint.area > 0.01


@pytest.mark.model
@pytest.mark.slow
def test_clear_masks_count_although_the_object_head_says_absent(object_absent, chest):
    pipeline = VolumePipeline(object_absent)
    found = pipeline.run(chest, PROMPT, "segment", VolumeOptions(slice_range=RANGE))
    segment = found.segments[0]
    assert segment.mask.any() and segment.key_slice is not None
    assert segment.key_evidence["object_score"] < 0, "the object score is reported, not used"
    assert len(segment.slices) > 1, "propagation keeps going: SAM2's object-score suppression is off"
    old_rule = pipeline.run(chest, PROMPT, "segment", VolumeOptions(slice_range=RANGE, presence="object-score"))
    assert not old_rule.segments[0].mask.any() and "not found" in old_rule.problems[0]
    per_slice = pipeline.run(chest, PROMPT, "segment", VolumeOptions(mode="per-slice", slice_range=RANGE))
    assert set(per_slice.segments[0].slices) == set(range(*RANGE))


@pytest.mark.model
@pytest.mark.slow
def test_object_score_suppression_is_a_switch(object_absent, chest):
    pipeline = VolumePipeline(object_absent)
    suppressed = pipeline.run(chest, PROMPT, "segment", VolumeOptions(slice_range=RANGE, object_score_suppression=True))
    segment = suppressed.segments[0]
    assert segment.slices == [segment.key_slice], "SAM2 blanks every tracked slice; only the anchor is left"
    assert suppressed.settings["object_score_suppression"] is True


@pytest.mark.model
@pytest.mark.slow
def test_undecided_masks_do_not_count_although_the_object_head_says_present(faint_masks, chest):
    pipeline = VolumePipeline(faint_masks)
    for mode in ("propagate", "per-slice"):
        result = pipeline.run(chest, PROMPT, "segment", VolumeOptions(mode=mode, slice_range=RANGE))
        assert not result.segments[0].mask.any() and "not found" in result.problems[0], mode
    old_rule = pipeline.run(chest, PROMPT, "segment", VolumeOptions(mode="per-slice", slice_range=RANGE,
                                                                    presence="object-score"))
    assert old_rule.segments[0].mask.any(), "the former rule took the object head's word for undecided masks"
