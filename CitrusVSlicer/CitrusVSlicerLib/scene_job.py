"""A backend job tied to the scene it writes into: the part Apply (apply.py) and a conversation's question
(conversation_scene.py) share.

`SceneJob` drives a runner (runner.py: upload, submit, follow, decode) from the panel's timer and hands its events
on; the finished result goes through the subclass's `_write`, which writes it into the nodes captured when the job
started. Closing the scene cancels the job (the backend stops it) and nothing is written into the next scene.
MRML only through the scene's observer (no Qt): tested with the slicer-core wheel.
"""
from __future__ import annotations

from .runner import Event


class SceneJob:
    def __init__(self, scene, runner):
        self.scene = scene
        self.runner = runner
        self._events: list[Event] = []
        self._observer = scene.AddObserver(scene.StartCloseEvent, self._on_scene_closing)
        self.closed_scene = False

    @property
    def active(self) -> bool:
        return self.runner.active

    @property
    def state(self) -> str:
        return self.runner.state

    def start(self) -> None:
        self.runner.start()

    def cancel(self) -> None:
        self.runner.cancel()

    def poll(self) -> float:
        delay = self.runner.poll()
        for event in self.runner.events():
            if event.kind == "done":
                event = self._write(event)
            self._events.append(event)
        if not self.runner.active:
            self._stop_observing()
        return delay

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _write(self, event: Event) -> Event:
        """Write a finished job's result into the scene; the event the panel gets (done, or an error saying why
        nothing was written)."""
        raise NotImplementedError

    def _on_scene_closing(self, caller=None, event=None) -> None:
        self.closed_scene = True
        if self.runner.active:
            self.runner.cancel()
            self.runner.poll()  # the cancel request leaves now
        self._stop_observing()

    def _stop_observing(self) -> None:
        if self._observer is not None:
            self.scene.RemoveObserver(self._observer)
            self._observer = None
