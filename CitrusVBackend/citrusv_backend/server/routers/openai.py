"""OpenAI-compatible GET /v1/models and POST /v1/chat/completions, in the reference server's shapes (ms-swift
`deploy`), so its clients — the `openai` package, the Gradio and Streamlit demos — work unchanged.

Request: one user message with one image (`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
or `{"type": "image", "image": "data:..."}`) and text parts. Response: a chat.completion plus a top-level
`raw_response` with `seg_masks_rle`: one COCO RLE of the 256x256 mask (sigmoid(low-res logits) > 0.5) per [SEG].

Differences, all deliberate: decoding is always greedy (any `temperature`/`top_p` is accepted and ignored: the
reference's clients send temperature 0 and sampling would make masks unrepeatable); `stream: true` is refused
(as the reference says, segmentation does not support streaming); `n` must be 1; images must be sent inline
(the server fetches no URLs and reads no files); only the default system prompt is supported. Extension: a
`citrusv` object (`extra_body={"citrusv": {...}}` in the openai package) may force the answer (`answer`), pick
the task whose image-size budget is used (`task`, default segment = the reference deployment's MAX_PIXELS=65535)
or set `min_pixels`/`max_pixels`.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ...model.processor import SYSTEM_PROMPT
from .. import rle
from ..codec import b64decode, decode_image, strip_data_uri
from ..errors import ApiError
from ..jobs import Job
from ..schemas import MAX_PROMPT_CHARS, Pixels
from ...model.processor import check_prompt_and_answer
from ..tasks import reference_binary_mask, to_json_bytes
from . import Service, run_now

router = APIRouter(tags=["openai"])

DEFAULT_MAX_TOKENS = 1024


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None
    image: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class CitrusVOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: Annotated[str, Field(min_length=1, max_length=1000)] | None = None
    task: Literal["ask", "segment", "detect", "report"] = "segment"
    min_pixels: Pixels | None = None
    max_pixels: Pixels | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send many optional fields; unknown ones are ignored
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=64)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    n: int | None = None
    stream: bool | None = False
    citrusv: CitrusVOptions | None = None


@router.get("/v1/models")
def list_models(state: Service) -> dict:
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started_at),
                                        "owned_by": "citrusv"}]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: Service) -> Response:
    if body.stream:
        raise ApiError(400, "streaming is not supported: segmentation does not support streaming (masks come with "
                            "the complete answer); send stream=false", type="streaming_not_supported")
    if body.model != state.model_name:
        raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {state.model_name!r}",
                       type="model_not_found")
    if body.n not in (None, 1):
        raise ApiError(400, "n must be 1: decoding is greedy, so every choice would be the same")
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, state.config.max_new_tokens)
    if max_tokens > state.config.max_new_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is more than this server allows ({state.config.max_new_tokens})")
    image_text, prompt = conversation(body.messages)
    extension = body.citrusv or CitrusVOptions()
    check_prompt_and_answer(prompt, extension.answer)
    image = await run_in_threadpool(lambda: decode_image(b64decode(image_text, "the image"), "the image"))

    def runner(job):
        return state.engine.run(image, prompt, task=extension.task, answer=extension.answer,
                                min_pixels=extension.min_pixels, max_pixels=extension.max_pixels, max_new_tokens=max_tokens,
                                should_cancel=job.should_cancel)

    result = await run_now(state, Job(task="chat", runner=runner, kept=False), request)
    return Response(to_json_bytes(completion(result, state, max_tokens)), media_type="application/json")


def conversation(messages: list[ChatMessage]) -> tuple[str, str]:
    """(the image's base64, the prompt) from a single-turn conversation with exactly one image."""
    images, texts, users = [], [], 0
    for message in messages:
        if message.role == "system":
            if _text_of(message.content).strip() not in ("", SYSTEM_PROMPT):
                raise ApiError(400, f"custom system prompts are not supported (the model was trained with "
                                    f"{SYSTEM_PROMPT!r}); leave the system message out")
            continue
        if message.role != "user":
            raise ApiError(400, f"a {message.role!r} message: only single-turn conversations are supported (one user "
                                f"message with one image and the question)")
        users += 1
        parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content or []
        for part in parts:
            if part.type == "text":
                texts.append(part.text or "")
            elif part.type in ("image_url", "image"):
                source = part.image_url if part.type == "image_url" else part.image
                url = source.url if isinstance(source, ImageURL) else source
                if not url:
                    raise ApiError(400, f"an {part.type!r} content part without an image")
                images.append(strip_data_uri(url, "image_url"))
            else:
                raise ApiError(400, f"content parts of type {part.type!r} are not supported; use 'text' and 'image_url'")
    if users != 1:
        raise ApiError(400, f"{users} user messages: send exactly one user message (single turn)")
    if len(images) != 1:
        raise ApiError(400, f"{len(images)} images: CitrusV answers about exactly one image per request")
    prompt = "\n".join(t for t in texts if t.strip())
    if not prompt.strip():
        raise ApiError(400, "the user message has no text; ask a question or say what to segment")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"the prompt has {len(prompt):,} characters, more than the {MAX_PROMPT_CHARS:,} allowed")
    return images[0], prompt


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.text or "" for p in content or [] if p.type == "text")


def completion(result, state, max_tokens: int) -> dict:
    stopped = result.forced_answer or (result.generated_ids and result.generated_ids[-1] in state.engine.stop_ids)
    finish = "stop" if stopped or len(result.generated_ids) < max_tokens else "length"
    prompt_tokens, completion_tokens = len(result.input_ids), len(result.generated_ids)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": state.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "raw_response": {"seg_masks_rle": [rle.encode(reference_binary_mask(m.low_res_logits)) for m in result.masks]}}
