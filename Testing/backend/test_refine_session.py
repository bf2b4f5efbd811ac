"""Refinement with the tiny model on the real chest CT, starting from its ground-truth left lung: SAM2's own
point pathway (checked against the `sam2` package's SAM2ImagePredictor on the same features), re-propagation,
undo / redo, exclude points, boxes, the feature store."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from citrusv_backend.inference.engine import upsample_mask
from citrusv_backend.model.feature_cache import SAM2FeatureCache
from citrusv_backend.model.modeling import SAM2Prompts
from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS
from citrusv_backend.refine.volume_features import SliceFeatureStore
from citrusv_backend.refine.volume_prompts import BoxPrompt, PointPrompt, RefinePrompts, SlicePrompt
from citrusv_backend.refine.volume_session import RefinementSession
from citrusv_backend.volume.input.io import read_volume
from citrusv_backend.volume.options import RefineOptions
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import CT_PRESETS

from sam2_reference import image_predictor_on

pytestmark = pytest.mark.model

LEFT_LUNG = 6
SLICE = 17
NO_RULES = RefineOptions(propagate=False, enforce_prompts=False)


@pytest.fixture(scope="module")
def chest(chest_ct_path):
    return read_volume(chest_ct_path)


@pytest.fixture(scope="module")
def lung(chest_ct_segmentation_path):
    return read_volume(chest_ct_segmentation_path).voxels == LEFT_LUNG


@pytest.fixture(scope="module")
def source(chest):
    return SliceSource(chest, "axial", CT_PRESETS["lung"])


@pytest.fixture(scope="module")
def store(tiny_engine, source):
    """One store for the module: each slice is encoded once however many tests click on it."""
    return SliceFeatureStore(tiny_engine, source, TASK_PIXEL_BUDGETS["segment"])


def session_on(tiny_engine, source, store, lung, **kwargs) -> RefinementSession:
    return RefinementSession(tiny_engine, source, lung, query="the left lung", features=store, **kwargs)


def ijk_of(source, index: int, row: float, col: float):
    """The (i, j, k) voxel shown at display (row, col) of slice `index`."""
    kji = source.orientation.display_to_index(index, np.array([row]), np.array([col]), source.volume.shape)[0]
    return tuple(kji[::-1])


def sam2_answer(tiny_engine, store, source, index, point_coords=None, point_labels=None, box=None, mask_input=None):
    """sam2's SAM2ImagePredictor on our features of the slice: (chosen low-res logits, mask at the slice's size)."""
    sam2 = tiny_engine.model.grounding_encoder.sam2_model
    predictor = image_predictor_on(sam2, store.features(index), source.height, source.width)
    count = (0 if point_labels is None else len(point_labels)) + (2 if box is not None else 0)
    multimask = sam2.multimask_output_in_sam and sam2.multimask_min_pt_num <= count <= sam2.multimask_max_pt_num
    with torch.inference_mode():
        masks, ious, low_res = predictor.predict(point_coords=point_coords, point_labels=point_labels, box=box,
                                                 mask_input=mask_input, multimask_output=multimask, return_logits=True)
    best = int(np.argmax(ious))
    return low_res[best], masks[best] > predictor.mask_threshold


# In fractions of the slice's width (x) and height (y).
PROMPT_SETS = {
    "one include point": dict(points=[(0.47, 0.41, 1)]),
    "include and exclude": dict(points=[(0.47, 0.4, 1), (0.7, 0.31, 0)]),
    "box": dict(box=(0.31, 0.23, 0.78, 0.7)),
    "box and points": dict(box=(0.31, 0.23, 0.78, 0.7), points=[(0.55, 0.47, 0)]),
}


@pytest.fixture(scope="module")
def coronal(tiny_engine, chest):
    """A non-square slice (34 x 128): x and y scale differently into SAM2's square."""
    coronal = SliceSource(chest, "coronal", CT_PRESETS["lung"])
    return coronal, SliceFeatureStore(tiny_engine, coronal, TASK_PIXEL_BUDGETS["segment"])


@pytest.mark.parametrize("plane", ["axial", "coronal"])
@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_points_and_boxes_go_through_sam2s_own_prompt_path(tiny_engine, store, source, coronal, plane, name):
    source, store = (source, store) if plane == "axial" else coronal
    index = SLICE if plane == "axial" else 64
    grounding = tiny_engine.model.grounding_encoder
    scale = np.array([source.width, source.height] * 2)
    given = PROMPT_SETS[name]
    prompt = SlicePrompt(index, points=[(x * source.width, y * source.height, label) for x, y, label in given.get("points", [])],
                         box=tuple(np.array(given["box"]) * scale) if "box" in given else None)
    coords, labels = prompt.sam2_points(source.height, source.width, grounding.image_size)
    with torch.inference_mode():
        ours = grounding.decode(store.features(index), SAM2Prompts(coords, labels))
        mask = upsample_mask(ours.low_res_logits, (source.height, source.width), "bilinear")[0].numpy()
    pixels = [[x, y] for x, y, _ in prompt.points]
    reference_logits, reference_mask = sam2_answer(
        tiny_engine, store, source, index, point_coords=np.array(pixels) if pixels else None,
        point_labels=np.array([label for _, _, label in prompt.points]) if pixels else None,
        box=np.array(prompt.box) if prompt.box else None)
    assert torch.equal(torch.clamp(ours.low_res_logits[0], -32, 32), torch.from_numpy(reference_logits))
    assert np.array_equal(mask, reference_mask)


