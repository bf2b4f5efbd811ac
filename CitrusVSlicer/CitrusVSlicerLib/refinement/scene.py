"""Refining one segment from the panel: the volume on the backend, the segment's markups, the controller.

`SceneRefinement.start()` finds the volume's upload (the one Apply made for this backend and this content, with or
without its DICOM reference) or sends it now through the module's one upload path (upload.py: raw bytes, handed
over by file to the local backend); then the segment's include / exclude point lists and box (kept with the
segmentation, segment.prompt_nodes) are wired to a `RefineController` whose requests go through the HTTP courier
(`TransportSender`). `poll()` from the panel's timer writes the upload's next block; answers arrive from
`Transport.poll()`, on the main thread. Closing the scene stops it (nothing is written into the next scene).
MRML only (no Qt): tested with the slicer-core wheel against the real backend.
"""
from __future__ import annotations

from ..upload import ANSWER_WAIT_SECONDS, UploadCache, VolumeUpload
from ..writers import volume_array_and_geometry
from .controller import RefineController, TransportSender
from .segment import SegmentRefinement, prompt_nodes


class SceneRefinement:
    """`state`: idle / uploading / ready (placements refine the segment) / failed / stopped."""

    def __init__(self, scene, transport, target, uploads: UploadCache, volume_node, segmentation_node,
                 segment_id: str, settings: dict | None = None, options: dict | None = None,
                 on_status=lambda text, error: None):
        self.scene = scene
        self.transport = transport
        self.target = target
        self.uploads = uploads
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.on_status = on_status
        self.include, self.exclude, self.box = prompt_nodes(scene, segmentation_node, segment_id)
        self.sender = TransportSender(transport, target)
        self.controller = RefineController(self.sender, self._status, settings=settings, options=options)
        self.state = "idle"
        self._upload: VolumeUpload | None = None
        self._observer = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: self.stop())

    # ------------------------------------------------------------------------------------------ interface

    @property
    def refinement(self) -> SegmentRefinement | None:
        return self.controller.refinement

    @property
    def can_undo(self) -> bool:
        return self.refinement is not None and self.refinement.can_undo

    @property
    def can_redo(self) -> bool:
        return self.refinement is not None and self.refinement.can_redo

    @property
    def busy(self) -> bool:
        return self.state == "uploading" or self.controller.busy or self.sender.busy

    def start(self) -> None:
        voxels, ijk_to_ras = volume_array_and_geometry(self.volume_node)
        known = self.uploads.find(self.target, self.volume_node, ijk_to_ras)
        if known is not None:
            return self._attach(known)
        key = UploadCache.key(self.target, self.volume_node, ijk_to_ras)
        image = self.volume_node.GetImageData()
        mtime = image.GetMTime()
        self._upload = VolumeUpload(self.transport, self.target, voxels, ijk_to_ras, self.volume_node.GetName(),
                                    source_changed=lambda: image.GetMTime() != mtime)

        def uploaded(volume_id, error) -> None:
            if self.state != "uploading":
                return
            if error is not None:
                self.state = "failed"
                return self.on_status(error, True)
            self.uploads.remember(key, volume_id)
            self._attach(volume_id)

        self._upload.on_done = uploaded
        self.state = "uploading"
        self.on_status("Sending the volume to the backend for refinement...", False)
        self._upload.start()

    def poll(self) -> float:
        """Seconds until the next call is useful (0 while the upload writes its file)."""
        if self.state == "uploading":
            return self._upload.poll()
        return ANSWER_WAIT_SECONDS if self.sender.busy else 1.0

    def undo(self) -> None:
        self.controller.undo()

    def redo(self) -> None:
        self.controller.redo()

    def clear_prompts(self) -> None:
        """Remove the placed points and box (the segment stays as it is: Undo takes steps back)."""
        for node in (self.include, self.exclude, self.box):
            node.RemoveAllControlPoints()

    def stop(self) -> None:
        """Stop listening to the markups and drop whatever is still on its way (an upload, a step's answer)."""
        if self._upload is not None:
            self._upload.cancel()
        self.sender.close()
        self.controller.detach()
        if self.state != "failed":
            self.state = "stopped"
        if self._observer is not None:
            self.scene.RemoveObserver(self._observer)
            self._observer = None

    # ------------------------------------------------------------------------------------------ inside

    def _attach(self, volume_id: str) -> None:
        refinement = SegmentRefinement(volume_id, self.segmentation_node, self.segment_id, self.volume_node)
        self.controller.attach(refinement, self.include, self.exclude, self.box)
        self.state = "ready"
        self.on_status("Place include / exclude points or a box on any slice view.", False)

    def _status(self, text: str, error: bool) -> None:
        if error and "upload" in text:  # the backend lost the volume: the next start uploads it again
            self.uploads.forget(self.volume_node)
        self.on_status(text, error)
