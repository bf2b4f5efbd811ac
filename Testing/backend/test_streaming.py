"""The answer's text while it is generated (TextDeltaStreamer), text-only questions and the context limit."""
from __future__ import annotations

import pytest
import torch

from citrusv_backend.errors import InputError
from citrusv_backend.inference.streaming import TextDeltaStreamer

pytestmark = pytest.mark.model

STOP_IDS = (151645, 151643)


@pytest.fixture(scope="module")
def tokenizer(tiny_engine):
    return tiny_engine.processor.tokenizer


def streamed(tokenizer, ids: list[int]) -> list[str]:
    pieces: list[str] = []
    streamer = TextDeltaStreamer(lambda t: tokenizer.decode(t, skip_special_tokens=False), STOP_IDS, pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() hands over first
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return pieces


@pytest.mark.parametrize("text", ["Sure, it is [SEG].", "右侧乳腺低回声团的具体大小？", "emoji 🫁 and 🩻 here",
                                  "FINDINGS: <bbox>{\"Part\":\"lung\"}</bbox> ok"])
def test_pieces_are_whole_characters_and_add_up_to_the_answer(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = streamed(tokenizer, ids + [151645])  # the stop token never becomes text
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    if any(len(tokenizer.decode([t])) and "\ufffd" in tokenizer.decode([t]) for t in ids):
        assert len(pieces) < len(ids)  # split characters were held back until complete


def test_an_incomplete_character_at_the_end_is_held_back(tokenizer):
    ids = tokenizer.encode("ok 🫁", add_special_tokens=False)
    partial = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert partial, "the emoji must span several byte-level tokens for this test"
    pieces = streamed(tokenizer, ids[:-1])
    assert "".join(pieces) == "ok"  # the rest comes with the final text


def test_generation_streams_exactly_the_final_text(tiny_engine, ct_slice_rgb):
    pieces: list[str] = []
    result = tiny_engine.run(ct_slice_rgb, "Describe this scan.", max_new_tokens=24, on_text=pieces.append)
    assert len(pieces) > 1 and result.text.startswith("".join(pieces))
    assert result.text == tiny_engine.run(ct_slice_rgb, "Describe this scan.", max_new_tokens=24).text


def test_a_text_only_question(tiny_engine):
    result = tiny_engine.run(None, "What is a pneumothorax?", max_new_tokens=6)
    assert result.original_size is None and result.resized_size is None and result.image_grid_thw == []
    assert 0 < len(result.generated_ids) <= 6 and result.masks == []
    payload = result.to_json_dict()
    assert payload["original_size"] is None and payload["masks"] == []
    assert result.arrays()["masks"].shape == (0, 0, 0)
    forced = tiny_engine.run(None, "Segment the liver.", answer="Sure, it is [SEG].")
    assert forced.masks == [] and any("no image to segment" in p for p in forced.problems)


def test_max_new_tokens_is_clipped_to_the_context(tiny_engine, ct_slice_rgb, monkeypatch):
    prompt = tiny_engine.run(ct_slice_rgb, "Describe it.", max_new_tokens=1).input_ids
    monkeypatch.setattr(type(tiny_engine), "context_length", property(lambda self: len(prompt) + 3))
    result = tiny_engine.run(ct_slice_rgb, "Describe it.", max_new_tokens=1000, repetition_penalty=1.0)
    assert len(result.generated_ids) <= 3
    monkeypatch.setattr(type(tiny_engine), "context_length", property(lambda self: len(prompt)))
    with pytest.raises(InputError, match="whole context"):
        tiny_engine.run(ct_slice_rgb, "Describe it.")