def test_keep_text_puts_the_seg_token_after_sam2s_point_tokens(tiny_engine, store, source, lung):
    """The reference's `_forward_sam_heads(point_inputs, language_embd)`: points (+ SAM2's padding point) first."""
    grounding = tiny_engine.model.grounding_encoder
    sam2 = grounding.sam2_model
    session = session_on(tiny_engine, source, store, lung)
    token = session._seg_token(SLICE)
    assert torch.equal(token, tiny_engine.seg_embeddings(source.rgb(SLICE), "the left lung")[:1])
    prompt = SlicePrompt(SLICE, points=[(60.0, 52.0, 1), (90.0, 40.0, 0)])
    coords, labels = prompt.sam2_points(source.height, source.width, grounding.image_size)
    features = store.features(SLICE)
    with torch.inference_mode():
        ours = grounding.decode(features, SAM2Prompts(coords, labels, language_embeds=token))
        sparse, dense = sam2.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        assert sparse.shape[1] == 3, "two points and SAM2's padding point"
        logits, ious, _, _ = sam2.sam_mask_decoder(
            image_embeddings=features.image_embed, image_pe=sam2.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=torch.cat([sparse, token], dim=1), dense_prompt_embeddings=dense,
            multimask_output=False, repeat_image=False, high_res_features=features.high_res_feats)
        without = grounding.decode(features, SAM2Prompts(coords, labels))
    assert torch.equal(ours.low_res_logits, logits[:, 0])
    assert not torch.equal(ours.low_res_logits, without.low_res_logits)


def test_a_click_changes_that_slice_through_sam2s_point_pathway(tiny_engine, store, source, lung):
    session = session_on(tiny_engine, source, store, lung)
    before = session.mask.copy()
    dense = session._mask_prompt(SLICE)
    assert dense is not None and dense.shape == (1, 1, 256, 256)
    outcome = session.refine(RefinePrompts([PointPrompt(ijk_of(source, SLICE, 52.7, 60.3))]), NO_RULES)
    _, expected = sam2_answer(tiny_engine, store, source, SLICE, point_coords=np.array([[60.3, 52.7]]),
                              point_labels=np.array([1]), mask_input=dense[0].numpy())
    assert np.array_equal(session.slice_mask(SLICE), expected)
    assert outcome.refined_slices == [SLICE] and outcome.changed_slices == [SLICE]
    assert np.array_equal(np.delete(session.mask, SLICE, axis=0), np.delete(before, SLICE, axis=0))
    assert not np.array_equal(session.slice_mask(SLICE), source.orientation.slice(before, SLICE))
    # The step is a crop diff: undo gives back the exact labelmap, redo the refined one.
    refined = session.mask.copy()
    assert outcome.step.box[0] == slice(SLICE, SLICE + 1) and np.array_equal(outcome.crop, refined[outcome.step.box])
    undone = session.undo()
    assert np.array_equal(session.mask, before) and np.array_equal(undone.crop, before[undone.step.box])
    session.redo()
    assert np.array_equal(session.mask, refined)
    session.undo()
    assert session.undo() is None and np.array_equal(session.mask, before)
    assert session.history.describe() == {"version": 4, "can_undo": False, "can_redo": True, "undo_steps": 0,
                                          "redo_steps": 1}


def test_features_of_a_slice_are_computed_once(tiny_engine, source, lung):
    store = SliceFeatureStore(tiny_engine, source, TASK_PIXEL_BUDGETS["segment"])
    session = session_on(tiny_engine, source, store, lung)
    first = session.refine(RefinePrompts([PointPrompt(ijk_of(source, 20, 50, 50))]), NO_RULES)
    second = session.refine(RefinePrompts([PointPrompt(ijk_of(source, 20, 60, 70), False)]), NO_RULES)
    assert first.timings["encoded_slices"] == 1 and second.timings["encoded_slices"] == 0
    assert store.encoded == 1 and store.cached_slices == [20]
    assert "language_model_s" not in second.timings, "a click needs no language-model call"


