"""The gray levels the model is shown are those of its training data (SA-Med2D-20M's per-volume normalisation).

Training-data figures, measured here from real SA-Med2D-style slices (median gray level of each tissue):
* the reference's own sample, jdh-algo/Citrus-V d3bb13d `asset/ct_00--MSD_Liver--liver_123--y_0175.png`
  (512x432, gray RGB): air 0-3, lung 16-17, fat 95, soft tissue 108-112 (histogram peaks and regions);
* OpenGVLab/SAM-Med2D bfd2b93 `data_demo/images/*.png` with their masks: s0114_111 (TotalSegmentator
  chest): lung lobes 35-42, autochthon muscle 138-142, myocardium 148, ribs 197-200, T9 169; amos_0006_90 /
  amos_0004_75: liver 158 / 167; s0619_32 (pelvis): gluteus 66-69, femur 221.
So lung lies at 16-42, soft tissue at 66-167 and bone at 169-221 (the bounds differ per volume: they are
percentiles of each volume). Clinical windows put lung at 0 (soft tissue, liver) or 83 (lung window).
"""
from __future__ import annotations

import numpy as np
import pytest

from citrusv_backend.errors import InputError
from citrusv_backend.volume.input.io import read_volume
from citrusv_backend.volume.options import VolumeOptions
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.tasks.pipeline import VolumePipeline
from citrusv_backend.volume.slices.windowing import (CT_PRESETS, WindowChoice, parse_window, percentile_window,
                                                     training_window)

# Where the training data put each tissue (measured ranges above, with a margin of about 10 gray levels).
TRAINING_GRAY = {"lung": (10, 50), "soft tissue": (60, 185), "bone": (160, 255)}
CHEST_LABELS = {"lung": (5, 6), "soft tissue": (7,), "bone": (1, 2, 3, 4)}   # slicerio's Segmentation.seg.nrrd


@pytest.fixture(scope="module")
def chest(chest_ct_path):
    return read_volume(chest_ct_path)


@pytest.fixture(scope="module")
def chest_labels(chest_ct_segmentation_path, chest):
    import slicerio

    labels = slicerio.read_segmentation(str(chest_ct_segmentation_path))["voxels"].transpose(2, 1, 0)
    assert labels.shape == chest.shape
    return labels


