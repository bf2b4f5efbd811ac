"""Conversations about an uploaded volume (CONTRACTS.md, issue 23; docs/conversation.md):
POST /v1/volumes/{id}/conversations, POST /v1/conversations/{cid}/turns (202: a job), GET /v1/conversations
(?volume_id=), GET /v1/conversations/{cid}, GET /v1/conversations/{cid}/export?format=json|markdown,
DELETE /v1/conversations/{cid}."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import Field

from ...option_fields import request_model
from ...volume.tasks.conversation import (DEFAULT_BUDGET_TOKENS, MAX_PROMPT_CHARS, Conversation, TurnRequest,
                                          budget_problem, check_turn, conversation_markdown, estimated_turn_tokens,
                                          turn_slice_png)
from ..codec import b64encode
from ..errors import ApiError
from ..jobs import Job
from ..payloads import to_json_bytes
from ..schemas import JobInfo, Strict
from . import Service

router = APIRouter(tags=["conversations"])

VoxelIndex = Annotated[int, Field(ge=0, le=65535)]


class ConversationCreate(Strict):
    title: Annotated[str, Field(max_length=200)] | None = None
    budget_tokens: Annotated[int, Field(ge=512, le=1_000_000)] | None = Field(
        None, description=f"the conversation's token budget (default {DEFAULT_BUDGET_TOKENS}, at most the model's context)")


class RegionOfInterest(Strict):
    ijk_min: Annotated[list[VoxelIndex], Field(min_length=3, max_length=3)]
    ijk_max: Annotated[list[VoxelIndex], Field(min_length=3, max_length=3)]


class TurnCreate(request_model(TurnRequest, "TurnOptionFields", base=Strict)):
    """A turn: its axis, window, token and pixel options are the volume options' own declarations (TurnRequest)."""
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    slice: Annotated[int, Field(ge=0)] | None = Field(None, description="null: a text-only follow-up (no new image)")
    roi: RegionOfInterest | None = None
    propagate: bool = False
    answer: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        None, description="force this answer instead of letting the model write one (as the segment task's answer)")

    def to_request(self) -> TurnRequest:
        return TurnRequest(prompt=self.prompt, slice=self.slice, axis=self.axis, window=self.window,
                           roi=None if self.roi is None else self.roi.model_dump(), propagate=self.propagate,
                           answer=self.answer, max_new_tokens=self.max_new_tokens,
                           min_pixels=self.min_pixels, max_pixels=self.max_pixels)



@router.post("/v1/volumes/{volume_id}/conversations", status_code=201)
def create_conversation(volume_id: str, state: Service, body: ConversationCreate | None = None) -> dict:
    stored = state.volumes.get(volume_id)
    body = body or ConversationCreate()
    budget = body.budget_tokens or DEFAULT_BUDGET_TOKENS
    context = state.engine.context_length
    conversation = Conversation.new(stored.volume, stored.id, body.title,
                                    budget_tokens=min(budget, context) if context else budget)
    state.conversations.add(conversation)
    return {"conversation_id": conversation.id, "volume_id": stored.id, "title": conversation.title,
            "budget_tokens": conversation.budget_tokens, "turns": []}


@router.post("/v1/conversations/{conversation_id}/turns", status_code=202, response_model=JobInfo)
def submit_turn(conversation_id: str, body: TurnCreate, request: Request, state: Service) -> dict:
    from ..conversations import turn_runner

    conversation = state.conversations.get(conversation_id)
    volume_id = conversation.volume.get("volume_id")
    try:
        stored = state.volumes.get(volume_id)
    except ApiError as error:
        raise ApiError(409 if error.status_code == 404 else error.status_code,
                       f"the volume of conversation {conversation_id} is no longer on the server ({error.message}); "
                       f"its history can still be read and exported; upload the volume again and start a new "
                       f"conversation to go on", type="volume_gone") from None
    turn = body.to_request()
    if "max_new_tokens" not in body.model_fields_set:  # the default never asks for more than this server allows
        turn.max_new_tokens = min(turn.max_new_tokens, state.config.max_new_tokens)
    check_turn(conversation, stored.volume, turn, state.config.max_new_tokens)
    problem = budget_problem(conversation, estimated_turn_tokens(stored.volume, turn), turn.max_new_tokens)
    if problem:
        raise ApiError(413, problem, type="conversation_too_long")
    job = Job(task="ask", runner=turn_runner(state.engine, conversation, stored.volume, turn,
                                             state.config.max_new_tokens), volume_id=stored.id)
    end_turn = state.conversations.begin_turn(conversation, job.id)
    release_volume = state.volumes.hold(stored)

    def release() -> None:
        end_turn()
        release_volume()

    job.release = release
    try:
        state.jobs.submit(job)
    except ApiError:
        release()
        raise
    request.scope["state"]["job_id"] = job.id
    return state.jobs.describe(job)


@router.get("/v1/conversations")
def list_conversations(state: Service, volume_id: str | None = None) -> dict:
    return {"conversations": [c.summary() for c in state.conversations.listed(volume_id)]}


@router.get("/v1/conversations/{conversation_id}")
def get_conversation(conversation_id: str, state: Service) -> Response:
    return Response(to_json_bytes(state.conversations.get(conversation_id).to_dict()), media_type="application/json")


@router.get("/v1/conversations/{conversation_id}/export")
def export_conversation(conversation_id: str, state: Service,
                        format: Annotated[Literal["json", "markdown"], Query()] = "json") -> Response:
    """JSON (the whole conversation) or Markdown with each turn's slice as the model saw it (an embedded PNG,
    while the volume is still on the server)."""
    conversation = state.conversations.get(conversation_id)
    name = f"conversation-{conversation.id}"
    if format == "json":
        return Response(to_json_bytes(conversation.to_dict()), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{name}.json"'})
    pictures = {}
    try:
        volume = state.volumes.get(conversation.volume.get("volume_id")).volume
    except ApiError:
        volume = None  # the volume has gone: the export says where each turn was asked, without pictures
    if volume is not None:
        for turn in conversation.turns:
            png = turn_slice_png(volume, turn)
            if png is not None:
                pictures[turn.number] = f"data:image/png;base64,{b64encode(png)}"
    return Response(conversation_markdown(conversation, pictures), media_type="text/markdown; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}.md"'})


@router.delete("/v1/conversations/{conversation_id}", status_code=204)
def delete_conversation(conversation_id: str, state: Service) -> Response:
    state.conversations.delete(conversation_id)
    return Response(status_code=204)
