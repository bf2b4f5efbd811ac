"""One Apply against the scene: the nodes it writes to are fixed when it starts, and it ends with the scene.

The input volume, the output segmentation and table and the "replace" choice are captured when Apply is pressed:
selecting another volume while the job runs does not change where (and with which geometry) the result is written.
Closing the scene cancels the job (the backend stops it) and nothing is written into the next scene. A captured
output node deleted meanwhile is replaced by a new one; a deleted input volume ends the Apply with a message.
MRML only (no Qt): tested with the slicer-core wheel.
"""
from __future__ import annotations

from .refine import tag_segments
from .runner import ApplyRunner, Event
from .writers import volume_array_and_geometry, write_result


class UploadCache:
    """Volume ids per (backend, volume node, its voxels' modification time, its geometry): one upload per content."""

    def __init__(self):
        self._ids: dict[tuple, str] = {}

    @staticmethod
    def key(target, volume_node, ijk_to_ras, with_dicom: bool = False) -> tuple:
        return (target.url, volume_node.GetID(), volume_node.GetImageData().GetMTime(), ijk_to_ras.tobytes(), with_dicom)

    def get(self, key: tuple) -> str | None:
        return self._ids.get(key)

    def remember(self, key: tuple, volume_id: str) -> None:
        self._ids[key] = volume_id

    def find(self, target, volume_node, ijk_to_ras) -> str | None:
        """An upload of this content with or without its DICOM reference (either serves refinement)."""
        for with_dicom in (True, False):
            known = self.get(self.key(target, volume_node, ijk_to_ras, with_dicom))
            if known is not None:
                return known
        return None

    def forget(self, volume_node) -> None:
        """The backend lost this node's uploads (evicted, restarted): the next use sends the volume again."""
        for key in [k for k in self._ids if k[1] == volume_node.GetID()]:
            del self._ids[key]


class SceneApply:
    """Drives an ApplyRunner and writes its result into the scene with the nodes captured at the start."""

    def __init__(self, scene, transport, target, volume_node, task: str, prompt: str, options: dict | None = None,
                 segmentation_node=None, table_node=None, replace_existing: bool = False,
                 uploads: UploadCache | None = None, dicom_reference: dict | None = None):
        self.scene = scene
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.table_node = table_node
        self.replace_existing = replace_existing
        voxels, ijk_to_ras = volume_array_and_geometry(volume_node)
        image = volume_node.GetImageData()
        mtime = image.GetMTime()
        uploads = uploads or UploadCache()
        key = UploadCache.key(target, volume_node, ijk_to_ras, dicom_reference is not None)
        self.runner = ApplyRunner(transport, target, voxels, ijk_to_ras, volume_node.GetName(), task, prompt, options,
                                  volume_id=uploads.get(key), source_changed=lambda: image.GetMTime() != mtime,
                                  dicom_reference=dicom_reference)
        self.runner.on_uploaded = lambda volume_id: uploads.remember(key, volume_id)
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
        if self.closed_scene or not self.scene.IsNodePresent(self.volume_node):
            return Event("error", message="the input volume was removed from the scene before the result arrived; "
                                          "nothing was written")
        segmentation = self.segmentation_node if self._present(self.segmentation_node) else None
        table = self.table_node if self._present(self.table_node) else None
        written = write_result(self.scene, self.volume_node, event.result, segmentation, table, self.replace_existing)
        if written["segmentation"] is not None:  # each segment remembers its job: refinement starts from its slices
            tag_segments(written["segmentation"], written["segment_ids"], [s.label for s in event.result.segments],
                         self.runner.job_id)
        return Event("done", result=event.result, written=written)

    def _present(self, node) -> bool:
        return node is not None and bool(self.scene.IsNodePresent(node))

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
