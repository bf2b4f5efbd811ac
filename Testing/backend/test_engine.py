"""The 2D tasks with the tiny checkpoint: the [SEG] state, the SAM2 path piece by piece, one-pass generation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from citrusv_backend.errors import InputError
from citrusv_backend.inference.engine import CitrusVEngine, record_final_hidden_states, upsample_mask
from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS

pytestmark = pytest.mark.model

PROMPT = "Please help segment the left lung in this scan."
FORCED = "Sure, it is [SEG]."
SEG_ID = 151665


def full_forward_hidden(engine: CitrusVEngine, inputs) -> torch.Tensor:
    """hidden_states[-1] of one plain forward of the whole sequence (the reference's definition)."""
    kwargs = inputs.qwen_kwargs(torch.device("cpu"))
    with torch.no_grad():
        output = engine.model.mllm(**kwargs, output_hidden_states=True)
    return output.hidden_states[-1][0]


def test_seg_hidden_state_is_taken_at_the_seg_token(tiny_engine, ct_slice_rgb):
    result = tiny_engine.segment(ct_slice_rgb, PROMPT, answer=FORCED)
    inputs = tiny_engine.processor(Image.fromarray(ct_slice_rgb), PROMPT, TASK_PIXEL_BUDGETS["segment"], answer=FORCED)
    ids = inputs.input_ids[0]
    position = int((ids == SEG_ID).nonzero()[0, 0])
    assert len(result.masks) == 1 and result.masks[0].token_position == position
    reference = full_forward_hidden(tiny_engine, inputs)
    assert torch.equal(torch.from_numpy(result.masks[0].seg_hidden), reference[position])
    # Not the state before [SEG] (LISA's convention), and M-RoPE positions matter (mm_token_type_ids).
    assert not torch.allclose(reference[position - 1], reference[position])
    kwargs = inputs.qwen_kwargs(torch.device("cpu"))
    kwargs.pop("mm_token_type_ids")
    with torch.no_grad():
        one_d = tiny_engine.model.mllm(**kwargs, output_hidden_states=True).hidden_states[-1][0]
    assert (one_d[position] - reference[position]).abs().max() > 1e-4


def test_mask_path_matches_the_sam2_modules_piece_by_piece(tiny_engine, ct_slice_rgb, monkeypatch):
    model = tiny_engine.model
    sam2 = model.grounding_encoder.sam2_model
    result = tiny_engine.segment(ct_slice_rgb, PROMPT, answer=FORCED, mask_upsampling="bilinear")
    found = result.masks[0]
    with torch.no_grad():
        embedding = model.seg_projector(torch.from_numpy(found.seg_hidden)[None])
    assert torch.allclose(embedding[0], torch.from_numpy(found.seg_embedding), atol=1e-6)
    assert found.seg_embedding.shape == (sam2.hidden_dim,)

    inputs = tiny_engine.processor(Image.fromarray(ct_slice_rgb), PROMPT, TASK_PIXEL_BUDGETS["segment"], answer=FORCED)
    with torch.no_grad():
        backbone = sam2.forward_image(inputs.sam2_pixel_values)
        _, feats, _, sizes = sam2._prepare_backbone_features(backbone)
        image_embed = (feats[-1] + sam2.no_mem_embed).permute(1, 2, 0).reshape(1, sam2.hidden_dim, *sizes[-1])
        high_res = [f.permute(1, 2, 0).reshape(1, f.size(2), *s) for f, s in zip(feats[:-1], sizes[:-1])]
        # SAM2's own head, with the language token appended after its sparse point tokens (the reference's hook).
        encode_prompts = sam2.sam_prompt_encoder.forward

        def with_language_token(*args, **kwargs):
            sparse, dense = encode_prompts(*args, **kwargs)
            assert sparse.shape[1] == 2, "two not-a-point tokens precede the [SEG] token"
            return torch.cat([sparse, embedding[:, None]], dim=1), dense

        monkeypatch.setattr(sam2.sam_prompt_encoder, "forward", with_language_token)
        multimask_output = sam2._use_multimask(is_init_cond_frame=True, point_inputs=None)

        def sam2_heads():
            return sam2._forward_sam_heads(backbone_features=image_embed, point_inputs=None, mask_inputs=None,
                                           high_res_features=high_res, multimask_output=multimask_output)

        suppressed = sam2_heads()
        # The reference comments out SAM2's "no object -> -1024" suppression; SAM2 without it:
        monkeypatch.setattr(sam2, "pred_obj_scores", False)
        multimask, _, ious, best, _, _, object_score = sam2_heads()
    assert multimask.shape[1] == 3, "multimask output: three candidates"
    assert np.isclose(found.iou, float(ious.max()), atol=1e-6)
    assert np.isclose(found.object_score, float(suppressed[-1]), atol=1e-6)
    assert torch.allclose(torch.from_numpy(found.low_res_logits), best[0, 0], atol=1e-5)
    if found.object_score > 0:
        assert torch.allclose(suppressed[3][0, 0], best[0, 0], atol=1e-5)
    else:
        assert torch.all(suppressed[3] == -1024.0) and not np.all(found.low_res_logits == -1024.0)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(found.low_res_logits)[None, None],
                                                size=ct_slice_rgb.shape[:2], mode="bilinear", align_corners=False)
    assert np.array_equal(found.mask, (upsampled[0, 0] > 0).numpy())


