"""A conversation's prompt, token for token, as transformers renders Qwen2.5-VL's chat template for a multi-turn,
multi-image conversation (earlier answers included, text-only turns among them); and the reference's single-turn
prompts unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS, ChatTurn

pytestmark = pytest.mark.model

# Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json, verbatim (the hub is not reachable from tests).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

BUDGET = TASK_PIXEL_BUDGETS["ask"]


def transformers_ids(tokenizer, messages: list[dict], image_tokens: list[int]) -> list[int]:
    """transformers' rendering (`apply_chat_template`), each `<|image_pad|>` expanded to its image's placeholders
    as `Qwen2_5_VLProcessor.__call__` does (grid t*h*w / merge_size**2), the whole text tokenised at once."""
    text = tokenizer.apply_chat_template(messages, chat_template=QWEN25_VL_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(image_tokens) + 1
    expanded = pieces[0] + "".join("<|image_pad|>" * n + after for n, after in zip(image_tokens, pieces[1:]))
    return tokenizer(expanded, add_special_tokens=False)["input_ids"]


def _images(processor, sizes):
    rng = np.random.default_rng(4)
    return [processor.prepare_image(rng.integers(0, 256, size, dtype=np.uint8), BUDGET, sam2=False) for size in sizes]


def _user(text: str, image: bool) -> dict:
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


CONVERSATIONS = {
    "two turns, two images": [
        ("What is in this slice?", True, "A chest CT slice showing both lungs."),
        ("Please help segment the left lung in this scan.", True, None)],
    "three turns, a text-only follow-up": [
        ("What is in this slice?", True, "Both lungs and the heart."),
        ("Segment the nodule and locate it.", True,
         'Sure, it is [SEG]. ```json\n[{"bbox_2d": [12, 30, 60, 90], "label": "nodule"}]\n```'),
        ("And how large is it?", False, None)],
    "three turns, text first": [
        ("Hello, can you read CT scans?", False, "Yes."),
        ("Is there an effusion?\nAnswer briefly.", True, "No effusion. 中文 ok"),
        ("<image>Compare with this one.", True, None)],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversation_prompt_equals_transformers_chat_template(tiny_engine, name):
    processor = tiny_engine.processor
    turns = CONVERSATIONS[name]
    images = iter(_images(processor, [(128, 128), (96, 160), (64, 200)]))
    history, messages, image_tokens = [], [], []
    for text, with_image, answer in turns:
        prepared = [next(images)] if with_image else []
        history.append((text, prepared, answer))
        image_tokens += [p.image_tokens(processor.merge_size) for p in prepared]
        # A typed <image> marks the image's place in swift; in transformers' messages the image part stands first.
        messages.append(_user(text.replace("<image>", ""), with_image))
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    inputs = processor.conversation_inputs(history, focus=None)
    assert inputs.input_ids[0].tolist() == transformers_ids(processor.tokenizer, messages, image_tokens)
    assert inputs.prompt_length == inputs.input_ids.shape[1]
    # Several images: their patches in order, one grid row each, and M-RoPE's token types at every placeholder.
    assert inputs.image_grid_thw.shape == (len(image_tokens), 3)
    assert inputs.pixel_values.shape[0] == int(inputs.image_grid_thw.prod(dim=1).sum())
    assert int(inputs.mm_token_type_ids.sum()) == sum(image_tokens)


def test_single_turn_prompt_is_the_one_turn_conversation_and_unchanged(tiny_engine):
    """The reference's single-turn prompt (tests/test_processor.py pins its text) is the conversation of one turn."""
    processor = tiny_engine.processor
    [image] = _images(processor, [(120, 100)])
    tokens = image.image_tokens(processor.merge_size)
    for query in ("Please help segment the liver in this scan.", "<image>\nPlease help segment the liver in this scan."):
        single = processor.prompt_pieces(query, tokens)
        assert single == processor.conversation_pieces([ChatTurn(query, (tokens,))])
        assert single == processor.conversation_inputs([(query, [image], None)], focus=image).input_ids[0].tolist()
    messages = [_user("Please help segment the liver in this scan.", True)]
    assert processor.prompt_pieces("Please help segment the liver in this scan.", tokens) == \
        transformers_ids(processor.tokenizer, messages, [tokens])


def test_earlier_answers_seg_tokens_are_not_this_answers_masks(tiny_engine):
    """An earlier answer's [SEG] is in the prompt; only the new answer's [SEG] make masks."""
    processor = tiny_engine.processor
    first, second = _images(processor, [(128, 128), (128, 128)])
    focus = processor.prepare_image(np.full((128, 128), 90, np.uint8), BUDGET)
    history = [("Segment the lung.", [first], "Sure, it is [SEG]."), ("What is this?", [focus], None)]
    inputs = processor.conversation_inputs(history, focus=focus, answer="A lung, no mask here.")
    assert (inputs.input_ids[0, : inputs.prompt_length] == processor.seg_token_idx).sum() == 1
    result = tiny_engine.run_inputs(inputs, "What is this?", answer="A lung, no mask here.")
    assert result.masks == []
    inputs = processor.conversation_inputs(history, focus=focus, answer="Here: [SEG] and [SEG].")
    result = tiny_engine.run_inputs(inputs, "What is this?", answer="Here: [SEG] and [SEG].")
    assert [m.token_position for m in result.masks] == \
        (inputs.input_ids[0] == processor.seg_token_idx).nonzero().flatten()[1:].tolist()
    assert all(m.mask.shape == (128, 128) for m in result.masks)


def test_a_turn_that_is_not_last_must_have_an_answer(tiny_engine):
    processor = tiny_engine.processor
    with pytest.raises(ValueError, match="only the last turn"):
        processor.conversation_pieces([ChatTurn("a"), ChatTurn("b")])
    assert torch.equal(torch.tensor(processor.conversation_pieces([ChatTurn("a", (), "x"), ChatTurn("b")]))[:3],
                       torch.tensor([151644, 8948, 198]))