def tissue_gray(gray: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {tissue: float(np.median(gray[np.isin(labels, values)])) for tissue, values in CHEST_LABELS.items()}


@pytest.mark.unit
def test_training_normalisation_puts_the_chest_ct_where_the_training_data_are(chest, chest_labels):
    window = WindowChoice(None, chest.modality, chest.voxels).for_target("liver")
    levels = tissue_gray(window.apply(chest.voxels), chest_labels)
    for tissue, (low, high) in TRAINING_GRAY.items():
        assert low <= levels[tissue] <= high, (tissue, levels)
    assert levels["lung"] < levels["soft tissue"] < levels["bone"]
    # Measured: lung 25, soft tissue 179, bone 217 from the 0.5th-99.5th percentiles -1006..+448 HU.
    assert window.name == "training" and window.bounds == pytest.approx((-1006.0, 448.0))


@pytest.mark.unit
@pytest.mark.parametrize("preset", ["liver", "soft_tissue", "lung"])
def test_clinical_windows_do_not(chest, chest_labels, preset):
    levels = tissue_gray(CT_PRESETS[preset].apply(chest.voxels), chest_labels)
    low, high = TRAINING_GRAY["lung"]
    assert not low <= levels["lung"] <= high, levels


@pytest.mark.unit
def test_field_of_view_padding_is_left_out_and_nothing_else(chest):
    """slicerio's chest CT is 21 % padding at -3024 HU: with it the lower bound would be -3024 and lung mid-gray."""
    assert np.mean(chest.voxels < -1024) > 0.2
    plain_low, _ = np.percentile(chest.voxels, [0.5, 99.5])
    assert plain_low == -3024 and training_window(chest.voxels).bounds[0] > -1025
    rng = np.random.default_rng(0)
    no_padding = rng.normal(0, 400, 50_000).clip(-1024, 3000)
    low, high = np.percentile(no_padding, [0.5, 99.5])
    assert training_window(no_padding).bounds == pytest.approx((low, high)), "without padding: the plain recipe"


@pytest.mark.unit
def test_mr_and_pet_keep_their_foreground_percentiles():
    mr = np.concatenate([np.zeros(1000), np.linspace(100, 200, 1000)])
    assert training_window(mr, "MR").bounds == pytest.approx(percentile_window(mr).bounds)
    assert parse_window("clinical", "the liver", "MR", mr).bounds == pytest.approx(percentile_window(mr).bounds)


@pytest.mark.unit
def test_window_choices():
    ct = np.linspace(-1000, 1000, 1000)
    clinical = WindowChoice("clinical", "CT", ct)
    assert clinical.per_target
    assert clinical.for_target("left lung") == CT_PRESETS["lung"] and clinical.for_target("liver") == CT_PRESETS["liver"]
    fixed = WindowChoice("bone", "CT", ct)
    assert fixed.for_target("liver") == fixed.for_target("lung") == CT_PRESETS["bone"]
    with pytest.raises(InputError, match="CENTER,WIDTH"):
        WindowChoice("wide", "CT", ct)


@pytest.mark.model
def test_the_slices_shown_to_the_model_have_the_training_gray_levels(tiny_engine, chest, chest_labels, monkeypatch):
    shown = spy_on_slices(monkeypatch)
    result = VolumePipeline(tiny_engine).run(chest, "segment the liver", "segment",
                                             VolumeOptions(mode="per-slice", slice_range=(14, 17)))
    orientation = result.source.orientation
    gray = np.stack([shown[k][1] for k in range(14, 17)])
    labels = np.stack([orientation.slice(chest_labels, k) for k in range(14, 17)])
    levels = tissue_gray(gray, labels)
    for tissue, (low, high) in TRAINING_GRAY.items():
        assert low <= levels[tissue] <= high, (tissue, levels)


@pytest.mark.model
def test_each_target_gets_its_own_window_only_when_asked(tiny_engine, chest, monkeypatch):
    """The default shows every target the same normalised slices; `clinical` gives each its own preset."""
    pipeline = VolumePipeline(tiny_engine)
    options = dict(mode="per-slice", slice_range=(17, 18), key_candidates=1)
    shown = spy_on_slices(monkeypatch, key=lambda source, index: (source.window, index))
    default = pipeline.run(chest, "segment the liver and the left lung", "segment", VolumeOptions(**options))
    default_windows = {window for window, _ in shown}
    shown.clear()
    clinical = pipeline.run(chest, "segment the liver and the left lung", "segment",
                            VolumeOptions(window="clinical", **options))
    assert default.settings["window"]["name"] == "training" and "windows" not in default.settings
    assert len(default_windows) == 1, "one normalisation for every target"
    assert clinical.settings["windows"] == {"liver": CT_PRESETS["liver"].__dict__,
                                            "left lung": CT_PRESETS["lung"].__dict__}
    assert {window for window, _ in shown} == {CT_PRESETS["liver"], CT_PRESETS["lung"]}
    means = {window: float(np.mean(gray)) for (window, _), (_, gray) in shown.items()}
    assert means[CT_PRESETS["liver"]] != means[CT_PRESETS["lung"]]


def spy_on_slices(monkeypatch, key=lambda source, index: index) -> dict:
    """The windowed slices the pipeline hands to the model's image preparation (SliceSource.gray), by `key`."""
    shown: dict = {}
    original = SliceSource.gray

    def gray(source, index):
        image = original(source, index)
        shown[key(source, index)] = (source.window, image)
        return image

    monkeypatch.setattr(SliceSource, "gray", gray)
    return shown
