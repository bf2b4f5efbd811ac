"""Whole-volume tasks on the real chest CT with the tiny checkpoint and the real SAM2 modules."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from citrusv_backend.errors import InputError
from citrusv_backend.errors import JobCancelled
from citrusv_backend.inference.parsing import Box
from citrusv_backend.volume.input.io import Volume, read_volume
from citrusv_backend.volume.options import VolumeOptions
from citrusv_backend.volume.outputs.files import write_outputs
from citrusv_backend.volume.outputs.quantify import VoxelGeometry
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import CT_PRESETS, training_window
from citrusv_backend.volume.tasks.boxes import box_to_patient, link_boxes
from citrusv_backend.volume.tasks.pipeline import VolumePipeline
from citrusv_backend.volume.tasks.presence import Evidence, PresenceRule, consistent_slices
from citrusv_backend.volume.tasks.propagation import PropagatedSlice, SliceFrames, propagate
from citrusv_backend.volume.tasks.sampling import spread
from citrusv_backend.volume.tasks.targets import parse_targets

pytestmark = pytest.mark.model

RANGE = (14, 20)


@pytest.fixture(scope="module")
def chest(chest_ct_path) -> Volume:
    return read_volume(chest_ct_path)


@pytest.fixture(scope="module")
def pipeline(tiny_engine) -> VolumePipeline:
    return VolumePipeline(tiny_engine)


@pytest.fixture(scope="module")
def lung_result(pipeline, chest):
    stages = []
    pipeline.progress = lambda stage, fraction, message: stages.append((stage, fraction))
    result = pipeline.run(chest, "segment the left lung", "segment", VolumeOptions(slice_range=RANGE))
    pipeline.progress = lambda *args: None
    return result, stages


def slices_with_mask(mask: np.ndarray) -> list[int]:
    return np.nonzero(mask.any(axis=(1, 2)))[0].tolist()


def test_segment_finds_a_key_slice_and_propagates_within_the_range(lung_result, chest):
    result, stages = lung_result
    assert [s.name for s in result.segments] == ["left lung"]
    segment = result.segments[0]
    assert RANGE[0] <= segment.key_slice < RANGE[1] and segment.key_score > 0
    assert set(slices_with_mask(segment.mask)) <= set(range(*RANGE))
    assert segment.key_slice in slices_with_mask(segment.mask)
    assert np.array_equal(result.labels == 1, segment.mask)
    measured = segment.measurements
    voxel_ml = float(np.prod(chest.geometry.spacing)) / 1000
    assert measured["voxel_count"] == int(segment.mask.sum())
    assert measured["volume_ml"] == pytest.approx(segment.mask.sum() * voxel_ml)
    assert segment.laterality in ("left", "right", "midline")
    assert any(stage.startswith("key slice") for stage, _ in stages)
    assert any(stage.startswith("propagation") for stage, _ in stages)
    assert stages[-1] == ("done", 1.0)
    assert result.findings[0]["finding"] == "left lung" and result.findings[0]["volume_ml"] == measured["volume_ml"]


def lung_frames(pipeline, chest, first: int, count: int):
    """Chest CT slices as SAM2 frames, and a rectangular key mask in SAM2's square frame."""
    source = SliceSource(chest, "axial", CT_PRESETS["lung"])
    frames = SliceFrames(source.rgb, first, count, pipeline._budget("segment", VolumeOptions()), 1024)
    key = np.zeros((1024, 1024), bool)
    key[300:700, 200:500] = True
    return source, frames, key


def test_propagation_covers_both_directions_with_the_real_sam2(pipeline, chest):
    source, frames, key = lung_frames(pipeline, chest, 10, 8)
    predictor = pipeline.engine.video_predictor()
    visited = []
    results = propagate(predictor, frames, source.height, source.width, {3: key}, stop_after_empty=100,
                        on_slice=lambda done, total: visited.append(done))
    assert sorted(results) == list(range(8)), "forward reaches the last frame, backward the first"
    assert results[3].mask.shape == (128, 128) and results[3].mask.any()
    assert len(visited) == 9  # 5 forward (3..7) + 4 backward (3..0), the key frame twice


def propagate_with_object_score_bias(pipeline, chest, bias_value: float, first=0, count=20, key_frame=10, **options):
    source, frames, key = lung_frames(pipeline, chest, first, count)
    predictor = pipeline.engine.video_predictor()
    bias = predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(bias_value)
        return propagate(predictor, frames, source.height, source.width, {key_frame: key}, stop_after_empty=2, **options)
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_propagation_stops_where_the_target_ends(pipeline, chest):
    """With SAM2's suppression asked for and "no object" everywhere, tracking stops after two empty slices."""
    results = propagate_with_object_score_bias(pipeline, chest, -50.0, suppress_absent_objects=True)
    assert sorted(results) == [8, 9, 10, 11, 12]
    assert not any(results[i].mask.any() or results[i].present for i in (8, 9, 11, 12))


