"""The service's conversations (volume/tasks/conversation.py) by id, and their turns as jobs on the GPU worker.

A conversation belongs to the uploaded volume it was started on; it outlives the volume (it can still be read,
exported and deleted; a new turn needs the volume again). At most one turn per conversation is queued or
running: the next question needs the previous answer. The store keeps at most `max_conversations`; beyond,
the least recently used one without a turn in progress is forgotten.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from ..inference.engine import CitrusVEngine
from ..volume.input.io import Volume
from ..volume.options import VolumeOptions
from ..volume.outputs.dicom_out import model_name
from ..volume.tasks.conversation import Conversation, ConversationRunner, TurnRequest
from .errors import ApiError
from .jobs import Job
from .payloads import to_json_bytes, volume_result_payload

MAX_CONVERSATIONS = 256


class ConversationStore:
    def __init__(self, max_conversations: int = MAX_CONVERSATIONS, clock=time.monotonic):
        self.max_conversations = max_conversations
        self.clock = clock
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._busy: dict[str, str] = {}      # conversation id -> the job id of its turn in progress
        self._forgotten: dict[str, str] = {}  # conversation id -> why it is gone
        self._lock = threading.Lock()

    def add(self, conversation: Conversation) -> Conversation:
        with self._lock:
            self._conversations[conversation.id] = conversation
            idle = [cid for cid in self._conversations if cid not in self._busy]
            for cid in idle[: max(0, len(self._conversations) - self.max_conversations)]:
                self._conversations.pop(cid)
                self._forgotten[cid] = f"the server keeps at most {self.max_conversations} conversations"
        return conversation

    def get(self, conversation_id: str) -> Conversation:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                reason = self._forgotten.get(conversation_id)
                raise ApiError(404, f"conversation {conversation_id} is gone ({reason})" if reason else
                               f"no conversation {conversation_id!r}", type="conversation_not_found")
            self._conversations.move_to_end(conversation_id)
            return conversation

    def listed(self, volume_id: str | None = None) -> list[Conversation]:
        with self._lock:
            return [c for c in self._conversations.values() if volume_id is None or c.volume.get("volume_id") == volume_id]

    def delete(self, conversation_id: str) -> None:
        self.get(conversation_id)
        with self._lock:
            if conversation_id in self._busy:
                raise ApiError(409, f"conversation {conversation_id} has a turn in progress (job "
                                    f"{self._busy[conversation_id]}); cancel it first", type="conversation_busy")
            self._conversations.pop(conversation_id, None)
            self._forgotten[conversation_id] = "deleted by a client"

    def begin_turn(self, conversation: Conversation, job_id: str) -> Callable[[], None]:
        """Marks the conversation busy with `job_id` (409 when it already is); the returned function ends it."""
        with self._lock:
            if conversation.id in self._busy:
                raise ApiError(409, f"conversation {conversation.id} already has a turn in progress (job "
                                    f"{self._busy[conversation.id]}); wait for its answer", type="conversation_busy")
            self._busy[conversation.id] = job_id

        def end() -> None:
            with self._lock:
                if self._busy.get(conversation.id) == job_id:
                    del self._busy[conversation.id]
        return end


def service_model_name(engine: CitrusVEngine) -> str:
    """What every turn records as its model: the weights' own name (the served name may be the reference's)."""
    return model_name(engine.loaded.describe())


def turn_runner(engine: CitrusVEngine, conversation: Conversation, volume: Volume, request: TurnRequest,
                max_new_tokens: int) -> Callable[[Job], bytes]:
    def run(job: Job) -> bytes:

        runner = ConversationRunner(engine, service_model_name(engine), progress=job.progress,
                                    should_cancel=job.should_cancel)
        outcome = runner.ask(conversation, volume, request, max_new_tokens)
        job.progress("packing the result", 0.99, outcome.turn.answer)
        return to_json_bytes(turn_payload(conversation, outcome, volume) | {"job_id": job.id})
    return run


def turn_payload(conversation: Conversation, outcome, volume: Volume) -> dict:
    """The job result of a turn (CONTRACTS.md, issue 23): a volume result of its segments and ROIs, plus the
    answer, where it was asked, and the honesty markings."""

    turn = outcome.turn
    payload = volume_result_payload(outcome.result, volume)
    for segment in payload["segments"]:
        segment["turn"] = turn.number
        segment.setdefault("score", segment.get("key_score"))
    return payload | {
        "task": "ask", "conversation_id": conversation.id, "volume_id": conversation.volume.get("volume_id"),
        "turn": turn.number, "model": turn.model, "random_weights": turn.random_weights,
        "experimental": bool(turn.experimental), "experimental_note": turn.experimental,
        "answer": {"text": turn.answer, "slice": turn.slice, "axis": turn.axis, "window": turn.window,
                   "roi": turn.roi, "masks_on_turn": turn.masks_on_turn, "forced": turn.forced_answer},
        "boxes": turn.boxes, "problems": turn.problems,
        "tokens": {"conversation": conversation.tokens, "budget": conversation.budget_tokens}}


def ask_payload(engine: CitrusVEngine, volume: Volume, request, options: VolumeOptions, job: Job) -> dict:
    """The volume job "ask" (POST /v1/jobs): a one-turn conversation that is not kept, on options.slice or the
    middle of the slice range; its answer's [SEG] and boxes become segments and ROIs as in a conversation."""
    from ..volume.slices.orientation import model_orientation

    depth = volume.shape[model_orientation(volume.geometry.direction, options.axis).slice_axis]
    first, last = options.validate(depth)
    index = request.options.slice if request.options.slice is not None else (first + last - 1) // 2
    conversation = Conversation.new(volume)
    turn = TurnRequest(prompt=request.prompt, slice=index, axis=options.axis, window=options.window,
                       max_new_tokens=options.max_new_tokens, min_pixels=options.min_pixels,
                       max_pixels=options.max_pixels)
    runner = ConversationRunner(engine, service_model_name(engine), progress=job.progress,
                                should_cancel=job.should_cancel)
    outcome = runner.ask(conversation, volume, turn)
    payload = turn_payload(conversation, outcome, volume)
    del payload["conversation_id"], payload["volume_id"], payload["tokens"]
    payload["settings"] = {"axis": options.axis, "window": outcome.turn.window, "slice": index}
    payload["timings"] = outcome.inference.timings
    return payload
