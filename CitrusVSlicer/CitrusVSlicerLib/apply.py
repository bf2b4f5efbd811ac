"""One Apply against the scene: the nodes it writes to are fixed when it starts, and it ends with the scene.

The input volume, the output segmentation and table and the "replace" choice are captured when Apply is pressed:
selecting another volume while the job runs does not change where (and with which geometry) the result is written.
Closing the scene cancels the job (the backend stops it) and nothing is written into the next scene. A captured
output node deleted meanwhile is replaced by a new one; a deleted input volume ends the Apply with a message.
MRML only (no Qt): tested with the slicer-core wheel.
"""
from __future__ import annotations

from .refinement.segment import tag_segments
from .runner import ApplyRunner, Event
from .scene_job import SceneJob
from .upload import UploadCache, VolumeUpload
from .writers import volume_array_and_geometry, write_result


class SceneApply(SceneJob):
    """Drives an ApplyRunner and writes its result into the scene with the nodes captured at the start."""

    def __init__(self, scene, transport, target, volume_node, task: str, prompt: str, options: dict | None = None,
                 segmentation_node=None, table_node=None, replace_existing: bool = False,
                 uploads: UploadCache | None = None, dicom_reference: dict | None = None):
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.table_node = table_node
        self.replace_existing = replace_existing
        voxels, ijk_to_ras = volume_array_and_geometry(volume_node)
        image = volume_node.GetImageData()
        mtime = image.GetMTime()
        uploads = uploads or UploadCache()
        key = UploadCache.key(target, volume_node, ijk_to_ras, dicom_reference is not None)
        upload = VolumeUpload(transport, target, voxels, ijk_to_ras, volume_node.GetName(), dicom_reference,
                              source_changed=lambda: image.GetMTime() != mtime)
        runner = ApplyRunner(upload, task, prompt, options, volume_id=uploads.get(key))
        runner.on_uploaded = lambda volume_id: uploads.remember(key, volume_id)
        super().__init__(scene, runner)

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
