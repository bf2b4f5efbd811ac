"""Preprocessing identical to the reference's `citrus_v_infer` template (tiny checkpoint's real-id tokenizer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from citrusv_backend.errors import InputError
from citrusv_backend.model.processor import (IMAGENET_MEAN, IMAGENET_STD, TASK_PIXEL_BUDGETS, PixelBudget,
                                             resize_for_qwen, smart_resize, to_rgb)

pytestmark = pytest.mark.model

SEG_BUDGET = TASK_PIXEL_BUDGETS["segment"]


@pytest.mark.parametrize("height, width, min_pixels, max_pixels, expected", [
    (120, 100, 3136, 65535, (112, 112)),        # rounds to the nearest multiple of 28
    (512, 512, 3136, 65535, (252, 252)),        # over budget: scaled down, floored to 28
    (50, 60, 200704, 1003520, (420, 504)),      # under budget: scaled up, ceiled to 28
    (512, 384, 200704, 1003520, (532, 392)),    # rounded 504x392 is just under min: ceiled up
    (700, 600, 200704, 1003520, (700, 588)),    # within budget: only rounded
    (10, 10, 3136, 65535, (56, 56)),            # tiny images grow to min_pixels (at least 28 a side)
])
def test_smart_resize_matches_qwen_vl_utils(height, width, min_pixels, max_pixels, expected):
    assert smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels) == expected
    h, w = expected
    assert h % 28 == 0 and w % 28 == 0 and min_pixels <= h * w <= max(max_pixels, 28 * 28)


def test_smart_resize_rejects_extreme_aspect_ratios_and_bad_budgets():
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2100)
    with pytest.raises(InputError, match="min_pixels"):
        smart_resize(100, 100, min_pixels=10_000, max_pixels=5_000)


def test_transparent_pixels_become_white_like_qwen_vl_utils():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgb = np.asarray(to_rgb(rgba))
    assert tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[3, 3]) == (255, 255, 255)


def test_conversation_text_and_forced_answer_tokens(tiny_engine):
    processor = tiny_engine.processor
    image = Image.new("RGB", (100, 120), (90, 90, 90))
    inputs = processor(image, "Please segment the liver.", SEG_BUDGET, answer="Sure, it is [SEG].")
    ids = inputs.input_ids[0].tolist()
    image_tokens = int(inputs.image_grid_thw.prod()) // 4
    expected_text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                     + "<|image_pad|>" * image_tokens + "<|vision_end|>Please segment the liver.<|im_end|>\n"
                     "<|im_start|>assistant\nSure, it is [SEG].<|im_end|>")
    assert processor.decode(ids) == expected_text
    # docs/reference-model.md, "Tokenisation of the forced answer": the space before [SEG] is its own token;
    # no newline after the final <|im_end|>.
    assert ids[inputs.prompt_length:] == [39814, 11, 432, 374, 220, 151665, 13, 151645]
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert inputs.mm_token_type_ids[0].tolist() == [int(t == 151655) for t in ids]
    assert sum(t == 151655 for t in ids) == image_tokens


def test_qwen_side_resizes_once_with_pil_bicubic(tiny_engine):
    """pixel_values must be the smart-resized (bicubic) image, only rescaled/normalised/patched."""
    processor = tiny_engine.processor
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (131, 97, 3), dtype=np.uint8))
    inputs = processor(image, "Describe.", SEG_BUDGET)
    resized = image.resize((inputs.resized_size[1], inputs.resized_size[0]), Image.BICUBIC)
    expected = processor.image_processor(images=[resized], do_resize=False, return_tensors="pt")["pixel_values"]
    assert inputs.resized_size == (140, 84)
    assert inputs.image_grid_thw[0].tolist() == [1, 140 // 14, 84 // 14]
    assert np.array_equal(inputs.pixel_values.numpy(), expected.numpy())
    other = processor.image_processor(images=[image.resize((84, 140), Image.BILINEAR)], do_resize=False,
                                      return_tensors="pt")["pixel_values"]
    assert not np.array_equal(inputs.pixel_values.numpy(), other.numpy())


def test_sam2_input_is_the_qwen_resized_image_lanczos_stretched(tiny_engine):
    processor = tiny_engine.processor
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (150, 90, 3), dtype=np.uint8))
    inputs = processor(image, "Segment.", SEG_BUDGET)
    size = processor.sam2_image_size
    assert tuple(inputs.sam2_pixel_values.shape) == (1, 3, size, size) and size == 1024
    values = inputs.sam2_pixel_values[0].numpy().transpose(1, 2, 0).astype(np.float64)
    recovered = (values * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255.0
    qwen_resized = resize_for_qwen(image, SEG_BUDGET)
    expected = np.asarray(qwen_resized.resize((size, size), Image.LANCZOS), dtype=np.float64)
    assert np.abs(recovered - expected).max() < 1e-3
    from_original = np.asarray(image.resize((size, size), Image.LANCZOS), dtype=np.float64)
    assert np.abs(recovered - from_original).max() > 1.0  # the original image would be a different input


def test_empty_prompt_is_rejected(tiny_engine):
    with pytest.raises(InputError, match="prompt is empty"):
        tiny_engine.processor(Image.new("RGB", (64, 64)), "   ", SEG_BUDGET)


def test_budget_is_per_task():
    assert TASK_PIXEL_BUDGETS["segment"] == PixelBudget(3136, 65535)
    # eval/eval_detection.py sets MAX_PIXELS=1003520 and leaves MIN_PIXELS unset: qwen_vl_utils' 3136.
    assert TASK_PIXEL_BUDGETS["detect"] == PixelBudget(3136, 1003520)
    assert TASK_PIXEL_BUDGETS["report"] == PixelBudget(200704, 1003520)


@pytest.mark.parametrize("prompt, answer, token", [
    ("Segment <|image_pad|> the liver", None, "<|image_pad|>"),
    ("Is there a [SEG] here?", None, r"\[SEG\]"),
    ("Segment the liver", "Sure <|vision_start|>", "<|vision_start|>"),
])
def test_special_tokens_in_user_text_are_refused(tiny_engine, prompt, answer, token):
    """Image placeholders would desynchronise image features and tokens; a [SEG] in a question would
    produce a phantom mask."""
    with pytest.raises(InputError, match=f"special token {token}"):
        tiny_engine.processor(Image.new("RGB", (64, 64)), prompt, SEG_BUDGET, answer=answer)


# ---------------------------------------------------------------------------------------------- <image> tags

def swift_prompt_ids(tokenizer, query: str, image_tokens: int | None) -> list[int]:
    """ms-swift's encoding of a one-turn query, restated step by step from its source (swift/llm/template):
    `_add_default_tags` puts `<image>` in front of a query that has none (no newline); `_split_special_tokens` +
    `_pre_tokenize_images` replace the first tag with the image block (only as many tags as images); then
    `_simplify_context_list` joins the strings and the whole conversation is tokenised at once; finally
    `Qwen2VLTemplate._encode` widens the one `<|image_pad|>` to the image's token count."""
    if image_tokens is not None and "<image>" not in query:
        query = "<image>" + query
    text = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{query}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    if image_tokens is not None:
        text = text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>", 1)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if image_tokens is None:
        return ids
    pad = ids.index(151655)
    return ids[:pad] + [151655] * image_tokens + ids[pad + 1:]


