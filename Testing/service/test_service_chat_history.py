"""/v1/chat/completions past the first question: a standard chat client (the `openai` package) that resends the
history every turn — assistant messages, several images, a text-only follow-up — as ms-swift's deploy takes it.
The server renders the whole history (the prompt's token count is the conversation's, token for token), and
bad conversations are 4xx."""
from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from citrusv_backend.model.processor import QWEN_MIN_PIXELS, PixelBudget
from scripted_model import SCRIPTED_ANSWER

pytestmark = [pytest.mark.service, pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")]

GRADIO_MAX_PIXELS = 65535  # what the reference-compatible server's segment budget is


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def slices(ct_slice_rgb):
    first = Image.fromarray(ct_slice_rgb)
    second = Image.fromarray(np.ascontiguousarray(ct_slice_rgb[::-1, :, :])).resize((160, 128))
    return first, second


def test_a_chat_clients_second_and_third_turns_are_answered(gradio_server, slices, scripted_checkpoint):
    """The client's loop: ask, append the answer, ask again (a new image), then a text-only follow-up."""
    from citrusv_backend.inference.engine import CitrusVEngine

    api = openai.OpenAI(api_key="EMPTY", base_url=f"{gradio_server.url}/v1", max_retries=0, timeout=300)
    first, second = slices
    history: list[dict] = []
    questions = [([first], "Please help segment the left lung in this scan."),
                 ([second], "And in this one?"),
                 ([], "How large is it?")]
    responses = []
    for images, text in questions:
        history.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}}
                                                    for image in images] + [{"type": "text", "text": text}]})
        response = api.chat.completions.create(model="CitrusV_8B", messages=history, max_tokens=64, temperature=0)
        history.append({"role": "assistant", "content": response.choices[0].message.content})
        responses.append(response)
    assert [r.choices[0].message.content for r in responses] == [SCRIPTED_ANSWER] * 3
    assert all(r.choices[0].finish_reason == "stop" for r in responses)
    # Each answer's [SEG] is a mask on the conversation's first image (as the reference's template builds SAM2's input).
    for response in responses:
        raw = response.raw_response if hasattr(response, "raw_response") else response.to_dict()["raw_response"]
        assert len(raw["seg_masks_rle"]) == 1 and raw["original_size"] == [first.height, first.width]
    # The prompt is the whole conversation: its length is the in-process rendering's, token for token.
    engine = CitrusVEngine.load(scripted_checkpoint, device="cpu")
    processor = engine.processor
    budget = PixelBudget(QWEN_MIN_PIXELS, GRADIO_MAX_PIXELS)
    prepared = [processor.prepare_image(image, budget) for image in (first, second)]
    turns = [(questions[0][1], [prepared[0]], SCRIPTED_ANSWER), (questions[1][1], [prepared[1]], SCRIPTED_ANSWER),
             (questions[2][1], [], None)]
    for count, response in zip((1, 2, 3), responses):
        asked = turns[:count - 1] + [(turns[count - 1][0], turns[count - 1][1], None)]
        inputs = processor.conversation_inputs(asked, prepared[0])
        assert response.usage.prompt_tokens == inputs.prompt_length, count
    third = engine.run_inputs(processor.conversation_inputs(turns, prepared[0]), questions[2][1], max_new_tokens=64)
    assert third.text == SCRIPTED_ANSWER and third.masks[0].mask.shape == (first.height, first.width)


def test_a_streamed_second_turn(gradio_server, slices):
    api = openai.OpenAI(api_key="EMPTY", base_url=f"{gradio_server.url}/v1", max_retries=0, timeout=300)
    first, _ = slices
    messages = [{"role": "user", "content": [{"type": "image", "image": _data_uri(first)}, {"type": "text", "text": "Q1"}]},
                {"role": "assistant", "content": SCRIPTED_ANSWER},
                {"role": "user", "content": "And now?"}]
    chunks = list(api.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=64, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == SCRIPTED_ANSWER


@pytest.mark.parametrize("messages, status, words", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 400, "two user messages in a row"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 400, "the last message is the assistant"),
    ([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "a"}], 400, "must follow a user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<|image_pad|>"},
      {"role": "user", "content": "b"}], 400, "special token"),
    ([{"role": "user", "content": [{"type": "image", "image": "iVBORw0KGgo="}, {"type": "text", "text": "a"}]},
      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], 400, "image"),
    ([{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 5
     + [{"role": "user", "content": "z"}], 413, "start a new conversation"),
    ([{"role": "user", "content": [{"type": "image", "image": "iVBORw0KGgo="}] * 17}], 400, "17 images"),
    ([{"role": "tool", "content": "x"}, {"role": "user", "content": "a"}], 400, "'tool'"),
])
def test_bad_conversations_are_4xx(server, messages, status, words):
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=120)
    with pytest.raises(openai.APIStatusError) as raised:
        api.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=2)
    assert raised.value.status_code == status and words in str(raised.value), str(raised.value)
