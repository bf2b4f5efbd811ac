"""/v1/chat/completions beyond one image and one question: streaming (SSE in ms-swift's chunk format), clipped
max_tokens, text-only and empty questions, `<image>` tags, the server-wide pixel budget, local image paths, and
the `serve` options behind them."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from citrusv_backend.cli import build_parser
from citrusv_backend.errors import CitrusVError, InputError
from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS
from citrusv_backend.server.codec import image_source
from citrusv_backend.server.launch import ServeSettings
from citrusv_backend.server.local_images import allowed_folders, read_local_image
from citrusv_backend.server.routers.openai import ChatMessage, conversation
from service_helpers import log_lines, png_base64

pytestmark = [pytest.mark.service, pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")]

ANSWER = "Sure, it is [SEG]."


@pytest.fixture
def api(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def data_uri(ct_slice_rgb) -> str:
    return f"data:image/png;base64,{png_base64(ct_slice_rgb)}"


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image_part(uri: str) -> dict:
    return {"type": "image_url", "image_url": {"url": uri}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


# ---------------------------------------------------------------------------------------------- streaming

def test_streaming_gives_the_same_answer_piece_by_piece(api, data_uri):
    messages = user(image_part(data_uri), text_part("What is shown?"))
    whole = api.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=12, temperature=0)
    chunks = list(api.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=12, stream=True))
    assert len(chunks) > 2 and {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1 and all(c.choices[0].delta.role == "assistant" for c in chunks)
    assert "".join(chunk.choices[0].delta.content for chunk in chunks) == whole.choices[0].message.content
    *pieces, last = chunks
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in pieces)
    assert not any("raw_response" in (c.model_extra or {}) for c in pieces)
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.model_extra["raw_response"]["seg_masks_rle"] == whole.raw_response["seg_masks_rle"]


def test_streamed_masks_come_in_the_last_chunk(api, data_uri):
    messages = user(image_part(data_uri), text_part("Please help segment the left lung in this scan."))
    options = {"citrusv": {"answer": ANSWER}}
    whole = api.chat.completions.create(model="CitrusV_8B", messages=messages, extra_body=options)
    chunks = list(api.chat.completions.create(model="CitrusV_8B", messages=messages, extra_body=options, stream=True))
    assert "".join(c.choices[0].delta.content for c in chunks) == ANSWER == whole.choices[0].message.content
    masks = chunks[-1].model_extra["raw_response"]["seg_masks_rle"]
    assert len(masks) == 1 and masks == whole.raw_response["seg_masks_rle"]


def test_the_wire_format_is_server_sent_events_ending_in_done(server, data_uri):
    body = {"model": "CitrusV_8B", "messages": user(image_part(data_uri), text_part("Describe it.")), "stream": True,
            "max_tokens": 8}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        raw = b"".join(r.iter_bytes())
    events = raw.decode("utf-8").split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(event[len("data: "):]) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "raw_response" in payloads[-1]
    assert all(set(p) >= {"id", "object", "created", "model", "choices"} for p in payloads)


@pytest.mark.parametrize("image, words", [
    ("data:image/png;base64,not-base64!", "not valid base64"),      # refused before the job is queued
    ("tall", "aspect ratio"),                                        # refused by the worker, before any text
])
def test_a_stream_that_fails_before_its_first_piece_is_a_json_error(server, image, words):
    if image == "tall":
        image = f"data:image/png;base64,{png_base64(np.zeros((600, 2, 3), np.uint8))}"
    body = {"model": "CitrusV_8B", "messages": user(image_part(image), text_part("hi")), "stream": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=60)
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]["message"]


def test_a_client_that_leaves_mid_stream_ends_the_stream_cleanly(server, session_dir, data_uri):
    request_id = "stream-client-leaves"
    log_path = session_dir / "server.log"
    tracebacks = sum("traceback" in line for line in log_lines(log_path))
    body = {"model": "CitrusV_8B", "messages": user(image_part(data_uri), text_part("Tell me a long story.")),
            "stream": True, "max_tokens": 400}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers=server.headers | {"X-Request-ID": request_id}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
    deadline = time.monotonic() + 60
    while not [line for line in log_lines(log_path) if line.get("request_id") == request_id]:
        assert time.monotonic() < deadline, "the abandoned stream never finished"
        time.sleep(0.2)
    ours = [line for line in log_lines(log_path) if line.get("request_id") == request_id]
    assert ours[0]["status"] == 200 and sum("traceback" in line for line in log_lines(log_path)) == tracebacks
    after = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=120,
                       json=body | {"stream": False, "max_tokens": 2})
    assert after.status_code == 200


# ---------------------------------------------------------------------------------------------- what is answered

def test_max_tokens_above_the_server_limit_is_clipped(limits_server, ct_slice_rgb):
    client = openai.OpenAI(base_url=f"{limits_server.url}/v1", api_key=limits_server.token, max_retries=0)
    messages = user(image_part(f"data:image/png;base64,{png_base64(ct_slice_rgb)}"), text_part("Describe it."))
    response = client.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=10**6)
    assert response.usage.completion_tokens <= 16 and response.raw_response["max_tokens"] == 16
    chunks = list(client.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=8192, stream=True))
    assert chunks[-1].usage.completion_tokens <= 16


@pytest.mark.parametrize("content", ["What is a pneumothorax?", [text_part("What is a pneumothorax?")]])
def test_text_only_questions_are_answered(api, content):
    response = api.chat.completions.create(model="CitrusV_8B", max_tokens=6,
                                           messages=[{"role": "user", "content": content}])
    assert isinstance(response.choices[0].message.content, str) and response.usage.completion_tokens > 0
    raw = response.raw_response
    assert raw["seg_masks_rle"] == [] and raw["original_size"] is None and raw["resized_size"] is None


def test_an_empty_question_about_an_image_is_answered(api, data_uri, ct_slice_rgb):
    response = api.chat.completions.create(model="CitrusV_8B", max_tokens=4, messages=user(image_part(data_uri),
                                                                                           text_part("")))
    assert response.usage.completion_tokens > 0 and response.raw_response["original_size"] == list(ct_slice_rgb.shape[:2])


def prompt_length(engine, image: np.ndarray, prompt: str) -> int:
    return engine.processor(Image.fromarray(image), prompt, TASK_PIXEL_BUDGETS["segment"], allow_empty=True).prompt_length


@pytest.mark.parametrize("content, images, built", [
    ([image_part("IMAGE"), text_part("<image>\nPlease segment the liver.")], None, "<image>\nPlease segment the liver."),
    ([image_part("IMAGE"), text_part("Please segment the liver.")], None, "<image>Please segment the liver."),
    ([text_part("Look at "), image_part("IMAGE"), text_part("this.")], None, "Look at <image>this."),
    ("<image>\nPlease segment the liver.", ["IMAGE"], "<image>\nPlease segment the liver."),  # swift's `images`
])
def test_chat_prompts_put_the_image_where_swift_does(api, tiny_engine, ct_slice_rgb, data_uri, content, images, built):
    """The server's prompt, measured by its token count against the processor's for the prompt swift builds."""
    if isinstance(content, list):
        content = [image_part(data_uri) if part.get("type") == "image_url" else part for part in content]
    response = api.chat.completions.create(model="CitrusV_8B", max_tokens=1, messages=[{"role": "user", "content": content}],
                                           extra_body={"images": [data_uri]} if images else None)
    assert response.usage.prompt_tokens == prompt_length(tiny_engine, ct_slice_rgb, built)


def test_the_2d_route_puts_the_image_at_the_tag(client, ct_slice_rgb):
    response = client.post("/v1/images/infer", json={"image": png_base64(ct_slice_rgb), "task": "segment",
                                                      "prompt": "<image>\nPlease help segment the left lung in this scan.",
                                                      "answer": ANSWER})
    assert response.status_code == 200, response.text
    ids = response.json()["input_ids"]
    after = ids.index(151653)  # <|vision_end|>
    assert ids[after + 1] == 198 and ids[ids.index(872) + 1: ids.index(872) + 3] == [198, 151652]


def test_the_server_wide_budget_applies_to_the_2d_route(streamlit_server, ct_slice_rgb):
    image = np.asarray(Image.fromarray(ct_slice_rgb).resize((512, 384)))
    response = httpx.post(f"{streamlit_server.url}/v1/images/infer", timeout=120,
                          json={"image": png_base64(image), "task": "segment", "prompt": "segment the liver"})
    assert response.status_code == 200 and response.json()["resized_size"] == [392, 504]


# ---------------------------------------------------------------------------------------------- pieces, in-process

def messages(*items) -> list[ChatMessage]:
    return [ChatMessage.model_validate(item) for item in items]


def test_conversation_follows_swifts_content_parts():
    text_then_image = messages({"role": "user", "content": [text_part("A "), image_part("data:x"), text_part("B")]})
    assert conversation(text_then_image, []).prompt == "A <image>B"
    typed = messages({"role": "user", "content": [image_part("data:x"), text_part("<image>\nQ")]})
    assert conversation(typed, []).prompt == "<image>\nQ"                    # the typed tag marks the image
    assert conversation(typed, [], image_tags="swift").prompt == "<image><image>\nQ"  # swift: the second stays text
    swift_native = messages({"role": "user", "content": "<image>\nQ"})
    assert conversation(swift_native, ["data:y"]).image == "data:y"
    system = messages({"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Q"})
    chat = conversation(system, [])
    assert (chat.prompt, chat.image) == ("Q", None)


@pytest.mark.parametrize("text, kind", [
    ("data:image/png;base64,iVBORw0KGgo=", "inline"), ("iVBORw0KGgo=", "inline"),
    ("/9j/4AAQSkZJRgABAQ==", "inline"),   # a bare base64 JPEG starts with "/"
    ("../asset/test_0001.png", "path"), ("/data/slice.png", "path"), ("file:///data/slice.png", "path"),
    ("C:\\scans\\slice.png", "path"), ("https://example.org/a.png", "url"), ("s3://bucket/a.png", "url"),
])
def test_image_strings_are_told_apart(text, kind):
    assert image_source(text, "the image")[0] == kind


def test_local_images_only_inside_the_allowed_folders(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    Image.new("RGB", (8, 6)).save(inside / "a.png")
    Image.new("RGB", (8, 6)).save(outside / "b.png")
    (inside / "link.png").symlink_to(outside / "b.png")
    (inside / "folder.png").mkdir()
    folders = allowed_folders([inside])
    assert read_local_image(str(inside / "a.png"), folders, 10**6).size == (8, 6)
    for path, words in ((outside / "b.png", "outside"), (inside / "link.png", "outside"),
                        (inside / ".." / "out" / "b.png", "outside"), (inside / "folder.png", "not a regular file|cannot read")):
        with pytest.raises(InputError, match=words):
            read_local_image(str(path), folders, 10**6)
    with pytest.raises(InputError, match="more than"):
        read_local_image(str(inside / "a.png"), folders, 10)
    with pytest.raises(InputError, match="reads no files"):
        read_local_image(str(inside / "a.png"), (), 10**6)
    with pytest.raises(CitrusVError, match="no such folder"):
        allowed_folders([tmp_path / "missing"])


def serve_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--model", "unused", *extra])


def test_serve_options_for_the_reference_compatible_launch_and_the_budget():
    plain = ServeSettings.from_args(serve_args(), environ={})
    assert plain.port == 0 and not plain.reference_compatible and plain.config.pixel_budget() == (None, None)
    reference = ServeSettings.from_args(serve_args("--reference-compatible"), environ={})
    assert reference.port == 8000 and reference.reference_compatible
    assert ServeSettings.from_args(serve_args("--reference-compatible", "--port", "0"), environ={}).port == 0
    from_env = ServeSettings.from_args(serve_args(), environ={"MAX_PIXELS": "1003520"})
    assert from_env.config.pixel_budget() == (3136, 1003520)  # the other bound: qwen_vl_utils' default, as swift
    option_wins = ServeSettings.from_args(serve_args("--max-pixels", "65535"), environ={"MAX_PIXELS": "1003520"})
    assert option_wins.config.pixel_budget() == (3136, 65535)
    assert ServeSettings.from_args(serve_args("--min-pixels", "200704"), environ={}).config.pixel_budget() == \
        (200704, 16384 * 28 * 28)
    for args, environ, words in (((), {"MAX_PIXELS": "MAX_PIXELS=1003520"}, "not a whole number"),  # demo/README's typo
                                 (("--min-pixels", "9000", "--max-pixels", "8000"), {}, "more than the maximum"),
                                 (("--max-pixels", "100"), {}, "784 to"),
                                 (("--reference-compatible", "--token-file", "t"), {}, "no --token-file")):
        with pytest.raises(CitrusVError, match=words):
            ServeSettings.from_args(serve_args(*args), environ=environ)


def test_the_reference_compatible_launch_refuses_a_reachable_address_before_loading(tmp_path):
    run = subprocess.run([sys.executable, "-m", "citrusv_backend.cli", "serve", "--model", str(tmp_path / "no-model"),
                          "--reference-compatible", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, encoding="utf-8", timeout=120)
    assert run.returncode == 2 and "loopback only" in run.stderr
    assert json.loads(run.stdout)["reason"] == "other"  # the launcher's one line: why it did not start