def test_propagation_does_not_suppress_on_the_object_score_unless_asked(pipeline, chest):
    """SAM2's video predictor blanks masks whose object score is negative; Citrus-V never trained that head."""
    results = propagate_with_object_score_bias(pipeline, chest, -50.0, first=12, count=6, key_frame=2)
    beyond = [i for i in results if i != 2]
    assert sorted(beyond) == [0, 1, 3, 4, 5] and all(results[i].mask.any() and results[i].present for i in beyond)
    assert all(results[i].object_score < 0 for i in beyond), "the object score is still reported"
    assert not pipeline.engine.video_predictor().suppress_absent_objects, "the switch is restored after the run"


def test_per_slice_mode_segments_every_slice_alone(pipeline, chest, tiny_engine):
    result = pipeline.run(chest, "segment the left lung", "segment", VolumeOptions(mode="per-slice", slice_range=(16, 19),
                                                                                    fill_holes=False))
    mask = result.segments[0].mask
    source = SliceSource(chest, "axial", training_window(chest.voxels, "CT"))
    rule = PresenceRule()
    alone = {index: tiny_engine.run(source.rgb(index), "<image>\nPlease help segment the left lung in this scan.", task="segment",
                                    answer="Sure, it is [SEG].") for index in range(16, 19)}
    kept = consistent_slices({i: rule.present(Evidence.from_result(r)) for i, r in alone.items()}, 16, 19, rule)
    assert kept, "the tiny model's clear masks count as present"
    for index, single in alone.items():
        expected = single.masks[0].mask if index in kept else np.zeros_like(single.masks[0].mask)
        assert np.array_equal(source.orientation.slice(mask, index), expected)
    assert not mask[:16].any() and not mask[19:].any()


def test_hybrid_reanchors_where_propagation_lost_the_target(pipeline, chest):
    options = VolumeOptions(mode="hybrid", slice_range=(12, 20))
    source = SliceSource(chest, "axial", CT_PRESETS["lung"])
    target = parse_targets("segment the left lung")[0]
    key, key_result, _ = pipeline.find_key_slice(source, target, options, (12, 20), "test")
    anchors = {key: key_result}
    lost = {i: PropagatedSlice(np.zeros((128, 128), bool), -1.0, False, float("nan")) for i in range(12, 20)}
    lost[key] = PropagatedSlice(key_result.masks[0].mask, 1.0, True, 0.0)  # propagation found only the key slice
    propagated = pipeline._reanchor(source, target, anchors, lost, options, (12, 20), "test")
    assert len(anchors) > 1 and all(12 <= a < 20 for a in anchors)
    assert sum(1 for item in propagated.values() if item.present) > 1


def test_several_targets_give_several_segments(pipeline, chest, tmp_path):
    result = pipeline.run(chest, "Please segment the liver and the spleen in this scan.", "segment",
                          VolumeOptions(mode="per-slice", slice_range=(5, 7)))
    assert [(s.label, s.name) for s in result.segments] == [(1, "liver"), (2, "spleen")]
    assert [s.query for s in result.segments] == ["<image>\nPlease help segment the liver in this scan.",
                                                  "<image>\nPlease help segment the spleen in this scan."]
    assert set(np.unique(result.labels)) <= {0, 1, 2}


def test_outputs_are_readable_with_the_right_geometry(lung_result, chest, chest_ct_path, tmp_path):
    import slicerio

    result, _ = lung_result
    files = write_outputs(result, tmp_path / "out")
    assert not list((tmp_path / "out").glob(".*partial*")), "no temporary files left behind"
    reference = sitk.ReadImage(str(chest_ct_path))
    labelmap = sitk.ReadImage(str(files["labelmap"]))
    assert labelmap.GetSize() == reference.GetSize()
    assert np.allclose(labelmap.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    assert np.allclose(labelmap.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(labelmap), result.labels)
    segmentation = slicerio.read_segmentation(str(files["segmentation"]))
    assert [s["name"] for s in segmentation["segments"]] == ["left lung"]
    assert np.allclose(segmentation["ijkToLPS"], chest.geometry.ijk_to_lps(), atol=1e-6)
    assert np.array_equal(segmentation["voxels"].transpose(2, 1, 0), result.labels)
    labels = json.loads(files["labels"].read_text())
    assert labels["labels"][0]["label"] == 1 and labels["labels"][0]["name"] == "left lung" and labels["random_weights"]
    tsv = files["findings_tsv"].read_text().splitlines()
    assert tsv[0].split("\t")[:3] == ["finding", "location", "laterality"] and tsv[1].startswith("left lung\t")
    assert "RANDOM WEIGHTS" in files["report"].read_text()
    from PIL import Image

    preview = Image.open(files["preview"])
    assert preview.width >= 256 and preview.height > 256


@pytest.mark.slicer
def test_segmentation_file_loads_in_slicer_core(lung_result, chest, tmp_path):
    slicer = pytest.importorskip("slicer")
    result, _ = lung_result
    files = write_outputs(result, tmp_path / "out")
    scene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(files["segmentation"]))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    assert segmentation.GetNthSegment(0).GetName() == "left lung"
    labelmap = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(segmentation.GetNthSegmentID(0), labelmap)
    import vtk

    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    # Slicer crops the labelmap to its extent; compare the world position of the first voxel of that extent.
    extent = labelmap.GetExtent()
    corner = ijk_to_ras @ np.array([extent[0], extent[2], extent[4], 1.0])
    expected = chest.geometry.ijk_to_ras() @ np.array([extent[0], extent[2], extent[4], 1.0])
    assert np.allclose(corner, expected, atol=1e-4)