def test_nearest_mode_is_the_reference_resize(tiny_engine, ct_slice_rgb):
    result = tiny_engine.segment(ct_slice_rgb, PROMPT, mask_upsampling="nearest")
    logits = result.masks[0].low_res_logits
    binary = ((1 / (1 + np.exp(-logits.astype(np.float64)))) > 0.5).astype(np.uint8) * 255
    height, width = ct_slice_rgb.shape[:2]
    expected = np.asarray(Image.fromarray(binary).resize((width, height), Image.NEAREST)) > 0
    assert np.array_equal(result.masks[0].mask, expected)
    bilinear = tiny_engine.segment(ct_slice_rgb, PROMPT, mask_upsampling="bilinear").masks[0]
    assert np.array_equal(bilinear.low_res_logits, logits)


def test_upsampling_of_a_known_logit_map():
    logits = torch.full((1, 4, 4), -5.0)
    logits[0, :2, :2] = 5.0
    bilinear = upsample_mask(logits, (8, 8), "bilinear")[0].numpy()
    nearest = upsample_mask(logits, (8, 8), "nearest")[0].numpy()
    expected = np.zeros((8, 8), bool)
    expected[:4, :4] = True
    assert np.array_equal(nearest, expected) and np.array_equal(bilinear, expected)
    with pytest.raises(InputError):
        upsample_mask(logits, (8, 8), "bicubic")


def test_sam2_image_is_encoded_once_for_several_seg_tokens(tiny_engine, ct_slice_rgb, monkeypatch):
    sam2 = tiny_engine.model.grounding_encoder.sam2_model
    calls = []
    original = sam2.forward_image
    monkeypatch.setattr(sam2, "forward_image", lambda batch: calls.append(batch.shape) or original(batch))
    result = tiny_engine.segment(ct_slice_rgb, "Segment the left and the right lung.",
                                 answer="Sure, the left lung is [SEG] and the right lung is [SEG].")
    assert len(result.masks) == 2 and len(calls) == 1 and calls[0][0] == 1
    positions = [m.token_position for m in result.masks]
    assert positions[0] < positions[1]
    single = tiny_engine.segment(ct_slice_rgb, "Segment the left and the right lung.",
                                 answer="Sure, the left lung is [SEG]")
    assert np.allclose(single.masks[0].low_res_logits, result.masks[0].low_res_logits, atol=1e-5)


@pytest.fixture(scope="module")
def seg_prone_engine(tiny_checkpoint, ct_slice_rgb):
    """A separate copy of the tiny model whose lm_head is nudged so that greedy decoding emits [SEG]."""
    engine = CitrusVEngine.load(tiny_checkpoint, device="cpu")
    inputs = engine.processor(Image.fromarray(ct_slice_rgb), PROMPT, TASK_PIXEL_BUDGETS["segment"])
    with torch.no_grad(), record_final_hidden_states(engine.model.final_norm) as recorded:
        engine.model.mllm(**inputs.qwen_kwargs(torch.device("cpu")))
        last = recorded[0][0, -1]
        engine.model.mllm.lm_head.weight[SEG_ID] = last * (40.0 / last.dot(last))
    return engine


def test_generation_and_forced_answer_give_the_same_masks(seg_prone_engine, ct_slice_rgb):
    generated = seg_prone_engine.run(ct_slice_rgb, PROMPT, task="segment", max_new_tokens=4)
    assert SEG_ID in generated.generated_ids, generated.text
    assert len(generated.masks) == generated.generated_ids.count(SEG_ID) >= 1
    forced = seg_prone_engine.run(ct_slice_rgb, PROMPT, task="segment", answer=generated.text)
    assert forced.generated_ids[: len(generated.generated_ids)] == generated.generated_ids
    assert len(forced.masks) == len(generated.masks)
    for ours, theirs in zip(generated.masks, forced.masks):
        assert ours.token_position == theirs.token_position
        assert np.allclose(ours.seg_hidden, theirs.seg_hidden, atol=1e-5)
        assert np.allclose(ours.low_res_logits, theirs.low_res_logits, atol=1e-4)
        assert np.array_equal(ours.mask, theirs.mask) or np.mean(ours.mask != theirs.mask) < 1e-3


