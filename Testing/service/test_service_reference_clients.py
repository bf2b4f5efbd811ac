"""The reference's demo clients replayed unchanged against the real `citrusv serve --reference-compatible`.

Each call is built and read as the demo builds and reads it (reference_clients.py): the Gradio demo through the
`openai` package with api_key "EMPTY", the Streamlit demo through `requests` with an empty bearer, streaming on
its QA, document and report tabs, and `projects/inference_with_deploy.py` naming a local file. The server runs
the scripted tiny model (it writes "Sure, it is [SEG]." by real greedy decoding), so the masks the clients decode
are compared with the same model run in-process. Boxes — which no tiny model writes — come from forced answers
(the `citrusv.answer` option added to the otherwise unchanged request); what is checked is the frame: the size
the client recomputes with its own smart_resize must be the size the server resized to.
"""
from __future__ import annotations

import os

import httpx
import numpy as np
import openai
import pytest
import requests
from PIL import Image

from citrusv_backend.server.tasks import reference_binary_mask
from reference_clients import (GRADIO_MAX_PIXELS, QWEN_MIN_PIXELS, STREAMLIT_MAX_PIXELS, gradio_models,
                               gradio_process_inference, last_report_box, report_canvas_size, streamlit_call,
                               streamlit_config, streamlit_segmentation, streamlit_stream)
from scripted_model import SCRIPTED_ANSWER
from service_helpers import png_base64

pytestmark = [pytest.mark.service, pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")]

# The Gradio demo's examples (gr.Examples) and its default query.
GRADIO_QUERIES = [
    "Please help segment the liver in this scan.", "Please help segment the left lung in the given image.",
    "Please locate and detect the right lung in this image.",
    "Please detect the kidney in this image, and return the cooresponging coordinates.",
    "Please provide a mask for lung infections in this image", "Please detect the heart in this image using json format.",
    "Please help segment the abnormal area in this scan.", "Please help segment the nucleus in this scan.",
    "Please help segment the abnormal regions in this scan.", "Please help segment the liver in this scan",
]
# The Streamlit demo's EXAMPLE_DATA questions, by tab.
STREAMLIT_QA = ["图中体积最大的器官是什么? 请简要回答该问题。", "这张图片中黑色的器官可以被用来做什么? ",
                "Which side of lung is abnormal in this image,left or right? Answer the question using a single word or phrase.",
                "影像左侧是患者的左肺还是右肺？如何判断"]
STREAMLIT_MDU = ["请将图中检验单表格解析为Markdown格式，表头包括检验项目、结果、单位、参考范围", "右侧乳腺低回声团的具体大小？"]
STREAMLIT_REPORT = "Evaluate the provided chest radiograph and compile a report. Let's think step by step."
STREAMLIT_SEGMENTATION = ["Please help segment the kidney in this scan.", "Please help segment the lung in this scan.",
                          "Please locate and detect the right lung in this image.",
                          "Please detect the liver in this image using json format."]
JSON_BOX = '```json\n[\n{"bbox_2d": [40, 30, 200, 150],"label": "heart"}\n]\n```'
LEGACY_BOX = "<|box_start|>(40,30),(200,150)<|box_end|>"
COT_REPORT = ('<think> Step 1: the lungs. <bbox>{"Part":"lung","bbox":[50, 68, 424, 326]}</bbox> are clear. </think>'
              "<answer> FINDINGS: No focal consolidation. IMPRESSION: No acute process. </answer>")


@pytest.fixture(scope="module")
def scan(ct_slice_rgb) -> Image.Image:
    """The real chest CT slice at 512x384 (wider than tall, and over the Gradio demo's 65535-pixel budget)."""
    return Image.fromarray(ct_slice_rgb).resize((512, 384), Image.BICUBIC)


@pytest.fixture(scope="module")
def scripted_engine(scripted_checkpoint):
    from citrusv_backend.inference.engine import CitrusVEngine

    return CitrusVEngine.load(scripted_checkpoint, device="cpu")


def expected_mask(engine, image: Image.Image, query: str, max_pixels: int) -> np.ndarray:
    """The same model in-process: its 256x256 mask, nearest-resized to the image as the demos do."""
    result = engine.run(image, query, task="segment", min_pixels=QWEN_MIN_PIXELS, max_pixels=max_pixels)
    assert result.text == SCRIPTED_ANSWER and len(result.masks) == 1
    low = reference_binary_mask(result.masks[0].low_res_logits).astype(np.uint8)
    assert 0 < low.mean() < 1
    return np.array(Image.fromarray(low).resize(image.size, Image.NEAREST)) > 0


def expected_boxes(engine, image: Image.Image, answer: str, max_pixels: int) -> list[list[float]]:
    result = engine.run(image, "Please detect the heart in this image using json format.", task="detect",
                        answer=answer, min_pixels=QWEN_MIN_PIXELS, max_pixels=max_pixels)
    return [[box.x1, box.y1, box.x2, box.y2] for box in result.boxes]


def frame_of(raw_response: dict) -> tuple[int, int]:
    """(width, height) of the image the server showed the model, from its raw_response."""
    height, width = raw_response["resized_size"]
    return width, height


# ---------------------------------------------------------------------------------------------- Gradio demo

def same_mask_for_any_query(engine, image: Image.Image, max_pixels: int, queries: list[str]) -> np.ndarray:
    """The scripted model's [SEG] state is its [SEG] embedding whatever the query, so one image has one mask: checked
    in-process on the first and last query, then compared with what the client decodes for every query."""
    first, last = (expected_mask(engine, image, query, max_pixels) for query in (queries[0], queries[-1]))
    np.testing.assert_array_equal(first, last)
    return first


def test_gradio_demo_every_example_answered_and_its_masks_decode(gradio_server, scan, scripted_engine):
    url = f"{gradio_server.url}/v1"
    assert gradio_models(url) == ["CitrusV_8B"]  # the demo's connection test
    expected = same_mask_for_any_query(scripted_engine, scan, GRADIO_MAX_PIXELS, GRADIO_QUERIES)
    for query in GRADIO_QUERIES:
        shown = gradio_process_inference(url, scan, query)
        assert shown["text"] == SCRIPTED_ANSWER, query
        assert shown["boxes"] == []  # no box in the answer: the Gradio copy gives an empty list
        assert len(shown["masks"]) == 1 and shown["masks"][0].shape == (384, 512)
        np.testing.assert_array_equal(shown["masks"][0] > 0, expected)
        assert shown["processed_size"] == frame_of(shown["raw_response"]) == (280, 196)


def test_gradio_demo_hint_image_tag_marks_the_image_position(gradio_server, scan):
    """The demo says "include the <image> tag in the query": it becomes the image's position (its newline stays
    after the image), so the prompt is one token ("\\n") longer than without it — not the tag's three tokens."""
    client = openai.OpenAI(api_key="EMPTY", base_url=f"{gradio_server.url}/v1")
    data_uri = "data:image/png;base64," + png_base64(np.asarray(scan))

    def prompt_tokens(query: str) -> int:
        messages = [{"role": "user", "content": [{"type": "image", "image": data_uri}, {"type": "text", "text": query}]}]
        return client.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=1024,
                                              temperature=0).usage.prompt_tokens

    plain = prompt_tokens("Please help segment the liver in this scan.")
    assert prompt_tokens("<image>\nPlease help segment the liver in this scan.") == plain + 1


