"""The volume tasks ask the model what the reference asks: detection and report prompts verbatim, the eval's pixel
budget, a radiograph-like image for chest-CT reports, the model's own answer where asked, the reference's mask
upsampling; and every option reaches the CLI, the service's job options and batch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from citrusv_backend.errors import InputError
from citrusv_backend.inference.engine import CitrusVEngine, record_final_hidden_states, upsample_mask
from citrusv_backend.model.processor import SEG_TOKEN, TASK_PIXEL_BUDGETS
from citrusv_backend.volume.input.io import Volume, read_volume
from citrusv_backend.volume.options import VolumeOptions
from citrusv_backend.volume.outputs.files import report_markdown, write_outputs
from citrusv_backend.volume.slices.projection import radiograph_projection
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import CT_PRESETS, training_window
from citrusv_backend.volume.tasks.pipeline import VolumePipeline
from citrusv_backend.volume.tasks.propagation import SliceFrames, propagate
from citrusv_backend.volume.tasks.report import REPORT_PROMPT

pytestmark = pytest.mark.model

SEG_ID = 151665


@pytest.fixture(scope="module")
def chest(chest_ct_path):
    return read_volume(chest_ct_path)


@pytest.fixture
def calls(tiny_engine, monkeypatch):
    """Every engine.run call of a test: (prompt, task, min_pixels, max_pixels, answer, image shape)."""
    recorded = []
    original = tiny_engine.run

    def spy(image, prompt, task="ask", **kwargs):
        recorded.append({"prompt": prompt, "task": task, "shape": np.asarray(image).shape, **kwargs})
        return original(image, prompt, task=task, **kwargs)

    monkeypatch.setattr(tiny_engine, "run", spy)
    return recorded


# ---------------------------------------------------------------------------------------------- detection

def test_detection_asks_with_the_eval_template_and_budget(tiny_engine, chest, calls):
    result = VolumePipeline(tiny_engine).run(chest, "Please detect the left and right kidneys in this image.", "detect",
                                             VolumeOptions(detect_slices=1, max_new_tokens=4))
    assert [c["prompt"] for c in calls] == [
        "<image>\nLocate the left kidney, output its bbox coordinates using JSON format.",
        "<image>\nLocate the right kidney, output its bbox coordinates using JSON format."]
    # eval/eval_detection.py: MAX_PIXELS=1003520, MIN_PIXELS unset (qwen_vl_utils' 3136).
    assert {(c["min_pixels"], c["max_pixels"]) for c in calls} == {(3136, 1003520)}
    assert all(box["target"] in ("left kidney", "right kidney") for box in result.boxes)


# ---------------------------------------------------------------------------------------------- reports

def test_reports_use_the_reference_prompt_and_are_marked_experimental_everywhere(tiny_engine, chest, calls, tmp_path):
    from citrusv_backend.server.payloads import volume_result_payload

    result = VolumePipeline(tiny_engine).run(chest, "", "report", VolumeOptions(report_slices=1, max_new_tokens=4))
    assert calls[0]["prompt"] == REPORT_PROMPT == \
        "Evaluate the provided chest radiograph and compile a report. Let's think step by step."
    assert {(c["min_pixels"], c["max_pixels"]) for c in calls} == {(200704, 1003520)}
    assert "EXPERIMENTAL" in result.experimental and "CT slices" in result.experimental
    assert "projection" in result.experimental, "chest CT: the projection is offered"
    files = write_outputs(result, tmp_path)
    assert json.loads(files["findings_json"].read_text())["experimental"] == result.experimental
    assert result.experimental in files["report"].read_text() and result.experimental in report_markdown(result)
    payload = volume_result_payload(result, chest)
    assert payload["experimental"] == result.experimental and payload["report"]["experimental"] == result.experimental
    own = VolumePipeline(tiny_engine).run(chest, "Describe the lungs.", "report", VolumeOptions(report_slices=1,
                                                                                               max_new_tokens=4))
    assert calls[-1]["prompt"] == "Describe the lungs." and own.experimental


def test_a_report_can_be_written_from_a_radiograph_like_projection(tiny_engine, chest, calls, tmp_path):
    result = VolumePipeline(tiny_engine).run(chest, "", "report", VolumeOptions(report_image="projection",
                                                                                max_new_tokens=4))
    assert len(calls) == 1 and calls[0]["shape"] == result.report_image.shape
    assert "projections of CT volumes" in result.experimental
    assert all(row["slice"] is None for row in result.findings)
    files = write_outputs(result, tmp_path)
    assert Image.open(files["report_image"]).size == result.report_image.shape[1::-1]
    mr = Volume(chest.voxels.astype(np.float32) + 2000, chest.geometry, "mr", modality="MR")
    with pytest.raises(InputError, match="needs CT"):
        VolumePipeline(tiny_engine).run(mr, "", "report", VolumeOptions(report_image="projection"))


@pytest.mark.unit
def test_projection_looks_like_a_frontal_radiograph(chest, chest_ct_segmentation_path):
    """Lungs dark, spine bright, superior up, patient right on the image's left, square pixels."""
    import slicerio

    image = radiograph_projection(chest)
    spacing = chest.geometry.spacing  # (i, j, k): 3.05 x 3.05 x 10 mm; 34 slices -> 340 mm -> 112 rows
    assert image.shape == (round(34 * spacing[2] / spacing[0]), 128, 3) and image.dtype == np.uint8
    labels = slicerio.read_segmentation(str(chest_ct_segmentation_path))["voxels"].transpose(2, 1, 0)
    from citrusv_backend.volume.slices.orientation import display_orientation

    orientation = display_orientation(chest.geometry.direction, "coronal")

    def footprint(values):  # where a structure lies in the projection (resized like the image)
        plane = orientation.arrange(np.isin(labels, values).sum(axis=orientation.slice_axis) > 0)
        return np.asarray(Image.fromarray(plane.astype(np.uint8) * 255).resize(image.shape[1::-1], Image.NEAREST)) > 0

    gray = image[:, :, 0].astype(float)
    lungs, spine = footprint((5, 6)) & ~footprint((2, 3, 4)), footprint((3,))
    assert gray[lungs].mean() + 40 < gray[spine].mean(), "the spine is brighter than the lungs"
    rows = lambda mask: np.argwhere(mask)[:, 0].mean()  # noqa: E731
    cols = lambda mask: np.argwhere(mask)[:, 1].mean()  # noqa: E731
    assert rows(footprint((2,))) < rows(footprint((4,))), "cervical above lumbar: superior up"
    assert cols(footprint((5,))) < cols(footprint((6,))), "right lung on the image's left"