def test_the_feature_budget_evicts_the_least_recently_used_slice(tiny_engine, source, store):
    one_slice = sum(t.numel() * t.element_size() for t in store.backbone(SLICE)["backbone_fpn"])
    small = SliceFeatureStore(tiny_engine, source, TASK_PIXEL_BUDGETS["segment"], SAM2FeatureCache(2 * one_slice))
    for index in (10, 11, 10, 12):
        small.backbone(index)
    assert small.cached_slices == [10, 12] and small.encoded == 3
    assert small.cache.nbytes == 2 * one_slice
    assert torch.equal(small.backbone(10)["backbone_fpn"][0], store.backbone(10)["backbone_fpn"][0])
    small.close()
    assert small.cache.nbytes == 0 and small.cached_slices == []


def test_repropagation_changes_neighbouring_slices_and_not_others(tiny_engine, store, source, lung):
    # An earlier correction on SLICE + 2 bounds the forward pass; at most 2 slices are tracked backward.
    session = session_on(tiny_engine, source, store, lung, anchors=[SLICE + 2])
    before = session.mask.copy()
    options = RefineOptions(propagate=True, max_propagation_slices=2)
    outcome = session.refine(RefinePrompts([PointPrompt(ijk_of(source, SLICE, 52.0, 60.0), False)]), options)
    assert outcome.refined_slices == [SLICE]
    assert outcome.propagated_slices == [SLICE - 2, SLICE - 1, SLICE + 1]
    assert set(outcome.changed_slices) <= {SLICE - 2, SLICE - 1, SLICE, SLICE + 1}
    assert set(outcome.changed_slices) & {SLICE - 2, SLICE - 1, SLICE + 1}, "the neighbours changed"
    untouched = [i for i in range(source.depth) if i not in range(SLICE - 2, SLICE + 2)]
    assert np.array_equal(session.mask[untouched], before[untouched])
    assert session.anchors == {SLICE, SLICE + 2}
    session.undo()
    assert np.array_equal(session.mask, before) and session.anchors == {SLICE + 2}


def test_repropagated_masks_are_sam2s_video_memory_on_the_same_features(tiny_engine, store, source, lung):
    """The store serves SAM2's video predictor exactly the features it would compute itself."""
    from citrusv_backend.volume.tasks.propagation import SliceFrames, propagate

    session = session_on(tiny_engine, source, store, lung)
    options = RefineOptions(propagate=True, max_propagation_slices=1, enforce_prompts=False)
    outcome = session.refine(RefinePrompts([PointPrompt(ijk_of(source, SLICE, 52.0, 60.0))]), options)
    corrected = session.slice_mask(SLICE)
    # The same conditioning on the three slices around it, the predictor computing the features from the frames.
    frames = SliceFrames(source.rgb, SLICE - 1, 3, TASK_PIXEL_BUDGETS["segment"], 1024)
    logits = session._logits[SLICE]
    anchor = (torch.nn.functional.interpolate(logits, size=(1024, 1024), mode="bilinear", align_corners=False)[0, 0]
              > 0).numpy()
    direct = propagate(tiny_engine.video_predictor(), frames, source.height, source.width, {1: anchor},
                       stop_after_empty=1000)
    assert outcome.propagated_slices == [SLICE - 1, SLICE + 1]
    for index in outcome.propagated_slices:
        assert np.array_equal(session.slice_mask(index), direct[index - SLICE + 1].mask), index
    assert np.array_equal(corrected, upsample_mask(logits[0], (source.height, source.width), "bilinear")[0].numpy())


def test_a_negative_click_removes(tiny_engine, store, source, lung):
    session = session_on(tiny_engine, source, store, lung)
    rows, cols = np.nonzero(session.slice_mask(SLICE))
    row, col = float(rows[len(rows) // 2]), float(cols[len(cols) // 2])
    outcome = session.refine(RefinePrompts([PointPrompt(ijk_of(source, SLICE, row, col), False)]),
                             RefineOptions(propagate=False))
    after = session.slice_mask(SLICE)
    assert not after[int(row), int(col)], "the excluded voxel is no longer in the segment"
    assert outcome.changed_slices == [SLICE]
    assert session.mask[SLICE].sum() < lung[SLICE].sum() or not np.array_equal(session.mask[SLICE], lung[SLICE])


def test_a_box_confines(tiny_engine, store, source, lung):
    session = session_on(tiny_engine, source, store, lung)
    before = session.mask.copy()
    corner_a, corner_b = ijk_of(source, SLICE - 1, 30, 20), ijk_of(source, SLICE, 80, 60)
    outcome = session.refine(RefinePrompts(box=BoxPrompt(corner_a, corner_b)), RefineOptions(propagate=False))
    assert outcome.refined_slices == [SLICE - 1, SLICE]
    for index in (SLICE - 1, SLICE):
        rows, cols = np.nonzero(session.slice_mask(index))
        assert rows.size and rows.min() >= 30 and rows.max() <= 80 and cols.min() >= 20 and cols.max() <= 60
    others = [i for i in range(source.depth) if i not in (SLICE - 1, SLICE)]
    assert np.array_equal(session.mask[others], before[others])
