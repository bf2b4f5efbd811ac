"""The reference's own demo clients, as far as they talk to the server: the requests they build and the way they
read the answers, reproduced from jdh-algo/Citrus-V (commit d3bb13d) without their UI frameworks (gradio and
streamlit are not installed here).

Gradio demo, `demo/citrusv_gradio_app.py` (== `projects/app.py`): the `openai` package with api_key "EMPTY" on
http://127.0.0.1:8000/v1; `process_inference` sends one user message `[{"type": "image", "image": "data:image/
png;base64,..."}, {"type": "text", "text": query}]`, max_tokens 1024, temperature 0; reads
`choices[0].message.content` and `resp.raw_response["seg_masks_rle"]` (pycocotools `decode`), nearest-resizes each
256x256 mask to the image, and maps boxes back with a client-side `smart_resize` under its own MAX_PIXELS=65535
(unless `raw_response` had an `image_grid_thw`, read as [t, h/28, w/28]).

Streamlit demo, `demo/citrusv_streamlit_app.py` + `demo/utils.py` + `demo/display_utils.py`: `requests.post` of
raw JSON to http://localhost:8000/v1/chat/completions with `Authorization: Bearer ` (an empty key by default),
max_tokens 8192, temperature 0; `{"type": "image_url", ...}` parts, or a text-only message without an image;
`stream: true` for the QA, document and report tabs, parsed line by line as SSE; segmentation without streaming,
boxes mapped with `smart_resize` under MAX_PIXELS=1003520; report boxes drawn on `qwen_vl_utils.fetch_image` of
the image (qwen_vl_utils' own default budget: the module reads no environment).
"""
from __future__ import annotations

import base64
import json
import math
import re
from io import BytesIO

import numpy as np
import requests
from openai import OpenAI
from PIL import Image
from pycocotools import mask as mask_utils

QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28  # qwen_vl_utils 0.0.11's module constants
GRADIO_MAX_PIXELS = 65535      # os.environ["MAX_PIXELS"] in the Gradio demo
STREAMLIT_MAX_PIXELS = 1003520  # os.environ["MAX_PIXELS"] in the Streamlit demo


# ---------------------------------------------------------------------------------------------- qwen_vl_utils