# ---------------------------------------------------------------------------------------------- free answers

@pytest.fixture(scope="module")
def seg_prone(tiny_checkpoint, chest):
    """A copy of the tiny model whose lm_head is nudged so that greedy decoding writes [SEG]."""
    engine = CitrusVEngine.load(tiny_checkpoint, device="cpu")
    source = SliceSource(chest, "axial", training_window(chest.voxels))
    inputs = engine.processor(Image.fromarray(source.rgb(17)), "<image>\nPlease help segment the left lung in this scan.",
                              TASK_PIXEL_BUDGETS["segment"])
    with torch.no_grad(), record_final_hidden_states(engine.model.final_norm) as recorded:
        engine.model.mllm(**inputs.qwen_kwargs(torch.device("cpu")))
        last = recorded[0][0, -1]
        engine.model.mllm.lm_head.weight[SEG_ID] = last * (40.0 / last.dot(last))
    return engine


@pytest.mark.slow
def test_free_answer_mode_forces_the_models_own_answer(seg_prone, chest, monkeypatch):
    answers, generations = [], []
    batch, run = seg_prone.segment_inputs, seg_prone.run

    def forced(inputs, prompt, answer, *args, **options):
        answers.extend([answer] * len(inputs))
        return batch(inputs, prompt, answer, *args, **options)

    def free(image, prompt, **options):
        generations.append(options.get("answer"))
        return run(image, prompt, **options)

    monkeypatch.setattr(seg_prone, "segment_inputs", forced)
    monkeypatch.setattr(seg_prone, "run", free)
    options = VolumeOptions(mode="per-slice", slice_range=(16, 19), answer_mode="free", max_new_tokens=3)
    result = VolumePipeline(seg_prone).run(chest, "segment the left lung", "segment", options)
    segment = result.segments[0]
    assert generations == [None], "one free generation per target (the key slice), then cached"
    assert segment.answer_source == "generated" and SEG_TOKEN in segment.answer and segment.answer != options.answer
    assert set(answers) == {segment.answer}, "the generated answer is forced on every slice"
    assert segment.describe()["answer"] == segment.answer


@pytest.mark.slow
def test_free_answer_without_seg_falls_back_and_says_so(tiny_engine, chest):
    options = VolumeOptions(mode="per-slice", slice_range=(17, 18), answer_mode="free", max_new_tokens=3)
    segment = VolumePipeline(tiny_engine).run(chest, "segment the left lung", "segment", options).segments[0]
    assert segment.answer_source == "forced" and segment.answer == options.answer
    assert f"had no {SEG_TOKEN}" in segment.answer_note


# ---------------------------------------------------------------------------------------------- mask upsampling