def test_cancel_stops_the_job(pipeline, chest):
    calls = {"n": 0}

    def cancel_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    pipeline.should_cancel = cancel_after_two
    try:
        with pytest.raises(JobCancelled):
            pipeline.run(chest, "segment the left lung", "segment", VolumeOptions(slice_range=RANGE))
    finally:
        pipeline.should_cancel = lambda: False
    assert calls["n"] == 3


def test_bad_requests(pipeline, chest):
    with pytest.raises(InputError, match="prompt is empty"):
        pipeline.run(chest, "  ", "segment")
    with pytest.raises(InputError, match="slice range"):
        pipeline.run(chest, "segment the liver", "segment", VolumeOptions(slice_range=(30, 40)))
    with pytest.raises(InputError, match="unknown mode"):
        pipeline.run(chest, "segment the liver", "segment", VolumeOptions(mode="magic"))
    with pytest.raises(InputError, match="unknown volume task"):
        pipeline.run(chest, "segment the liver", "classify")


def test_a_volume_with_one_slice_is_segmented(pipeline, chest):
    single = Volume(chest.voxels[17:18].copy(), chest.geometry, "single")
    result = pipeline.run(single, "segment the left lung", "segment")
    assert result.labels.shape == (1, 128, 128)
    assert result.segments[0].key_slice in (0, None)


def test_detect_and_report_run_on_spread_slices(pipeline, chest):
    detect = pipeline.run(chest, "Please detect the heart in this image using json format.", "detect",
                          VolumeOptions(detect_slices=2, max_new_tokens=8))
    assert isinstance(detect.boxes, list)
    report = pipeline.run(chest, "", "report", VolumeOptions(report_slices=2, max_new_tokens=8))
    assert {row["slice"] for row in report.findings} <= set(spread(0, 34, 2))
    assert report.report_findings.startswith("[slice ")


def test_boxes_on_slices_become_a_3d_box_in_patient_space():
    geometry = VoxelGeometry((2.0, 2.0, 5.0), (100.0, -50.0, 20.0), np.diag([-1.0, -1.0, 1.0]))
    volume = Volume(np.zeros((10, 40, 50), np.int16), geometry, "synthetic")
    source = SliceSource(volume, "axial", CT_PRESETS["soft_tissue"])
    per_slice = [(3, [Box(10, 5, 20, 15, "nodule")]), (4, [Box(11, 6, 21, 16, "nodule")]), (5, [Box(12, 5, 20, 15, "nodule")]),
                 (8, [Box(40, 30, 45, 35, "nodule")])]
    groups = link_boxes(per_slice, max_gap=1)
    assert [(g["first"], g["last"]) for g in groups] == [(3, 5), (8, 8)]
    box = box_to_patient(groups[0], source)
    # Display columns run to patient left; with an RAS-like direction both in-plane axes are flipped.
    # Union box x 10..21, y 5..16 (pixel edges) -> voxel centre range i: 49-(10..21)+... computed from edges:
    i_edges = (50 - 1) - np.array([21 - 0.5, 10 - 0.5])
    j_edges = (40 - 1) - np.array([16 - 0.5, 5 - 0.5])
    lps_x = 100.0 - 2.0 * i_edges
    lps_y = -50.0 - 2.0 * j_edges
    assert box["lps_min"][0] == pytest.approx(lps_x.min()) and box["lps_max"][0] == pytest.approx(lps_x.max())
    assert box["lps_min"][1] == pytest.approx(lps_y.min()) and box["lps_max"][1] == pytest.approx(lps_y.max())
    assert box["lps_min"][2] == pytest.approx(20.0 + 5.0 * 2.5) and box["lps_max"][2] == pytest.approx(20.0 + 5.0 * 5.5)
    assert box["size_mm"] == pytest.approx([22.0, 22.0, 15.0])
    assert box["ras_min"][0] == pytest.approx(-box["lps_max"][0])


@pytest.mark.parametrize("prompt, names", [
    ("segment the liver and the spleen", ["liver", "spleen"]),
    ("<image>\nPlease help segment the left lung in this scan.", ["left lung"]),
    ("segment the lesion in the left lobe", ["lesion in the left lobe"]),
    ("Find the kidneys, the liver & the aorta.", ["kidneys", "liver", "aorta"]),
    ("What is the largest organ here?", ["What is the largest organ here"]),
])
def test_targets_from_prompts(prompt, names):
    targets = parse_targets(prompt)
    assert [t.name for t in targets] == names
    if len(names) == 1 and not prompt.lower().startswith(("segment", "please", "find")):
        assert targets[0].query == prompt  # not a segmentation request: asked as it is
