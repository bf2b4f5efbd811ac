"""A conversation about a volume, on the module's side: one question at a time through the service (no MRML, no Qt).

`ConversationTurnRunner` is Apply's runner (runner.py: upload once, follow the job, cancel, fetch, decode in
short steps) with another submit: the conversation is created on the server the first time
(`POST /v1/volumes/{id}/conversations`), then each question is `POST /v1/conversations/{cid}/turns`, whose job the
runner follows as it follows Apply's. A server that no longer holds the conversation (restarted, the volume
evicted) gets a new one and the turn says so: the model did not see the turns before it.

`turn_record` turns a job result into the history's entry (what was asked where, the answer, what it produced,
the honesty marks), and `history_markdown` writes a history out as the scene holds it, with each turn's slice.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from .runner import ApplyRunner
from .transport import Call

HISTORY_FORMAT = "citrusv-conversation/1"
RANDOM_WEIGHTS_MARK = "RANDOM WEIGHTS: produced by a random test model; the content is noise."
EXPERIMENTAL_MARK = "EXPERIMENTAL: the model's CT reports are not validated."


@dataclass
class Question:
    """What *Ask about this slice* sends: the contract's turn body plus where it was asked (for the history)."""

    prompt: str
    axis: str                         # "axial" | "coronal" | "sagittal"
    slice: int
    window: str | None = None
    roi: dict | None = None           # {"ijk_min": [i, j, k], "ijk_max": [i, j, k]}, voxels inclusive
    propagate: bool = False
    view: str = ""                    # "Red" / "Yellow" / "Green", or "" (a script, a propagation)
    propagated_from: int | None = None
    answer: str | None = None         # scripts and tests: an answer the model is made to give (it does not write it)

    def body(self) -> dict:
        body = {"prompt": self.prompt, "slice": int(self.slice), "axis": self.axis, "window": self.window,
                "roi": self.roi, "propagate": bool(self.propagate)}
        if self.answer is not None:
            body["answer"] = self.answer
        return body


class ConversationTurnRunner(ApplyRunner):
    """One question of a conversation; `conversation_id` is the server's (None: created on the first question)."""

    def __init__(self, upload, question: Question, conversation_id: str | None = None, title: str | None = None,
                 volume_id: str | None = None):
        super().__init__(upload, "ask", question.prompt, {}, volume_id=volume_id)
        self.question = question
        self.conversation_id = conversation_id
        self.title = title
        self.context_reset = False     # the server had lost the conversation: this turn began a new one

    def _submit(self) -> None:
        self.stage = "submit"
        if self.conversation_id is None:
            self._call = self.transport.request(self.target, "POST", f"/v1/volumes/{self.volume_id}/conversations",
                                                json_body={"title": self.title}, on_done=self._created)
        else:
            self._call = self.transport.request(self.target, "POST", f"/v1/conversations/{self.conversation_id}/turns",
                                                json_body=self.question.body(), on_done=self._turn_submitted)

    def _created(self, call: Call) -> None:
        self._call = None
        if not self.active:
            return
        if not call.ok and self._reused and call.status == 404:   # the volume went too: send it again
            self._reused, self.volume_id = False, None
            return self._begin_upload()
        if call.error:
            return self._fail(str(call.error))
        self.conversation_id = call.json()["conversation_id"]
        if self.state == "cancelling":
            return self._finish_cancelled()
        self._submit()

    def _turn_submitted(self, call: Call) -> None:
        lost = error_type(call) in ("conversation_not_found", "volume_gone")
        if self.active and lost and not self.context_reset:  # once: a server that keeps refusing is not looped on
            self._call = None
            self.conversation_id, self.context_reset = None, True
            if error_type(call) == "volume_gone":           # the conversation's upload was evicted: send it again
                self._reused, self.volume_id = False, None
                return self._begin_upload()
            return self._submit()
        self._submitted(call)   # Apply's: the job id, then follow it


def error_type(call: Call) -> str | None:
    """The service's error type ({"error": {"type", ...}}) of a refused call, if it says one."""
    if call.ok or call.status is None:
        return None
    try:
        return (json.loads(call.body()).get("error") or {}).get("type")
    except (ValueError, AttributeError):
        return None


def window_text(window) -> str:
    """The window a slice was shown with: the backend's {"name", "center", "width"}, or the name asked for."""
    if isinstance(window, dict):
        name = window.get("name") or "window"
        if window.get("center") is not None and window.get("width") is not None:
            return f"{name} ({window['center']:g}/{window['width']:g})"
        return name
    return window or "default"


