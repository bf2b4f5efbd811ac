"""`stream: true` on /v1/chat/completions: the answer as Server-Sent Events while the model writes it.

The chunks are ms-swift's (`ChatCompletionStreamResponse`, which is OpenAI's `chat.completion.chunk`): one
`data: {json}` event per piece of text with `delta: {"role": "assistant", "content": piece}`, the last one with
its `finish_reason` and `usage`, then `data: [DONE]`. Extension: the last chunk also carries `raw_response`
(the masks, `seg_masks_rle`), which swift's stream never sends — masks exist only once the answer is complete.
A failure before the first piece is an ordinary JSON error response; one after it is an `{"error": ...}` event
(the `openai` package raises it), then `[DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Callable

from starlette.responses import StreamingResponse

from .errors import ApiError, job_failure
from .jobs import Job, JobEnded

_END = object()  # the job has finished (its future holds the result or the failure)


class TextRelay:
    """Pieces of text from the worker thread to the request's event loop, in order; closed, it drops them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def put(self, item) -> None:
        if self.closed:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has stopped (the server is shutting down)
            self.closed = True

    def close(self) -> None:
        self.closed = True


class EventStream(StreamingResponse):
    """A streaming response that always runs `on_close` when it ends — finished, failed or the client gone."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()  # runs the generator's own clean-up now, not at garbage collection


async def stream_job(state, run: Callable, final_chunk: Callable) -> EventStream:
    """Queue `run(job, on_text)` and stream its text; `final_chunk(result, rest)` builds the last chunk's fields."""
    relay = TextRelay(asyncio.get_running_loop())
    job = Job(task="chat", runner=lambda job: run(job, relay.put), kept=False)
    state.jobs.submit(job)
    job.future.add_done_callback(lambda _future: relay.put(_END))
    try:
        first = await asyncio.wait_for(relay.queue.get(), state.config.request_timeout_s)
    except asyncio.TimeoutError:
        relay.close()
        state.jobs.cancel(job)
        raise ApiError(504, f"no answer started within {state.config.request_timeout_s:g} s (the GPU worker is busy "
                            f"with earlier jobs); try again later") from None
    if first is _END and job.future.exception() is not None:
        relay.close()
        raise job_failure(job)
    identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": state.model_name}
    def close() -> None:  # as soon as the stream ends; before the job has, the client has gone: cancel it
        relay.close()
        if not job.future.done():
            state.jobs.cancel(job)

    return EventStream(_events(first, relay, job, identity, final_chunk), on_close=close)


async def _events(first, relay: TextRelay, job: Job, identity: dict, final_chunk: Callable):
    sent = []
    try:
        item = first
        while item is not _END:
            sent.append(item)
            yield _event(identity | {"choices": [_choice(item, None)], "usage": None})
            item = await relay.queue.get()
        try:
            result = job.future.result()
        except JobEnded:
            error = job_failure(job)
            yield _event({"error": {"message": error.message, "type": error.type, "code": error.status_code}})
        else:
            streamed = "".join(sent)
            rest = result.text[len(streamed):] if result.text.startswith(streamed) else ""
            fields = final_chunk(result)
            yield _event(identity | {"choices": [_choice(rest, fields.pop("finish_reason"))]} | fields)
        yield "data: [DONE]\n\n"
    finally:
        relay.close()


def _choice(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "delta": {"role": "assistant", "content": text, "tool_calls": None},
            "finish_reason": finish_reason, "logprobs": None}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"