@pytest.mark.parametrize("answer", [JSON_BOX, LEGACY_BOX])
def test_gradio_demo_boxes_are_in_the_frame_it_scales_from(gradio_server, scan, scripted_engine, answer):
    shown = gradio_process_inference(f"{gradio_server.url}/v1", scan, "Please detect the heart in this image using "
                                     "json format.", extra_body={"citrusv": {"answer": answer}})
    assert shown["text"] == answer and shown["masks"] is None
    assert shown["processed_size"] == frame_of(shown["raw_response"])
    expected = expected_boxes(scripted_engine, scan, answer, GRADIO_MAX_PIXELS)
    assert len(shown["boxes"]) == 1 and np.allclose(shown["boxes"], expected, atol=1.0), (shown["boxes"], expected)


# ---------------------------------------------------------------------------------------------- Streamlit demo

def test_streamlit_demo_qa_and_document_tabs_stream(streamlit_server, scan):
    cfg = streamlit_config(streamlit_server.ready["port"])
    for question in STREAMLIT_QA + STREAMLIT_MDU:
        pieces = list(streamlit_stream(scan, question, cfg))
        assert "".join(pieces) == SCRIPTED_ANSWER and len(pieces) > 1, (question, pieces)  # really piece by piece
    text_only = list(streamlit_stream(None, "What is a pneumothorax?", cfg))  # QA with no image
    assert "".join(text_only) == SCRIPTED_ANSWER
    assert streamlit_call(scan, STREAMLIT_QA[2], cfg) == SCRIPTED_ANSWER  # streaming mode unticked
    assert streamlit_call(None, STREAMLIT_QA[0], cfg) == SCRIPTED_ANSWER


def test_streamlit_demo_report_tab_streams_with_and_without_a_question(streamlit_server, scan):
    cfg = streamlit_config(streamlit_server.ready["port"])
    for question in (STREAMLIT_REPORT, ""):  # the report tab may be run with an empty question
        assert "".join(streamlit_stream(scan, question, cfg)) == SCRIPTED_ANSWER


def test_streamlit_demo_report_boxes_are_in_the_frame_it_draws_on(streamlit_server, scan):
    cfg = streamlit_config(streamlit_server.ready["port"])
    extra = {"citrusv": {"answer": COT_REPORT, "task": "report"}}
    text = "".join(streamlit_stream(scan, STREAMLIT_REPORT, cfg, extra=extra))
    assert text == COT_REPORT and last_report_box(text) == {"label": "lung", "coords": [50, 68, 424, 326]}
    client = openai.OpenAI(api_key="EMPTY", base_url=f"{streamlit_server.url}/v1")
    chunks = list(client.chat.completions.create(
        model="CitrusV_8B", stream=True, max_tokens=8192, temperature=0, extra_body=extra,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_base64(np.asarray(scan))}},
            {"type": "text", "text": STREAMLIT_REPORT}]}]))
    assert frame_of(chunks[-1].model_extra["raw_response"]) == report_canvas_size(scan) == (504, 392)


