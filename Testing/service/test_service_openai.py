"""The unmodified `openai` package against /v1/chat/completions, as the reference's own clients use it; the
masks it gets back decode (with pycocotools) to exactly the mask `citrusv infer` gives for the same image."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from service_helpers import png_base64

pytestmark = [pytest.mark.service, pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")]

PROMPT = "Please help segment the left lung in this scan."
ANSWER = "Sure, it is [SEG]."


@pytest.fixture
def api(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=120)


def _messages(image_b64: str, text: str, part: str = "image_url") -> list:
    image = ({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}} if part == "image_url"
             else {"type": "image", "image": f"data:image/png;base64,{image_b64}"})
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


def test_models_lists_the_reference_name(api):
    assert [model.id for model in api.models.list().data] == ["CitrusV_8B"]


def test_segmentation_masks_decode_to_the_citrusv_infer_mask(api, ct_slice_rgb, tiny_checkpoint, tmp_path):
    response = api.chat.completions.create(model="CitrusV_8B", messages=_messages(png_base64(ct_slice_rgb), PROMPT),
                                           max_tokens=64, temperature=0, extra_body={"citrusv": {"answer": ANSWER}})
    assert response.object == "chat.completion" and response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == ANSWER and response.choices[0].message.role == "assistant"
    assert response.usage.completion_tokens > 0 and response.usage.total_tokens > response.usage.prompt_tokens
    raw = response.model_extra["raw_response"]
    assert raw == response.raw_response  # the reference's clients read it as an attribute
    assert len(raw["seg_masks_rle"]) == 1 and raw["seg_masks_rle"][0]["size"] == [256, 256]
    assert isinstance(raw["seg_masks_rle"][0]["counts"], str)
    decoded = coco_mask.decode({"size": raw["seg_masks_rle"][0]["size"],
                                "counts": raw["seg_masks_rle"][0]["counts"].encode()})

    image_path = tmp_path / "slice.png"
    Image.fromarray(ct_slice_rgb).save(image_path)
    run = subprocess.run([sys.executable, "-m", "citrusv_backend.cli", "infer", "--model", str(tiny_checkpoint),
                          "--device", "cpu", "--image", str(image_path), "--prompt", PROMPT, "--task", "segment",
                          "--answer", ANSWER, "--out", str(tmp_path / "infer")], capture_output=True, encoding="utf-8",
                         timeout=300)
    assert run.returncode == 0, run.stderr
    logits = np.load(tmp_path / "infer.npz")["low_res_logits"]
    expected = (torch.sigmoid(torch.from_numpy(logits[0])) > 0.5).numpy()
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(decoded.astype(bool), expected)
    assert json.loads((tmp_path / "infer.json").read_text())["text"] == response.choices[0].message.content


def test_a_plain_question_is_a_normal_completion(api, ct_slice_rgb):
    response = api.chat.completions.create(model="CitrusV_8B", max_tokens=4, temperature=0.7,
                                           messages=_messages(png_base64(ct_slice_rgb), "What is shown?", "image"))
    assert isinstance(response.choices[0].message.content, str) and response.usage.completion_tokens <= 4
    assert response.choices[0].finish_reason in ("stop", "length")
    assert isinstance(response.raw_response["seg_masks_rle"], list)
    again = api.chat.completions.create(model="CitrusV_8B", max_tokens=4, temperature=0,
                                        messages=_messages(png_base64(ct_slice_rgb), "What is shown?", "image"))
    assert again.choices[0].message.content == response.choices[0].message.content  # always greedy


@pytest.mark.parametrize("change, status, words", [
    (dict(model="gpt-4o"), 404, "not served"),
    (dict(n=2), 400, "n must be 1"),
    (dict(messages=[{"role": "user", "content": []}]), 400, "neither text nor an image"),
    (dict(messages=[{"role": "user", "content": [{"type": "image", "image": "iVBORw0KGgo="}] * 2}]), 400,
     "not a readable image"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
                                                  {"type": "text", "text": "hi"}]}]), 400, "does not fetch"),
    (dict(messages=[{"role": "assistant", "content": "hello"}]), 400, "must follow a user message"),
    (dict(messages=[{"role": "system", "content": "You are a pirate."}]), 400, "system prompt"),
])
def test_bad_chat_requests_are_openai_style_errors(api, ct_slice_rgb, change, status, words):
    request = dict(model="CitrusV_8B", messages=_messages(png_base64(ct_slice_rgb), PROMPT), max_tokens=4) | change
    if "messages" in change and change["messages"][0]["role"] != "user":
        request["messages"] = change["messages"] + _messages(png_base64(ct_slice_rgb), PROMPT)
    with pytest.raises(openai.APIStatusError) as raised:
        api.chat.completions.create(**request)
    assert raised.value.status_code == status and words in str(raised.value), str(raised.value)