def test_nearest_mask_upsampling_reaches_the_volume_path(tiny_engine, chest):
    options = VolumeOptions(mode="per-slice", slice_range=(16, 18), fill_holes=False, mask_upsampling="nearest")
    result = VolumePipeline(tiny_engine).run(chest, "segment the left lung", "segment", options)
    source = SliceSource(chest, "axial", training_window(chest.voxels))
    for index in (16, 17):
        alone = tiny_engine.segment(source.rgb(index), "<image>\nPlease help segment the left lung in this scan.",
                                    mask_upsampling="nearest")
        assert np.array_equal(source.orientation.slice(result.segments[0].mask, index), alone.masks[0].mask)
    assert result.settings["mask_upsampling"] == "nearest"


def test_nearest_mask_upsampling_in_propagation(tiny_engine, chest, monkeypatch):
    source = SliceSource(chest, "axial", CT_PRESETS["lung"])
    frames = SliceFrames(source.rgb, 14, 4, TASK_PIXEL_BUDGETS["segment"], 1024)
    key = np.zeros((1024, 1024), bool)
    key[300:700, 200:500] = True
    predictor = tiny_engine.video_predictor()
    nearest = []
    original = predictor._get_orig_video_res_output

    def keep(state, masks):  # SAM2's 256x256 logits of every frame it returns
        nearest.append(upsample_mask(masks[0, 0].float().cpu()[None], (source.height, source.width), "nearest")[0].numpy())
        return original(state, masks)

    monkeypatch.setattr(predictor, "_get_orig_video_res_output", keep)
    results = propagate(predictor, frames, source.height, source.width, {1: key}, stop_after_empty=9,
                        mask_upsampling="nearest")
    assert sorted(results) == [0, 1, 2, 3]
    for frame, item in results.items():
        assert any(np.array_equal(item.mask, candidate) for candidate in nearest), frame


# ---------------------------------------------------------------------------------------------- every entry point

NEW_OPTIONS = ["--presence", "both", "--object-score-suppression", "--answer-mode", "free", "--mask-upsampling", "nearest",
               "--window", "clinical"]
EXPECTED = {"presence": "both", "object_score_suppression": True, "answer_mode": "free", "mask_upsampling": "nearest",
            "window": "clinical"}


@pytest.mark.unit
def test_options_reach_the_command_line_and_batch(tmp_path):
    from citrusv_backend.cli import build_parser, volume_options

    parser = build_parser()
    segment = volume_options(parser.parse_args(["segment", "ct.nii.gz", "--prompt", "x", "--out", "o", *NEW_OPTIONS]))
    batch = volume_options(parser.parse_args(["batch", "in", "--out", "o", *NEW_OPTIONS, "--report-image", "projection"]))
    report = volume_options(parser.parse_args(["report", "ct.nii.gz", "--out", "o", "--report-image", "projection"]))
    for options in (segment, batch):
        assert {key: getattr(options, key) for key in EXPECTED} == EXPECTED
    assert batch.report_image == report.report_image == "projection"
    defaults = volume_options(parser.parse_args(["detect", "ct.nii.gz", "--prompt", "x", "--out", "o"]))
    assert (defaults.presence, defaults.object_score_suppression, defaults.answer_mode, defaults.mask_upsampling,
            defaults.window) == ("mask", False, "forced", "bilinear", "auto")
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "ct.nii.gz", "--prompt", "x", "--out", "o", "--presence", "vibes"])


@pytest.mark.unit
def test_options_reach_the_service_job_options(chest):
    from citrusv_backend.server.schemas import JobOptions, JobRequest
    from citrusv_backend.server.tasks import validate_volume_job

    options = JobOptions(**EXPECTED, report_image="projection").to_volume_options()
    assert {key: getattr(options, key) for key in EXPECTED} == EXPECTED and options.report_image == "projection"
    with pytest.raises(Exception, match="presence"):
        JobOptions(presence="vibes")
    mr = Volume(chest.voxels.astype(np.float32), chest.geometry, "mr", modality="MR")
    request = JobRequest(volume_id="v", task="report", options=JobOptions(report_image="projection"))
    with pytest.raises(InputError, match="needs a CT"):
        validate_volume_job(request, mr, 4096)
    validate_volume_job(request, chest, 4096)
    with pytest.raises(InputError, match="window"):
        validate_volume_job(JobRequest(volume_id="v", task="segment", prompt="segment the liver",
                                       options=JobOptions(window="wide")), chest, 4096)


@pytest.mark.unit
def test_bad_option_values_are_clear_errors(chest):
    for field, value in (("presence", "vibes"), ("answer_mode", "sometimes"), ("mask_upsampling", "cubic"),
                         ("report_image", "photo")):
        with pytest.raises(InputError, match="unknown"):
            VolumeOptions(**{field: value}).validate(34)