TAGGED_QUERIES = [
    "<image>\nPlease help segment the liver in this scan.",        # MeCoVQA-G / projects/inference.py form
    "<image>\nLocate the liver, output its bbox coordinates using JSON format.",  # eval_detection.py
    "<image>Please detect the heart in the given image using bounding box.",     # eval_detection.py, no newline
    "Please help segment the liver in this scan.",                 # no tag: the image goes first
    "Look at <image> and find the liver.",                         # text before the image
    "\n\n<image>\nQ",                                              # newlines on both sides merge differently
    "  <image>  Q",
    "<image><image>\nQ",                                           # one image: the second tag stays text
    "Q<image>",                                                    # the image last
    "<IMAGE>\nQ",                                                  # not a tag (swift matches it exactly)
]


@pytest.mark.parametrize("query", TAGGED_QUERIES)
def test_the_first_image_tag_is_the_images_position_as_in_swift(tiny_engine, query):
    processor = tiny_engine.processor
    image = Image.new("RGB", (100, 120), (90, 90, 90))
    inputs = processor(image, query, SEG_BUDGET)
    tokens = int(inputs.image_grid_thw.prod()) // 4
    assert inputs.input_ids[0].tolist() == swift_prompt_ids(processor.tokenizer, query, tokens)


def test_the_text_after_the_tag_newline_included_follows_the_image(tiny_engine):
    processor = tiny_engine.processor
    image = Image.new("RGB", (56, 56), (90, 90, 90))
    text = processor.decode(processor(image, "<image>\nPlease help segment the liver in this scan.", SEG_BUDGET).input_ids[0])
    assert "<|vision_end|>\nPlease help segment the liver in this scan.<|im_end|>" in text
    assert "<image>" not in text and text.count("<|vision_start|>") == 1
    assert "user\n<|vision_start|>" in text


@pytest.mark.parametrize("query", ["What is a pneumothorax?", "<image>\nWhat is shown?"])
def test_a_text_only_question_has_no_image_block(tiny_engine, query):
    processor = tiny_engine.processor
    inputs = processor(None, query, SEG_BUDGET)
    assert inputs.input_ids[0].tolist() == swift_prompt_ids(processor.tokenizer, query, None)
    assert inputs.pixel_values is None and inputs.sam2_pixel_values is None and inputs.original_size is None
    assert set(inputs.qwen_kwargs(torch.device("cpu"))) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert not inputs.mm_token_type_ids.any()


def test_an_empty_question_about_an_image_only_when_allowed(tiny_engine):
    processor = tiny_engine.processor
    image = Image.new("RGB", (56, 56), (90, 90, 90))
    inputs = processor(image, "", SEG_BUDGET, allow_empty=True)
    tokens = int(inputs.image_grid_thw.prod()) // 4
    assert inputs.input_ids[0].tolist() == swift_prompt_ids(processor.tokenizer, "", tokens)
    with pytest.raises(InputError, match="prompt is empty"):
        processor(None, " ", SEG_BUDGET, allow_empty=True)  # nothing to answer about
