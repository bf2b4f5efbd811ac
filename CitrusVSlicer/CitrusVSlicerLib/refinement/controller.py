"""The Refine section's behaviour without Qt: placements in the include / exclude point lists and the box become
refinement steps, sent one at a time; Undo and Redo; answers applied to the segment on the main thread.

Transport: `send(request, on_answer, on_error)` delivers one request and later calls back, on the main thread, with
the answer's JSON or an error message. `TransportSender` is the module's one (the request handed to the HTTP
courier, transport.py; the callback run from `Transport.poll()`, no threads); tests may pass their own. Requests
are built when they are sent, so each carries the version of the segment the previous answer left (no step is
computed on a stale mask).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import vtk

import slicer

from ..endpoints import BackendError
from .segment import Request, SegmentRefinement, StaleAnswer, markup_points, roi_box, world_to_ijk

POINT_EVENTS = ("PointPositionDefinedEvent", "PointEndInteractionEvent")
# A step with re-propagation runs SAM2 over many slices; on a CPU backend that takes a while.
REQUEST_TIMEOUT_SECONDS = 300.0


class RefineController:
    """One segment under refinement, its three markups nodes, and the queue of steps for the backend."""

    def __init__(self, send: Callable, on_status: Callable[[str, bool], None] = lambda text, error: None,
                 settings: dict | None = None, options: dict | None = None):
        self.send = send
        self.on_status = on_status
        self.settings = settings or {}
        self.options = options or {}     # propagate, keep_text, ... as the service takes them
        self.refinement: SegmentRefinement | None = None
        self.include = self.exclude = self.roi = None
        self._observations: list[tuple] = []
        self._pending: deque[Callable[[], Request | None]] = deque()
        self._in_flight = False
        self.busy_changed: Callable[[bool], None] = lambda busy: None
        self.on_applied: Callable[[list[int]], None] = lambda slices: None

    # ------------------------------------------------------------------------------------------ wiring

    def attach(self, refinement: SegmentRefinement, include, exclude, roi) -> None:
        self.detach()
        self.refinement, self.include, self.exclude, self.roi = refinement, include, exclude, roi
        # Markups events pass the point's index as call data; VTK hands it over to a function marked with its type.
        on_point = vtk.calldata_type(vtk.VTK_INT)(lambda caller, event, index=None: self._on_point(caller, event, index))
        for node, handler in ((include, on_point), (exclude, on_point), (roi, self._on_box)):
            if node is None:
                continue
            for name in POINT_EVENTS:
                event = getattr(slicer.vtkMRMLMarkupsNode, name)
                self._observations.append((node, node.AddObserver(event, handler)))

    def detach(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()
        self._pending.clear()
        self.refinement = None

    @property
    def busy(self) -> bool:
        return self._in_flight or bool(self._pending)

    # ------------------------------------------------------------------------------------------ prompts

    def _points(self) -> list[dict]:
        volume = self.refinement.volume_node
        return markup_points(volume, self.include, True) + markup_points(volume, self.exclude, False)

    def _on_point(self, caller, event=None, point_index=None) -> None:
        """A point placed (or dragged) on a slice: every point on that slice, and the box if it covers it."""
        if self.refinement is None:
            return
        placed = self._defined(caller, point_index)
        if placed is not None:
            self.refine_slice(self.refinement.slice_of(placed))

    def _on_box(self, caller, event=None) -> None:
        if self.refinement is not None and roi_box(self.refinement.volume_node, self.roi) is not None:
            self.refine_box()

    def _defined(self, node, point_index) -> dict | None:
        """Control point `point_index` of `node` as a prompt (the last one when the event did not say)."""
        count = node.GetNumberOfControlPoints()
        index = point_index if isinstance(point_index, int) and 0 <= point_index < count else count - 1
        if index < 0 or node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            return None
        world = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, world)
        return {"ijk": world_to_ijk(self.refinement.volume_node, [world])[0].tolist(), "positive": node is self.include}

    def refine_slice(self, index: int) -> None:
        def build():
            points = self.refinement.prompts_on_slice(self._points(), index)
            box = roi_box(self.refinement.volume_node, self.roi)
            if box is not None and not _box_covers(box, index, self.refinement.slice_axis):
                box = None
            return self.refinement.refine_request(points, box, **self.options) if points or box else None
        self._queue(build)

    def refine_box(self) -> None:
        def build():
            box = roi_box(self.refinement.volume_node, self.roi)
            if box is None:
                return None
            axis = self.refinement.slice_axis
            points = [p for p in self._points() if _box_covers(box, self.refinement.slice_of(p), axis)]
            return self.refinement.refine_request(points, box, **self.options)
        self._queue(build)

    def undo(self) -> None:
        self._queue(lambda: self.refinement.step_request("undo"), restart=False)

    def redo(self) -> None:
        self._queue(lambda: self.refinement.step_request("redo"), restart=False)

    # ------------------------------------------------------------------------------------------ the queue

    def _queue(self, build: Callable[[], Request | None], restart: bool = True) -> None:
        if self.refinement is None:
            return
        self._pending.append((build, restart))
        self._next()

    def _next(self) -> None:
        if self._in_flight or not self._pending or self.refinement is None:
            self.busy_changed(self.busy)
            return
        build, restart = self._pending.popleft()
        if self.refinement.needs_restart():
            if not restart:  # undo / redo, but no session yet, or the mask was since edited by hand
                self.on_status("Nothing to undo yet." if self.refinement.mirror is None else
                               "The segment was edited outside refinement: its earlier steps cannot be undone here; "
                               "the next point or box starts again from the segment as it is.", True)
                return self._next()
            self._pending.appendleft((build, restart))
            return self._start(use_job=True)
        request = build()
        if request is None:
            return self._next()
        self._dispatch(request, self._applied)

    def _start(self, use_job: bool) -> None:
        request = self.refinement.start_request(self.settings)
        if not use_job:
            request.body.pop("job_id", None)
            request.body.pop("label", None)
            request.body["settings"] = self.settings
        self.on_status("Starting refinement of this segment...", False)

        def failed(message: str) -> None:
            if use_job and "job" in message:  # the job is gone (expired, server restarted): from the slices' settings
                self._in_flight = False
                return self._start(use_job=False)
            self._fail(message)

        self._dispatch(request, self._started, failed)

    def _dispatch(self, request: Request, on_answer, on_error=None) -> None:
        self._in_flight = True
        self.busy_changed(True)
        refinement = self.refinement
        self.send(request, lambda answer: self._answered(refinement, on_answer, answer), on_error or self._fail)

    def _answered(self, refinement, handler, answer: dict) -> None:
        self._in_flight = False
        if refinement is not self.refinement:  # the panel moved to another segment meanwhile: drop it
            return self._next()
        try:
            handler(answer)
        except StaleAnswer as error:
            self._pending.clear()
            self.refinement.mirror = None  # resynchronise from the segment on the next step
            self.on_status(f"Refinement answer ignored: {error}", True)
        self._next()

    def _started(self, info: dict) -> None:
        self.refinement.started(info)

    def _applied(self, answer: dict) -> None:
        slices = self.refinement.apply(answer)
        self.on_applied(slices)
        took = answer.get("timings", {}).get("total_s")
        verb = {"refine": "Refined", "undo": "Undone", "redo": "Redone"}[answer["kind"]]
        self.on_status(f"{verb}: {len(slices)} slice(s) changed" + (f" in {took * 1000:.0f} ms" if took else "") + ".",
                       False)

    def _fail(self, message: str) -> None:
        self._in_flight = False
        self._pending.clear()
        self.on_status(message, True)
        self.busy_changed(False)


def _box_covers(box: dict, index: int, axis: int) -> bool:
    low, high = box["ijk_min"][axis], box["ijk_max"][axis]
    return low - 0.5 <= index <= high + 0.5


class TransportSender:
    """`send` for the panel: each request goes to `target` through the module's courier; its answer (JSON, or the
    error worded for the user) is handed on from `Transport.poll()`, on the main thread, where MRML may be used.
    `close()` cancels what is in flight and drops its answers (the segment is no longer being refined)."""

    def __init__(self, transport, target, timeout: float = REQUEST_TIMEOUT_SECONDS):
        self.transport = transport
        self.target = target
        self.timeout = timeout
        self._calls: dict[int, object] = {}
        self.closed = False

    def __call__(self, request: Request, on_answer, on_error) -> None:
        def answered(call) -> None:
            self._calls.pop(call.number, None)
            if self.closed or call.state == "cancelled":
                return
            if call.error is not None:
                return on_error(str(call.error))
            try:
                answer = call.json()
            except BackendError as error:
                return on_error(str(error))
            on_answer(answer)

        if self.closed:
            return on_error("refinement of this segment was stopped")
        call = self.transport.request(self.target, request.method, request.path, json_body=request.body,
                                      timeout=self.timeout, on_done=answered)
        if not call.done:
            self._calls[call.number] = call

    @property
    def busy(self) -> bool:
        return bool(self._calls)

    def close(self) -> None:
        self.closed = True
        for call in list(self._calls.values()):
            call.cancel()
        self._calls.clear()
