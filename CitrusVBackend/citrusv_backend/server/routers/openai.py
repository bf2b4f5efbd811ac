"""OpenAI-compatible GET /v1/models and POST /v1/chat/completions, in the reference server's shapes (ms-swift
`deploy`), so its clients — the `openai` package, the Gradio and Streamlit demos — work unchanged.

Request: one user message with at most one image (`{"type": "image_url", "image_url": {"url": "data:..."}}`,
`{"type": "image", "image": "data:..."}`, or swift's top-level `images: [...]`) and text parts. As in swift, the
text parts are joined as they are and an image part stands where it is in the message; a `<image>` typed in the
text marks the image's position instead (swift would leave it as text after the image; `serve --chat-image-tags
swift` keeps swift's rule). Text-only questions and empty questions about an image are answered.
Response: a chat.completion plus a top-level `raw_response` with `seg_masks_rle` — one COCO RLE of the 256x256
mask (sigmoid(low-res logits) > 0.5) per [SEG] — and the image's `original_size` and `resized_size` ([h, w]; the
model writes box coordinates in the resized frame). `stream: true`: Server-Sent Events (chat_stream.py).

`max_tokens` above the server's --max-new-tokens is clipped to it (as swift clips to the model's context), not
refused. The image-size budget: the request's `citrusv` options, else the server's --min-pixels/--max-pixels
($MIN_PIXELS/$MAX_PIXELS), else the task's (`citrusv.task`, default segment = the reference deployment's
MAX_PIXELS=65535). Differences, all deliberate: decoding is always greedy (any `temperature`/`top_p` is accepted
and ignored: the reference's clients send temperature 0 and sampling would make masks unrepeatable); `n` must be
1; the server fetches no URLs and reads files only inside the folders of --allow-local-images; only the default
system prompt is supported. Extension: a `citrusv` object (`extra_body={"citrusv": {...}}` in the openai package)
may force the answer (`answer`), pick the task (`task`) or set `min_pixels`/`max_pixels`.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ...model.processor import IMAGE_TAG, SYSTEM_PROMPT, check_prompt_and_answer
from .. import rle
from ..chat_stream import stream_job
from ..codec import b64decode, decode_image, image_source
from ..errors import ApiError
from ..jobs import Job
from ..local_images import read_local_image
from ..schemas import MAX_PROMPT_CHARS, Pixels
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
    images: Annotated[list[str], Field(max_length=1)] | None = None  # ms-swift's own request field
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    n: int | None = None
    stream: bool | None = False
    citrusv: CitrusVOptions | None = None


@dataclass
class Conversation:
    prompt: str               # the user's text, `<image>` where the image goes
    image: str | None         # the image as the client named it (data URI, base64 or path); None: text only


@router.get("/v1/models")
def list_models(state: Service) -> dict:
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started_at),
                                        "owned_by": "citrusv"}]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, state: Service) -> Response:
    if body.model != state.model_name:
        raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {state.model_name!r}",
                       type="model_not_found")
    if body.n not in (None, 1):
        raise ApiError(400, "n must be 1: decoding is greedy, so every choice would be the same")
    requested = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    max_tokens = min(requested, state.config.max_new_tokens)  # clipped, as swift clips to what fits
    chat = conversation(body.messages, body.images or [], state.config.chat_image_tags)
    extension = body.citrusv or CitrusVOptions()
    check_prompt_and_answer(chat.prompt, extension.answer)
    image = None if chat.image is None else await run_in_threadpool(load_chat_image, chat.image, state.config)
    server_min, server_max = state.config.pixel_budget()

    def run(_job, on_text=None):
        return state.engine.run(image, chat.prompt, task=extension.task, answer=extension.answer,
                                min_pixels=extension.min_pixels or server_min, max_pixels=extension.max_pixels or server_max,
                                max_new_tokens=max_tokens, allow_empty_prompt=True, on_text=on_text)

    if body.stream:
        return await stream_job(state, run, lambda result: final_fields(result, state, max_tokens))
    result = await run_now(state, Job(task="chat", runner=run, kept=False))
    return Response(to_json_bytes(completion(result, state, max_tokens)), media_type="application/json")


def conversation(messages: list[ChatMessage], images: list[str], image_tags: str = "text") -> Conversation:
    """The prompt and the image of a single-turn conversation, as ms-swift's `remove_messages_media` reads it:
    text parts joined as they are, each image part a `<image>` where it stands. With `image_tags="text"` a tag
    the user typed marks the image instead of the part's (swift would keep both, the second as text)."""
    sources, pieces, typed, users = list(images), [], [], 0
    for message in messages:
        if message.role == "system":
            if _text_of(message.content).strip() not in ("", SYSTEM_PROMPT):
                raise ApiError(400, f"custom system prompts are not supported (the model was trained with "
                                    f"{SYSTEM_PROMPT!r}); leave the system message out")
            continue
        if message.role != "user":
            raise ApiError(400, f"a {message.role!r} message: only single-turn conversations are supported (one user "
                                f"message with at most one image and the question)")
        users += 1
        parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content or []
        for part in parts:
            if part.type == "text":
                pieces.append(part.text or "")
                typed.append(part.text or "")
            elif part.type in ("image_url", "image"):
                source = part.image_url if part.type == "image_url" else part.image
                url = source.url if isinstance(source, ImageURL) else source
                if not url:
                    raise ApiError(400, f"an {part.type!r} content part without an image")
                sources.append(url)
                pieces.append(IMAGE_TAG)
            else:
                raise ApiError(400, f"content parts of type {part.type!r} are not supported; use 'text' and 'image_url'")
    if users != 1:
        raise ApiError(400, f"{users} user messages: send exactly one user message (single turn)")
    if len(sources) > 1:
        raise ApiError(400, f"{len(sources)} images: CitrusV answers about one image per request")
    text = "".join(typed)
    prompt = text if image_tags == "text" and IMAGE_TAG in text else "".join(pieces)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"the prompt has {len(prompt):,} characters, more than the {MAX_PROMPT_CHARS:,} allowed")
    if not sources and not prompt.strip():
        raise ApiError(400, "the user message has neither text nor an image; ask a question")
    return Conversation(prompt=prompt, image=sources[0] if sources else None)


def load_chat_image(text: str, config):
    kind, value = image_source(text, "the image")
    if kind == "url":
        raise ApiError(400, "the image is a URL; this server does not fetch URLs: send the image inline as a "
                            "base64 data URI ('data:image/png;base64,...')")
    if kind == "path":
        return read_local_image(value, config.local_image_dirs, config.body_limit(""))
    return decode_image(b64decode(value, "the image"), "the image")


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.text or "" for p in content or [] if p.type == "text")


def final_fields(result, state, max_tokens: int) -> dict:
    """What the complete answer adds: why it stopped, the token counts, and the masks."""
    stopped = result.forced_answer or (result.generated_ids and result.generated_ids[-1] in state.engine.stop_ids)
    prompt_tokens, completion_tokens = len(result.input_ids), len(result.generated_ids)
    sizes = {key: None if value is None else list(value)
             for key, value in (("original_size", result.original_size), ("resized_size", result.resized_size))}
    return {"finish_reason": "stop" if stopped else "length",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "raw_response": {"seg_masks_rle": [rle.encode(reference_binary_mask(m.low_res_logits)) for m in result.masks],
                             **sizes, "max_tokens": max_tokens, "problems": result.problems}}


def completion(result, state, max_tokens: int) -> dict:
    fields = final_fields(result, state, max_tokens)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": state.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": fields.pop("finish_reason"), "logprobs": None}]} | fields