def client_smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """qwen_vl_utils 0.0.11 `smart_resize`, written out again for the client side (independent of the server's)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def processed_size(raw_response, original_size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """(width, height) the clients scale boxes from: `image_grid_thw` if the server sent one, else smart_resize."""
    if isinstance(raw_response, dict) and raw_response.get("image_grid_thw"):
        grid = raw_response["image_grid_thw"]
        return grid[0][2] * 28, grid[0][1] * 28
    width, height = original_size
    resized_h, resized_w = client_smart_resize(height, width, QWEN_MIN_PIXELS, max_pixels)
    return resized_w, resized_h


# ---------------------------------------------------------------------------------------------- shared parsing

_BOX_START = re.compile(r"<\|box_start\|>\(([\d]+),([\d]+)\),\(([\d]+),([\d]+)\)<\|box_end\|>")
_BBOX_2D = re.compile(r'\{[^{}]*?"bbox_2d"\s*:\s*\[[^\[\]]+\][^{}]*?\}')


def extract_boxes(response: str, original_size, processed, empty_is_none: bool) -> list | None:
    """Both demos' `extract_bbox_from_response`: box_start pairs, else `{"bbox_2d": [...]}` objects, then
    int(x * original / processed) clamped to the image. The Gradio copy returns [] when no JSON box is found,
    the Streamlit copy (`empty_is_none`) None."""
    boxes = None
    found = _BOX_START.findall(response)
    if found:
        boxes = [[float(v) for v in match] for match in found]
    if boxes is None:
        candidates = []
        for text in _BBOX_2D.findall(response):
            try:
                coords = json.loads(text).get("bbox_2d")
            except ValueError:
                continue
            if isinstance(coords, list) and len(coords) == 4:
                candidates.append([float(v) for v in coords])
        boxes = None if (empty_is_none and not candidates) else candidates
    if boxes is None:
        return None
    (orig_w, orig_h), (proc_w, proc_h) = original_size, processed
    scale_x, scale_y = orig_w / proc_w, orig_h / proc_h
    scaled = []
    for x1, y1, x2, y2 in boxes:
        a, b = max(0, min(int(x1 * scale_x), orig_w)), max(0, min(int(y1 * scale_y), orig_h))
        scaled.append([a, b, max(a, min(int(x2 * scale_x), orig_w)), max(b, min(int(y2 * scale_y), orig_h))])
    return scaled


def decode_masks(raw_response, image: Image.Image) -> list[np.ndarray] | None:
    """`postprocess_response` + the mask part of `visualize_segmentation`: pycocotools decode of each RLE, then a
    nearest resize of the 256x256 mask to the image."""
    if raw_response is None or "seg_masks_rle" not in raw_response or not raw_response["seg_masks_rle"]:
        return None
    masks = [mask_utils.decode(rle).astype(np.uint8) for rle in raw_response["seg_masks_rle"]]
    return [np.array(Image.fromarray(m).resize(image.size, resample=Image.NEAREST)) for m in masks]


# ---------------------------------------------------------------------------------------------- Gradio demo

def gradio_models(base_url: str) -> list[str]:
    """`test_connection` / `get_available_models`."""
    client = OpenAI(api_key="EMPTY", base_url=base_url)
    return [model.id for model in client.models.list().data]


def gradio_process_inference(base_url: str, image: Image.Image, query: str, extra_body: dict | None = None) -> dict:
    """`process_inference` up to what it shows: the answer, the masks at the image size, the boxes.
    `extra_body` (this project's `citrusv` options) is not something the demo sends; tests use it only to force
    an answer whose boxes the client then parses."""
    client = OpenAI(api_key="EMPTY", base_url=base_url)
    buffered = BytesIO()
    image.save(buffered, format="PNG")
    img_base64 = base64.b64encode(buffered.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image", "image": f"data:image/png;base64,{img_base64}"},
                                             {"type": "text", "text": query}]}]
    resp = client.chat.completions.create(model="CitrusV_8B", messages=messages, max_tokens=1024, temperature=0,
                                          **({"extra_body": extra_body} if extra_body else {}))
    text = resp.choices[0].message.content
    raw_response = getattr(resp, "raw_response", None)
    if raw_response is None and hasattr(resp, "to_dict"):
        raw_response = resp.to_dict().get("raw_response", None)
    processed = processed_size(raw_response, image.size, GRADIO_MAX_PIXELS)
    return {"text": text, "masks": decode_masks(raw_response, image.convert("RGB")), "processed_size": processed,
            "boxes": extract_boxes(text, image.size, processed, empty_is_none=False), "raw_response": raw_response}


# ---------------------------------------------------------------------------------------------- Streamlit demo

STREAMLIT_CONFIG = {"server_url": "http://localhost:8000/v1/chat/completions", "model_name": "CitrusV_8B",
                    "api_key": "", "max_tokens": 8192, "temperature": 0.0}


def streamlit_config(port: int) -> dict:
    return STREAMLIT_CONFIG | {"server_url": f"http://localhost:{port}/v1/chat/completions"}


def _encode_image(image: Image.Image) -> str:
    """`encode_image_to_base64`: RGBA/LA/P flattened on white, then PNG."""
    buffered = BytesIO()
    if image.mode in ("RGBA", "LA", "P"):
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, mask=image.split()[-1] if image.mode == "RGBA" else None)
        image = flat
    image.save(buffered, format="PNG")
    return base64.b64encode(buffered.getvalue()).decode("utf-8")


def _payload(image: Image.Image | None, question: str, cfg: dict, stream: bool, extra: dict | None) -> dict:
    if image is None:
        content = [{"type": "text", "text": question}]
    else:
        content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_encode_image(image)}"}},
                   {"type": "text", "text": question}]
    payload = {"model": cfg["model_name"], "messages": [{"role": "user", "content": content}]}
    if stream:
        payload["stream"] = True
    payload |= {"max_tokens": cfg["max_tokens"], "temperature": cfg["temperature"]} | (extra or {})
    return payload


def _headers(cfg: dict) -> dict:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {cfg['api_key']}"}


def streamlit_call(image: Image.Image | None, question: str, cfg: dict, return_seg_det: bool = False,
                   extra: dict | None = None):
    """`call_vllm_model`: the text, or (response object with `.raw_response`, text) for segmentation."""
    response = requests.post(cfg["server_url"], json=_payload(image, question, cfg, False, extra), headers=_headers(cfg),
                             timeout=(10, 300))
    if response.status_code != 200:
        error = f"Error: Server returned status code {response.status_code}: {response.text}"
        return (None, error) if return_seg_det else error
    result = response.json()
    text = ""
    if "choices" in result and len(result["choices"]) > 0:
        text = result["choices"][0].get("message", {}).get("content", "")
    if return_seg_det:
        class ResponseWrapper:
            def __init__(self, raw_response):
                self.raw_response = raw_response

        return ResponseWrapper(result.get("raw_response", None)), text
    return text if "choices" in result and result["choices"] else "Error: Unexpected response format from server"


def streamlit_stream(image: Image.Image | None, question: str, cfg: dict, extra: dict | None = None):
    """`call_vllm_model_stream`: yields the text pieces as the demo shows them (or one "Error: ..." piece)."""
    response = requests.post(cfg["server_url"], json=_payload(image, question, cfg, True, extra), headers=_headers(cfg),
                             timeout=(10, 300), stream=True)
    response.encoding = "utf-8"
    if response.status_code != 200:
        yield f"Error: Server returned status code {response.status_code}: {response.text}"
        return
    content_type = (response.headers.get("Content-Type") or "").lower()
    if "text/event-stream" not in content_type and "ndjson" not in content_type:
        result = response.json()  # the demo's non-SSE fallback: the whole answer at once
        yield result["choices"][0]["message"]["content"]
        return
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.strip() or line.startswith(":"):
            continue
        data = line[5:].strip() if line.startswith("data:") else line.strip()
        if not data:
            continue
        try:
            obj = json.loads(data)
        except ValueError:  # "[DONE]": the demo prints the exception and goes on
            continue
        piece = ""
        if "choices" in obj and obj["choices"]:
            choice = obj["choices"][0]
            if "delta" in choice:
                piece = f"{choice['delta'].get('content', '')}{choice['delta'].get('reasoning_content', '')}"
            elif "message" in choice:
                piece = choice["message"].get("content", "")
        if not piece and "text" in obj:
            piece = obj["text"]
        if not piece and "content" in obj:
            piece = obj["content"]
        if piece:
            yield piece


def streamlit_segmentation(image: Image.Image, question: str, cfg: dict, extra: dict | None = None) -> dict:
    """The Segmentation tab: `call_vllm_model(return_seg_det=True)`, masks, and boxes under MAX_PIXELS=1003520."""
    response_obj, answer = streamlit_call(image, question, cfg, return_seg_det=True, extra=extra)
    raw = response_obj.raw_response if response_obj is not None else None
    processed = processed_size(raw, image.size, STREAMLIT_MAX_PIXELS)
    return {"text": answer, "masks": decode_masks(raw, image), "processed_size": processed,
            "boxes": extract_boxes(answer, image.size, processed, empty_is_none=True), "raw_response": raw}


# Report tab (display_utils): '{"Part":"label","bbox":[x1, y1, x2, y2]}' or "'label' with bbox [x1, y1, x2, y2]".
_REPORT_BOX = re.compile(
    r"""\{\s*(?:"?(?:part|label)"?)\s*:\s*"(?P<label>[^"]+?)"\s*,\s*"?(?:bbox|box|rect)"?\s*:\s*"?\[\s*
        (?P<x1>-?\d+)\s*,\s*(?P<y1>-?\d+)\s*,\s*(?P<x2>-?\d+)\s*,\s*(?P<y2>-?\d+)\s*\]\s*"?\s*\}
      | (?P<label2>'[^']+'|"[^"]+"|[a-z][a-z0-9_]*)\s*(?:with\s*)?bbox\s*\[\s*
        (?P<x1b>-?\d+)\s*,\s*(?P<y1b>-?\d+)\s*,\s*(?P<x2b>-?\d+)\s*,\s*(?P<y2b>-?\d+)\s*\]""",
    re.VERBOSE | re.IGNORECASE)


_CHINESE_PUNCTUATION = {"、": ", ", "“": '"', "”": '"', "（": "(", "）": ")", "【": "[", "】": "]", "，": ",", "。": ".",
                        "；": ";", "：": ":", "！": "!", "？": "?"}


def last_report_box(text: str) -> dict | None:
    """`extract_last_bbox_from_text`: the last box mentioned, {"label", "coords"} in the resized image's pixels."""
    for chinese, english in _CHINESE_PUNCTUATION.items():  # `preprocess_text_for_bbox`
        text = text.replace(chinese, english)
    matches = list(_REPORT_BOX.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    if match.group("label") is not None:
        label, coords = match.group("label"), match.group("x1", "y1", "x2", "y2")
    else:
        label, coords = match.group("label2").strip(), match.group("x1b", "y1b", "x2b", "y2b")
        if len(label) >= 2 and label[0] == label[-1] and label[0] in "'\"":
            label = label[1:-1]
    return {"label": label, "coords": [int(c) for c in coords]}


def report_canvas_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `qwen_vl_utils.fetch_image({"image": image})`, the picture report boxes are drawn on."""
    height, width = client_smart_resize(image.height, image.width, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    return width, height