def test_a_seg_token_at_the_token_limit_still_gets_its_mask(seg_prone_engine, ct_slice_rgb):
    result = seg_prone_engine.run(ct_slice_rgb, PROMPT, task="segment", max_new_tokens=1)
    assert result.generated_ids == [SEG_ID]
    assert len(result.masks) == 1
    forced = seg_prone_engine.run(ct_slice_rgb, PROMPT, task="segment", answer="[SEG]")
    assert np.allclose(result.masks[0].low_res_logits, forced.masks[0].low_res_logits, atol=1e-4)


def test_greedy_generation_is_deterministic_and_plain(tiny_engine, ct_slice_rgb):
    first = tiny_engine.ask(ct_slice_rgb, "What is shown?", max_new_tokens=6)
    second = tiny_engine.ask(ct_slice_rgb, "What is shown?", max_new_tokens=6)
    assert first.generated_ids == second.generated_ids and len(first.generated_ids) == 6
    inputs = tiny_engine.processor(Image.fromarray(ct_slice_rgb), "What is shown?", TASK_PIXEL_BUDGETS["ask"])
    kwargs = inputs.qwen_kwargs(torch.device("cpu"))
    with torch.no_grad():
        plain = tiny_engine.model.mllm.generate(**kwargs, max_new_tokens=6, do_sample=False)
    assert plain[0, inputs.prompt_length:].tolist() == first.generated_ids


def test_detect_parses_and_scales_boxes(tiny_engine, ct_slice_rgb):
    answer = '```json\n[{"bbox_2d": [56, 112, 280, 336], "label": "left lung"}]\n```'
    # min_pixels 200704 (the training value) gives a 448x448 frame; detection's default, the eval's 3136, gives 140x140.
    result = tiny_engine.run(ct_slice_rgb, "Please detect the left lung in this image using json format.",
                             task="detect", answer=answer, min_pixels=200704)
    assert result.resized_size == (448, 448) and result.original_size == (128, 128)
    assert tiny_engine.run(ct_slice_rgb, "Locate the left lung.", task="detect", answer=answer).resized_size == (140, 140)
    assert len(result.boxes) == 1 and result.boxes[0].label == "left lung"
    box = result.boxes[0]
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((16, 32, 80, 96))
    assert result.boxes_resized[0].x2 == 280


def test_report_parses_findings_and_scales_regions(tiny_engine, ct_slice_rgb):
    answer = ('<think> Step 1: Lungs. <bbox>{"Part":"left lung","bbox":[224, 56, 448, 392]}</bbox> clear. </think>'
              '<answer> FINDINGS: No pleural effusion. A 2 cm nodule in the right upper lobe. '
              'IMPRESSION: Right upper lobe nodule. </answer>')
    result = tiny_engine.report(ct_slice_rgb, "Write a report.", answer=answer)
    report = result.report
    assert report is not None and not result.problems
    assert report.regions[0].part == "left lung"
    assert (report.regions[0].box.x1, report.regions[0].box.x2) == pytest.approx((64, 128))
    assert any(f.laterality == "right" for f in report.findings)
    assert any(f.negated for f in report.findings)


def test_bad_inputs_are_clear_errors(tiny_engine, tmp_path):
    with pytest.raises(InputError, match="prompt is empty"):
        tiny_engine.segment(np.zeros((64, 64, 3), np.uint8), "")
    bad = tmp_path / "slice.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        tiny_engine.segment(bad, PROMPT)
    with pytest.raises(InputError, match="no such image"):
        tiny_engine.segment(tmp_path / "missing.png", PROMPT)
    with pytest.raises(InputError, match="uint8"):
        tiny_engine.segment(np.zeros((64, 64), np.float32), PROMPT)
    with pytest.raises(InputError, match="unknown task"):
        tiny_engine.run(np.zeros((64, 64), np.uint8), PROMPT, task="classify")


def test_results_serialise(tiny_engine, ct_slice_rgb):
    import json

    result = tiny_engine.segment(ct_slice_rgb, PROMPT)
    payload = json.loads(json.dumps(result.to_json_dict()))
    assert payload["random_weights"] is True and payload["text"] == FORCED
    arrays = result.arrays()
    assert arrays["low_res_logits"].shape == (1, 256, 256) and arrays["low_res_logits"].dtype == np.float32
    assert arrays["masks"].shape == (1, 128, 128) and arrays["masks"].dtype == bool
    assert arrays["seg_hidden"].shape == (1, 64) and arrays["seg_embedding"].shape == (1, 32)
    assert arrays["iou"].shape == (1,) and arrays["object_score"].shape == (1,)
    empty = tiny_engine.ask(ct_slice_rgb, "Hello", max_new_tokens=2).arrays()
    assert empty["masks"].shape == (0, 128, 128)
