"""OpenAI-compatible GET /v1/models and POST /v1/chat/completions, in the reference server's shapes (ms-swift
`deploy`), so its clients — the `openai` package, the Gradio and Streamlit demos — work unchanged.

Request: a conversation as ms-swift's deploy takes it — user and assistant messages in turn, ending with the user's
question; each user message has text parts and any number of images (`{"type": "image_url", "image_url": {"url":
"data:..."}}`, `{"type": "image", "image": "data:..."}`; swift's top-level `images: [...]` go to the first user
message), at most MAX_CHAT_IMAGES in all. Chat clients resend the history every turn: the model sees every earlier
question, image and answer, rendered as Qwen2.5-VL's chat template renders them (`CitrusVProcessor.
conversation_pieces`). As in swift, the text parts are joined as they are and an image part stands where it is
in the message; a `<image>` typed in the text marks the image's position instead (swift would leave it as text
after the image; `serve --chat-image-tags swift` keeps swift's rule). Text-only questions and empty questions
about an image are answered. The answer's `[SEG]` masks and box frame are those of the conversation's first
image, as the reference's `citrus_v_infer` template builds SAM2's input from the first image.
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

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ...model.processor import IMAGE_TAG, SYSTEM_PROMPT, TASK_PIXEL_BUDGETS, PixelBudget, check_prompt_and_answer
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


MAX_CHAT_IMAGES = 16
MAX_CONVERSATION_CHARS = 8 * MAX_PROMPT_CHARS


@dataclass
class ChatTurn:
    prompt: str               # the user's text, `<image>` where each image goes
    images: list[str]         # the images as the client named them (data URI, base64 or path)
    answer: str | None        # the assistant's answer that followed (None: the question being asked)


@dataclass
class Conversation:
    turns: list[ChatTurn]

    @property
    def prompt(self) -> str:
        return self.turns[-1].prompt

    @property
    def image(self) -> str | None:
        """The one image of a single-turn conversation (None: text only)."""
        images = [image for turn in self.turns for image in turn.images]
        return images[0] if images else None

    @property
    def single_turn(self) -> bool:
        return len(self.turns) == 1 and len(self.turns[0].images) <= 1


@router.get("/v1/models")
def list_models(state: Service) -> dict:
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started_at),
                                        "owned_by": "citrusv"}]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: Service) -> Response:
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
    server_min, server_max = state.config.pixel_budget()
    min_pixels, max_pixels = extension.min_pixels or server_min, extension.max_pixels or server_max
    if chat.single_turn:
        image = None if chat.image is None else await run_in_threadpool(load_chat_image, chat.image, state.config)

        def run(job, on_text=None):
            return state.engine.run(image, chat.prompt, task=extension.task, answer=extension.answer,
                                    min_pixels=min_pixels, max_pixels=max_pixels, max_new_tokens=max_tokens,
                                    allow_empty_prompt=True, on_text=on_text, should_cancel=job.should_cancel)
    else:
        inputs = await run_in_threadpool(conversation_inputs, state, chat, extension, min_pixels, max_pixels)

        def run(job, on_text=None):
            return state.engine.run_inputs(inputs, chat.prompt, task=extension.task, answer=extension.answer,
                                           max_new_tokens=max_tokens, on_text=on_text, should_cancel=job.should_cancel)

    if body.stream:
        return await stream_job(state, run, lambda result: final_fields(result, state, max_tokens))
    result = await run_now(state, Job(task="chat", runner=run, kept=False), request)
    return Response(to_json_bytes(completion(result, state, max_tokens)), media_type="application/json")


def conversation(messages: list[ChatMessage], images: list[str], image_tags: str = "text") -> Conversation:
    """The turns of a conversation as ms-swift's `remove_messages_media` reads each user message: text parts
    joined as they are, each image part a `<image>` where it stands. With `image_tags="text"` a tag the user
    typed marks the image instead of the part's (swift would keep both, the second as text). Messages alternate
    user, assistant, ..., user (the question)."""
    turns: list[ChatTurn] = []
    for message in messages:
        if message.role == "system":
            if _text_of(message.content).strip() not in ("", SYSTEM_PROMPT):
                raise ApiError(400, f"custom system prompts are not supported (the model was trained with "
                                    f"{SYSTEM_PROMPT!r}); leave the system message out")
            continue
        if message.role == "assistant":
            if not turns or turns[-1].answer is not None:
                raise ApiError(400, "an assistant message must follow a user message (user and assistant take turns)")
            answer = _assistant_text(message.content)
            check_prompt_and_answer(None, answer)
            turns[-1].answer = answer
            continue
        if message.role != "user":
            raise ApiError(400, f"a {message.role!r} message: only system, user and assistant messages are supported")
        if turns and turns[-1].answer is None:
            raise ApiError(400, "two user messages in a row: user and assistant messages take turns (put the "
                                "assistant's answer between them, or join the two questions)")
        turns.append(_user_turn(message, images if not turns else [], image_tags))
    if not turns:
        raise ApiError(400, "0 user messages: send the question as a user message")
    if turns[-1].answer is not None:
        raise ApiError(400, "the last message is the assistant's: end the conversation with the user's question")
    total_images = sum(len(turn.images) for turn in turns)
    if total_images > MAX_CHAT_IMAGES:
        raise ApiError(400, f"{total_images} images in the conversation, more than the {MAX_CHAT_IMAGES} allowed; "
                            f"start a new conversation")
    if len(turns[-1].prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"the prompt has {len(turns[-1].prompt):,} characters, more than the {MAX_PROMPT_CHARS:,} "
                            f"allowed")
    total = sum(len(turn.prompt) + len(turn.answer or "") for turn in turns)
    if total > MAX_CONVERSATION_CHARS:
        raise ApiError(413, f"the conversation has {total:,} characters, more than the {MAX_CONVERSATION_CHARS:,} "
                            f"allowed; start a new conversation", type="conversation_too_long")
    if not turns[-1].images and not turns[-1].prompt.strip():
        raise ApiError(400, "the user message has neither text nor an image; ask a question")
    return Conversation(turns)


def _user_turn(message: ChatMessage, images: list[str], image_tags: str) -> ChatTurn:
    sources, pieces, typed = list(images), [], []
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
    text = "".join(typed)
    prompt = text if image_tags == "text" and IMAGE_TAG in text else "".join(pieces)
    return ChatTurn(prompt=prompt, images=sources, answer=None)


def _assistant_text(content) -> str:
    if isinstance(content, str) or content is None:
        return content or ""
    if any(part.type != "text" for part in content):
        raise ApiError(400, "an assistant message may hold only text (the model writes no images)")
    return "".join(part.text or "" for part in content)


def conversation_inputs(state, chat: Conversation, extension: CitrusVOptions, min_pixels: int | None,
                        max_pixels: int | None):
    """A multi-turn or multi-image conversation's model inputs (every image decoded and prepared; SAM2's input
    from the first image, as the reference's template builds it)."""
    processor = state.engine.processor
    default = TASK_PIXEL_BUDGETS[extension.task]
    budget = PixelBudget(min_pixels or default.min_pixels, max_pixels or default.max_pixels)
    turns, focus = [], None
    for turn in chat.turns:
        prepared = []
        for source in turn.images:
            image = processor.prepare_image(load_chat_image(source, state.config), budget, sam2=focus is None)
            focus = focus or image
            prepared.append(image)
        turns.append((turn.prompt, prepared, turn.answer))
    return processor.conversation_inputs(turns, focus, answer=extension.answer, allow_empty=True)


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