def test_streamlit_demo_segmentation_tab(streamlit_server, scan, scripted_engine):
    cfg = streamlit_config(streamlit_server.ready["port"])
    expected = same_mask_for_any_query(scripted_engine, scan, STREAMLIT_MAX_PIXELS, STREAMLIT_SEGMENTATION)
    for question in STREAMLIT_SEGMENTATION:
        shown = streamlit_segmentation(scan, question, cfg)
        assert shown["text"] == SCRIPTED_ANSWER and shown["boxes"] is None
        np.testing.assert_array_equal(shown["masks"][0] > 0, expected)
        assert shown["processed_size"] == frame_of(shown["raw_response"]) == (504, 392)
        assert shown["raw_response"]["max_tokens"] == 4096  # the demo's 8192 clipped to the server's limit
    boxed = streamlit_segmentation(scan, STREAMLIT_SEGMENTATION[-1], cfg, extra={"citrusv": {"answer": JSON_BOX}})
    assert np.allclose(boxed["boxes"], expected_boxes(scripted_engine, scan, JSON_BOX, STREAMLIT_MAX_PIXELS), atol=1.0)


def test_a_default_budget_server_would_put_streamlit_boxes_in_another_frame(gradio_server, scan):
    """Why the server-wide budget exists: without MAX_PIXELS=1003520 the server resizes as for segmentation."""
    shown = streamlit_segmentation(scan, STREAMLIT_SEGMENTATION[0], streamlit_config(gradio_server.ready["port"]))
    assert frame_of(shown["raw_response"]) == (280, 196) != shown["processed_size"]
    assert gradio_server.ready["pixel_budget"] == "per task"


# ---------------------------------------------------------------------------------------------- inference_with_deploy.py

def test_inference_with_deploy_names_a_local_file(streamlit_server, allowed_images):
    """`projects/inference_with_deploy.py`: `{"type": "image", "image": "../asset/test_0001.png"}` — a path the
    server reads. Allowed here inside --allow-local-images only: absolute, relative (to the server's working
    folder, as swift) or file:// paths inside; not outside, not through a link leading outside."""
    client = openai.OpenAI(api_key="EMPTY", base_url=f"{streamlit_server.url}/v1")
    model = client.models.list().data[0].id

    def ask(image: str):
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "please help segment the nucleus in this scan."}]}]
        return client.chat.completions.create(model=model, messages=messages, max_tokens=512, temperature=0)

    inside = allowed_images / "slice.png"
    for form in (str(inside), os.path.relpath(inside), f"file://{inside}"):
        response = ask(form)
        assert response.choices[0].message.content == SCRIPTED_ANSWER
        assert len(response.raw_response["seg_masks_rle"]) == 1 and response.raw_response["original_size"] == [96, 128]
    for form, words in ((str(allowed_images.parent / "private-images" / "secret.png"), "outside the folders"),
                        (str(allowed_images / "link.png"), "outside the folders"),
                        (str(allowed_images / "missing.png"), "no such file")):
        with pytest.raises(openai.BadRequestError, match=words):
            ask(form)


def test_without_the_flag_no_file_is_read(gradio_server, allowed_images):
    client = openai.OpenAI(api_key="EMPTY", base_url=f"{gradio_server.url}/v1")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(allowed_images / "slice.png")},
                                             {"type": "text", "text": "segment the nucleus"}]}]
    with pytest.raises(openai.BadRequestError, match="reads no files.*--allow-local-images"):
        client.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=8)


# ---------------------------------------------------------------------------------------------- the launch itself

def test_reference_compatible_launch_takes_any_bearer_but_only_loopback_names(gradio_server):
    assert gradio_server.ready["token_source"] == "none" and gradio_server.ready["token_file"] is None
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer EMPTY"},
                    {"Authorization": "Bearer anything-at-all"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        # requests, as the Streamlit demo: it sends an empty key as "Bearer " (httpx refuses the trailing space)
        assert requests.get(f"{gradio_server.url}/v1/models", headers=headers, timeout=30).status_code == 200, headers
    localhost = gradio_server.url.replace("127.0.0.1", "localhost")
    assert httpx.get(f"{localhost}/v1/models").status_code == 200
    rebound = httpx.get(f"{gradio_server.url}/v1/models", headers={"Host": f"evil.example:{gradio_server.ready['port']}"})
    assert rebound.status_code == 403 and rebound.json()["error"]["type"] == "forbidden"


def test_streamlit_server_took_its_budget_from_the_environment(streamlit_server):
    assert streamlit_server.ready["pixel_budget"] == {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": STREAMLIT_MAX_PIXELS}