def turn_record(question: Question, payload: dict, conversation_id: str, job_id: str | None,
                context_reset: bool = False) -> dict:
    """The history's entry for one answered question (the scene side adds the names of what it wrote)."""
    answer = payload.get("answer") or {}
    experimental = payload.get("experimental_note") or payload.get("experimental")
    segments = [{"name": s.get("name", ""), "label": s.get("label"), "found": s.get("mask") is not None and
                 s.get("found", True), "reason": s.get("reason"), "key_slice": s.get("key_slice"),
                 "score": s.get("score")} for s in payload.get("segments", [])]
    return {
        "turn": int(payload.get("turn") or 0), "conversation_id": conversation_id, "job_id": job_id,
        "asked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "question": asdict(question), "prompt": question.prompt,
        "answer": answer.get("text", ""),
        # What the server says it read, which is what the model saw (it may differ from the request: a default window).
        "axis": answer.get("axis") or question.axis, "slice": answer.get("slice", question.slice),
        "window": question.window, "window_shown": answer.get("window"), "roi": question.roi, "view": question.view,
        "propagate": question.propagate, "propagated_from": question.propagated_from,
        "model": payload.get("model", ""), "random_weights": bool(payload.get("random_weights")),
        "experimental": (experimental if isinstance(experimental, str) else
                         (EXPERIMENTAL_MARK if experimental else "")),
        "problems": list(payload.get("problems") or []), "context_reset": context_reset,
        "segments": segments, "boxes": [dict(b) for b in payload.get("boxes", [])],
    }


def turn_title(turn: dict) -> str:
    """One line for the history list."""
    where = f"{turn['axis']} {turn['slice']}" + (" (ROI)" if turn.get("roi") else "")
    made = []
    found = [s for s in turn.get("segments", []) if s.get("found")]
    if found:
        made.append(f"{len(found)} segment(s)")
    if turn.get("boxes"):
        made.append(f"{len(turn['boxes'])} box(es)")
    marks = (" [RANDOM WEIGHTS]" if turn.get("random_weights") else "") + \
            (" [EXPERIMENTAL]" if turn.get("experimental") else "")
    return f"{turn['turn']}. {turn['prompt']} — {where}" + (f" → {', '.join(made)}" if made else "") + marks


def turn_details(turn: dict) -> str:
    """The "why" of a turn: what the model read, what it answered, what came of it (the panel's answer box)."""
    lines = []
    if turn.get("random_weights"):
        lines.append(RANDOM_WEIGHTS_MARK)
    if turn.get("experimental"):
        lines.append(turn["experimental"])
    if turn.get("context_reset"):
        lines.append("The backend no longer held this conversation: this turn began a new one (the model did not "
                     "see the turns before it).")
    lines.append(f"Q: {turn['prompt']}")
    lines.append(f"A: {turn['answer']}")
    where = f"{turn['axis']} slice {turn['slice']}, window {window_text(turn.get('window_shown') or turn.get('window'))}"
    if turn.get("view"):
        where += f", asked in the {turn['view']} view"
    if turn.get("roi"):
        where += f", ROI ijk {turn['roi']['ijk_min']}..{turn['roi']['ijk_max']}"
    if turn.get("propagated_from"):
        where += f", turn {turn['propagated_from']} propagated through the volume"
    lines.append(f"Read: {where}; model {turn.get('model') or 'unknown'}.")
    for segment in turn.get("segments", []):
        if segment.get("found"):
            evidence = [f"key slice {segment['key_slice']}" if segment.get("key_slice") is not None else "",
                        f"score {segment['score']:.3f}" if isinstance(segment.get("score"), (int, float)) else ""]
            evidence = ", ".join(e for e in evidence if e)
            lines.append(f"Segment '{segment.get('segment_name') or segment['name']}'" +
                         (f" ({evidence})" if evidence else ""))
        else:
            lines.append(f"Segment '{segment['name']}' not made: {segment.get('reason') or 'no mask'}")
    for box in turn.get("boxes", []):
        lines.append(f"Box '{box.get('label') or 'box'}': ijk {box.get('ijk_min')}..{box.get('ijk_max')}"
                     + (f" (ROI node '{box['roi_name']}')" if box.get("roi_name") else ""))
    for problem in turn.get("problems", []):
        lines.append(f"Problem: {problem}")
    return "\n".join(lines)


def history_markdown(history: dict, volume_name: str) -> str:
    """A conversation as the scene keeps it, in Markdown: each turn's slice, answer, segments, boxes and marks."""
    turns = history.get("turns", [])
    lines = [f"# CitrusV conversation about {volume_name}", ""]
    if any(t.get("random_weights") for t in turns):
        lines += [f"**{RANDOM_WEIGHTS_MARK}**", ""]
    for mark in sorted({t["experimental"] for t in turns if t.get("experimental")}):
        lines += [f"**{mark}**", ""]
    models = sorted({t.get("model") or "unknown" for t in turns})
    lines += [f"Model: {', '.join(models) or 'none yet'}. Research use only: not for clinical decisions.", ""]
    for turn in turns:
        lines += [f"## Turn {turn['turn']}: {turn['prompt']}", ""]
        lines += [f"- {line}" for line in turn_details(turn).splitlines()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
