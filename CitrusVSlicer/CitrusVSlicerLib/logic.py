"""What the module's panel does, without Qt and without Slicer's application, callable from scripts too.

At most one Apply (apply.py) and one refinement (refinement/scene.py) at a time, both advanced by `poll()` from the
panel's single timer on the main thread, with all HTTP through the session's courier (transport.py). Blocking
variants (`process`, `installBackend`, `waitForBackend`, `pollUntil`) are for scripts and the self-test: they keep
Slicer's events flowing through the `process_events` they are given. The module's CitrusVSlicerLogic adds what
needs Slicer's application (the parameter node, the quit hook, the DICOM database import). Method names follow
Slicer's camelCase for logic classes (scripts call them). Tested headless with real MRML (slicer-core).
"""
from __future__ import annotations

import time

from .apply import SceneApply
from .conversation_scene import SceneConversation
from .dicom_export import dicom_reference
from .endpoints import BackendError
from .installer import explain_failure
from .refinement.segment import slice_settings
from .refinement.scene import SceneRefinement
from .scene_export import SceneDicomExport, source_volume
from .upload import UploadCache
from .geometry import ijk_to_ras_matrix

IDLE_POLL_SECONDS = 0.2


class ModuleLogic:
    """The backend manager of the session, the scene, and what runs against them now."""

    def __init__(self, backend, scene, process_events=lambda: None, dicom_database=lambda: None):
        self.backend = backend              # the session's BackendManager (manager.session_manager)
        self.scene = scene
        self.processEvents = process_events
        self.dicomDatabase = dicom_database  # () -> Slicer's DICOM database, or None
        self._apply = None
        self.refinement = None               # SceneRefinement of the segment being corrected
        self.conversation = None             # SceneConversation: the question being answered
        self.longestPollSeconds = 0.0
        self.dicomExport = None              # SceneDicomExport of the scene's segments, while it runs
        if not hasattr(backend, "uploads"):  # one cache per session: uploads survive a module Reload
            backend.uploads = UploadCache()

    @property
    def applying(self) -> bool:
        return self._apply is not None and self._apply.active

    def startApply(self, target, volumeNode, task: str, prompt: str, options: dict, segmentationNode=None,
                   tableNode=None, replaceExisting: bool = False) -> SceneApply:
        """Upload (once per volume content and backend), submit, follow, write: driven by poll()."""
        if self.applying:
            raise BackendError("an Apply is already running: wait for it or press Cancel")
        # From Slicer's DICOM database: the upload says which series it is, so the backend makes DICOM SEG/SR.
        reference = dicom_reference(volumeNode, ijk_to_ras_matrix(volumeNode), self.dicomDatabase())
        self._apply = SceneApply(self.scene, self.backend.transport, target, volumeNode, task, prompt, options,
                                 segmentationNode, tableNode, replaceExisting, self.backend.uploads, reference)
        self._apply.start()
        return self._apply

    def startRefine(self, target, volumeNode, segmentationNode, segmentId: str, taskOptions: dict,
                    refineOptions: dict, onStatus=None) -> SceneRefinement:
        """Refine one segment: its volume uploaded once (Apply's upload is reused), then every placement in its
        include / exclude point lists and box is one step, sent through the courier and written back by poll()."""
        self.stopRefine()
        self.refinement = SceneRefinement(self.scene, self.backend.transport, target, self.backend.uploads,
                                          volumeNode, segmentationNode, segmentId, slice_settings(taskOptions),
                                          refineOptions, onStatus or (lambda text, error: None))
        self.refinement.start()
        return self.refinement

    def startDicomExport(self, target, volumeNode, segmentationNode, directory, importFolder, onDone) -> SceneDicomExport:
        """Export the segments as they are in the scene (scene_export.py) as DICOM SEG + SR into the DICOM database
        (`importFolder(folder)`); `onDone(done, error)` on the main thread, driven by poll(). The volume is the one
        the segmentation was made on, else `volumeNode`."""
        if self.dicomExport is not None and self.dicomExport.active:
            raise BackendError("a DICOM export is already running")
        volume = source_volume(segmentationNode, volumeNode)
        reference = None
        if volume is not None and volume.GetImageData() is not None:
            reference = dicom_reference(volume, ijk_to_ras_matrix(volume), self.dicomDatabase())
        self.dicomExport = SceneDicomExport(self.backend.transport, target, self.backend.uploads, volume,
                                            segmentationNode, reference, directory, importFolder, onDone)
        self.dicomExport.start()
        return self.dicomExport

    def stopRefine(self) -> None:
        if self.refinement is not None:
            self.refinement.stop()
            self.refinement = None

    @property
    def asking(self) -> bool:
        return self.conversation is not None and self.conversation.active

    def startAsk(self, target, volumeNode, historyNode, question) -> SceneConversation:
        """One question of the conversation `historyNode` (conversation_scene.create_history): the volume uploaded
        once (Apply's upload is reused), the answer's segments and boxes written and the turn recorded by poll()."""
        if self.asking:
            raise BackendError("a question is already being answered: wait for it or press Cancel")
        reference = dicom_reference(volumeNode, ijk_to_ras_matrix(volumeNode), self.dicomDatabase())
        self.conversation = SceneConversation(self.scene, self.backend.transport, target, self.backend.uploads,
                                              volumeNode, historyNode, question, reference)
        self.conversation.start()
        return self.conversation

    def cancelAsk(self) -> None:
        if self.conversation is not None:
            self.conversation.cancel()

    def askEvents(self) -> list:
        return self.conversation.events() if self.conversation is not None else []

    def cancelApply(self) -> None:
        if self._apply is not None:
            self._apply.cancel()

    def applyEvents(self) -> list:
        return self._apply.events() if self._apply is not None else []

    def poll(self) -> float:
        """Advance the backend, the courier, the running Apply and refinement; seconds until the next poll is useful."""
        self.backend.poll()
        delay = IDLE_POLL_SECONDS
        if self._apply is not None:
            delay = min(delay, self._apply.poll())
        if self.refinement is not None:
            delay = min(delay, self.refinement.poll())
        if self.dicomExport is not None and self.dicomExport.active:
            delay = min(delay, self.dicomExport.poll())
        if self.conversation is not None:
            delay = min(delay, self.conversation.poll())
        if self.backend.transport.busy:
            delay = min(delay, 0.01)
        return delay

    def pollUntil(self, done, timeout: float, what: str) -> None:
        """Blocking (scripts, self-test): advance everything, keeping Slicer's events flowing, until `done()`;
        RuntimeError after `timeout` s. `longestPollSeconds`: the longest main-thread step, for the record."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not finish within {timeout:.0f} s")
            tick = time.perf_counter()
            delay = self.poll()
            self.longestPollSeconds = max(self.longestPollSeconds, time.perf_counter() - tick)
            self.processEvents()
            time.sleep(min(delay, 0.05))

    def process(self, volumeNode, task: str, prompt: str, options: dict | None = None, timeout: float = 600.0,
                target=None) -> dict:
        """Blocking run for scripts and the self-test: returns the written nodes."""
        self.startApply(target or self.backend.local_target(), volumeNode, task, prompt, options or {})
        self.longestPollSeconds = 0.0
        ends = []
        try:
            self.pollUntil(lambda: ends.extend(e for e in self.applyEvents() if e.kind != "progress") or ends,
                           timeout, "the Apply")
        except RuntimeError:
            self.cancelApply()
            raise
        if ends[0].kind != "done":
            raise RuntimeError(ends[0].message)
        return ends[0].written

    def ask(self, volumeNode, historyNode, question, timeout: float = 600.0, target=None) -> dict:
        """Blocking question for scripts and the self-test: returns the written nodes and the turn's entry."""
        self.startAsk(target or self.backend.local_target(), volumeNode, historyNode, question)
        ends = []
        try:
            self.pollUntil(lambda: ends.extend(e for e in self.askEvents() if e.kind != "progress") or ends,
                           timeout, "the question")
        except RuntimeError:
            self.cancelAsk()
            raise
        if ends[0].kind != "done":
            raise RuntimeError(ends[0].message)
        return ends[0].written

    def installBackend(self, basePython: str | None = None, timeout: float = 3600.0) -> None:
        """Blocking (scripts, self-test): install the backend environment, printing its log."""
        run = self.backend.start_install(self.backend.install_plan(None, basePython))

        def finished() -> bool:
            for line in self.backend.drain_logs():
                print(line)
            return not run.is_running()

        self.pollUntil(finished, timeout, "the installation")
        if run.returncode != 0:
            raise RuntimeError(explain_failure(run.lines, run.plan))

    def waitForBackend(self, timeout: float = 300.0) -> None:
        """Blocking (scripts, self-test): until the local backend is running."""
        def running() -> bool:
            if self.backend.state in ("crashed", "exited", "stopped"):
                raise RuntimeError("the backend did not start:\n" + "\n".join(list(self.backend.process.lines)[-30:])
                                   if self.backend.process else "the backend was not started")
            return self.backend.state == "running"

        self.pollUntil(running, timeout, "the backend's start")

    def shutdown(self) -> None:
        self.backend.shutdown()
