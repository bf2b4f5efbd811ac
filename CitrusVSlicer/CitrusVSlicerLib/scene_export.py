"""Export to DICOM of what the scene holds: the segments as they are now (refined, edited in the Segment Editor).

The Export button reads every non-empty segment of the output segmentation as a binary crop on the input volume's
voxel grid and sends them to the backend (`POST /v1/volumes/{volume_id}/dicom-export`, the volume uploaded with its
DICOM series reference), which writes the DICOM SEG and the TID 1500 SR with the command line's own writer; the two
objects are downloaded through the courier and imported into Slicer's DICOM database beside the source series.
The SR's measurements are thus computed from, and reference, exactly the SEG's segments as the scene shows them.

Slicer's own DICOM SEG exporter (QuantitativeReporting) is deliberately not used: its SEG would get its own series,
segment numbers and UIDs, and the backend's SR, written for the backend's SEG, would reference segments that are
not in it. One writer for both objects keeps them consistent, with or without that extension.

Nothing is exported silently from anything else. The export refuses, saying why, when the volume was not loaded
from the DICOM database (no series to reference), when a segment does not lie on the volume's voxel grid (another
geometry, another parent transform, a closed-surface source, voxels outside the volume), when no segment has any
voxel, and when the backend has no such endpoint (an older backend). MRML only (no Qt): tested with slicer-core.
"""
from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .dicom_export import DicomExportError, save_objects
from .key_slice import DELIVERED_TAG
from .refinement.segment import JOB_TAG, segment_tag
from .results import mask_digest
from .transport import Fetched, fetch_all
from .upload import ANSWER_WAIT_SECONDS, UploadCache, VolumeUpload
from .geometry import ijk_to_ras_matrix
from .writers import SOURCE_VOLUME_ROLE, volume_array_and_geometry

GRID_TOLERANCE = 1e-3   # of a voxel: a segment's grid must be the volume's, not merely close to it
MAX_SEGMENTS = 254      # the service's limit per export (labels 1..255 in its uint8 crops)
SEGMENT_LABEL_CHARS = 64  # a SEG's Segment Label is a DICOM LO (64 characters); the service takes no more


@dataclass
class SceneSegment:
    """One segment as it is in the scene, on the volume's voxel grid."""

    segment_id: str
    name: str
    color: tuple[int, int, int]            # 0..255
    offset_kji: tuple[int, int, int]
    crop: np.ndarray                       # bool (k, j, i), tight around the voxels
    job_id: str                            # the CitrusV job that made it ("" for a segment drawn by hand)
    delivered: str                         # digest of the mask as delivered ("" when not delivered by CitrusV)

    @property
    def edited(self) -> bool:
        return not self.delivered or self.delivered != mask_digest(self.offset_kji, self.crop)


def source_volume(segmentation_node, fallback=None):
    """The volume a CitrusV segmentation was made on (its reference), else `fallback`."""
    node = segmentation_node.GetNodeReference(SOURCE_VOLUME_ROLE) if segmentation_node is not None else None
    return node if node is not None else fallback


def scene_segments(segmentation_node, volume_node) -> tuple[list[SceneSegment], list[str]]:
    """The segmentation's segments with voxels, on `volume_node`'s grid, and the names of the empty ones.
    DicomExportError when a segment cannot be put on that grid voxel for voxel."""
    segmentation = segmentation_node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    source = (segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName")
              else segmentation.GetMasterRepresentationName())
    if source != labelmap:
        raise DicomExportError(f"the segmentation {segmentation_node.GetName()!r} is stored as {source.lower()}, not as "
                               f"voxels on the volume's grid: make binary labelmap its source representation "
                               f"(Segmentations module) and export again; nothing was exported")
    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        raise DicomExportError(f"the segmentation {segmentation_node.GetName()!r} and the volume "
                               f"{volume_node.GetName()!r} are under different transforms: the segments do not lie on "
                               f"the series' voxels; nothing was exported")
    ras_to_ijk = np.linalg.inv(ijk_to_ras_matrix(volume_node))
    shape = volume_node.GetImageData().GetDimensions()[::-1]
    segments, empty = [], []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        name = segment.GetName()
        image = slicer.vtkOrientedImageData()
        segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
        extent = image.GetExtent()
        scalars = image.GetPointData().GetScalars()
        if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4] or scalars is None:
            empty.append(name)
            continue
        voxels = numpy_support.vtk_to_numpy(scalars).reshape(
            extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1) > 0
        found = np.argwhere(voxels)
        if not len(found):
            empty.append(name)
            continue
        shift = _grid_shift(image, ras_to_ijk, name, volume_node.GetName())
        low, high = found.min(axis=0), found.max(axis=0) + 1
        offset = np.array(extent[4::-2]) + shift[::-1] + low           # (k, j, i) on the volume's grid
        if (offset < 0).any() or (offset + (high - low) > shape).any():
            raise DicomExportError(f"segment {name!r} has voxels outside the volume {volume_node.GetName()!r}: a DICOM "
                                   f"SEG on its series cannot hold them; erase them (or crop the segment) and export "
                                   f"again; nothing was exported")
        crop = np.ascontiguousarray(voxels[low[0]:high[0], low[1]:high[1], low[2]:high[2]])
        color = tuple(int(round(255 * c)) for c in segment.GetColor())
        segments.append(SceneSegment(segment_id, name, color, tuple(int(v) for v in offset), crop,
                                     segment_tag(segment, JOB_TAG), segment_tag(segment, DELIVERED_TAG)))
    return segments, empty


def _grid_shift(image, ras_to_ijk: np.ndarray, name: str, volume_name: str) -> np.ndarray:
    """The whole-voxel (i, j, k) shift from the labelmap's indices to the volume's; DicomExportError when the
    labelmap's grid is not the volume's (rotated, resampled, shifted by part of a voxel)."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    image_to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    image_to_volume = ras_to_ijk @ image_to_world
    shift = image_to_volume[:3, 3]
    if np.abs(image_to_volume[:3, :3] - np.eye(3)).max() > GRID_TOLERANCE or \
            np.abs(shift - np.round(shift)).max() > GRID_TOLERANCE:
        raise DicomExportError(f"segment {name!r} is not on the voxel grid of {volume_name!r} (its segmentation's "
                               f"geometry differs, e.g. oversampled or rotated): set the segmentation's geometry to "
                               f"the volume (Segment Editor: Specify geometry) and export again; nothing was exported")
    return np.round(shift).astype(int)


def encode_mask(offset_kji, crop: np.ndarray, label: int) -> dict:
    """A crop in the service's encoding: voxels hold `label` or 0."""
    values = np.ascontiguousarray(crop, dtype=np.uint8) * np.uint8(label)
    return {"offset": [int(v) for v in offset_kji], "shape": [int(v) for v in crop.shape], "dtype": "uint8",
            "encoding": "zlib+base64", "data": base64.b64encode(zlib.compress(values.tobytes(), 6)).decode("ascii")}


def export_body(segments: list[SceneSegment]) -> dict:
    """The request body of POST /v1/volumes/{id}/dicom-export: labels 1..n in the segmentation's order, names cut to
    a Segment Label's 64 characters; the job the segments came from when they all came from one (its model and
    prompt go into the SR); edited when any segment differs from what the model delivered (refined, edited by hand,
    or drawn)."""
    if len(segments) > MAX_SEGMENTS:
        raise DicomExportError(f"{len(segments)} segments: one export holds at most {MAX_SEGMENTS}; nothing was exported")
    jobs = {s.job_id for s in segments if s.job_id}
    return {"segments": [{"name": s.name[:SEGMENT_LABEL_CHARS], "label": label, "color": list(s.color),
                          "mask": encode_mask(s.offset_kji, s.crop, label)}
                         for label, s in enumerate(segments, start=1)],
            "job_id": jobs.pop() if len(jobs) == 1 else None,
            "edited": any(s.edited for s in segments)}


class SceneDicomExport:
    """One export, driven by `poll()` from the panel's timer: upload the volume with its DICOM reference unless the
    backend has it, POST the segments, download SEG and SR, import them. `on_done(done, error)` once, on the main
    thread: done = {"files", "segments" (the backend's per-segment numbers), "edited", "empty" (skipped names),
    "problems" (the backend's notes, e.g. that the job the segments came from is no longer kept)}."""

    def __init__(self, transport, target, uploads: UploadCache, volume_node, segmentation_node, reference: dict | None,
                 directory: Path, import_folder, on_done):
        self.transport, self.target, self.uploads = transport, target, uploads
        self.volume_node, self.segmentation_node = volume_node, segmentation_node
        self.reference = reference
        self.directory = Path(directory)
        self.import_folder = import_folder
        self.on_done = on_done
        self.state = "idle"       # idle / uploading / exporting / downloading / done / failed
        self.body: dict | None = None
        self.answer: dict = {}    # the backend's answer to the export
        self.empty: list[str] = []
        self._upload: VolumeUpload | None = None
        self._reused = False

    @property
    def active(self) -> bool:
        return self.state in ("uploading", "exporting", "downloading")

    def start(self) -> None:
        try:
            if self.segmentation_node is None or self.volume_node is None:
                raise DicomExportError("choose the output segmentation and its input volume; nothing was exported")
            if self.reference is None:
                raise DicomExportError(f"the volume {self.volume_node.GetName()!r} was not loaded from Slicer's DICOM "
                                       f"database (or no longer matches its series slice for slice): a DICOM SEG "
                                       f"needs the series it describes; nothing was exported")
            segments, self.empty = scene_segments(self.segmentation_node, self.volume_node)
            if not segments:
                raise DicomExportError(f"the segmentation {self.segmentation_node.GetName()!r} has no segment with "
                                       f"voxels; nothing was exported")
            self.body = export_body(segments)
        except DicomExportError as error:
            return self._end(None, error)
        voxels, ijk_to_ras = volume_array_and_geometry(self.volume_node)
        self._key = UploadCache.key(self.target, self.volume_node, ijk_to_ras, True)
        volume_id = self.uploads.get(self._key)
        if volume_id is not None:
            self._reused = True
            return self._export(volume_id)
        self._begin_upload(voxels, ijk_to_ras)

    def poll(self) -> float:
        if self.state == "uploading" and self._upload is not None:
            return self._upload.poll()
        return ANSWER_WAIT_SECONDS if self.active else 1.0

    # ------------------------------------------------------------------------------------------ steps

    def _begin_upload(self, voxels, ijk_to_ras) -> None:
        self.state = "uploading"
        self._upload = VolumeUpload(self.transport, self.target, voxels, ijk_to_ras, self.volume_node.GetName(),
                                    self.reference)
        self._upload.on_done = self._uploaded
        self._upload.start()

    def _uploaded(self, volume_id: str | None, error: str | None) -> None:
        if error is not None:
            return self._end(None, DicomExportError(f"the volume could not be sent to the backend: {error}"))
        self.uploads.remember(self._key, volume_id)
        self._export(volume_id)

    def _export(self, volume_id: str) -> None:
        self.state = "exporting"
        self.transport.request(self.target, "POST", f"/v1/volumes/{volume_id}/dicom-export", json_body=self.body,
                               timeout=300, on_done=self._exported)

    def _exported(self, call) -> None:
        if call.ok:
            answer = call.json()
            self.answer = answer
            files = answer.get("files") or {}
            self.state = "downloading"
            fetch_all(self.transport, self.target, [files[n] for n in ("seg", "sr") if n in files],
                      lambda bodies, error: self._downloaded(files, bodies, error))
            return
        message = str(call.error)
        if call.status == 405 or (call.status == 404 and "no such endpoint" in message):
            return self._end(None, DicomExportError(
                f"the backend at {self.target.url} cannot export edited segments (it has no POST "
                f"/v1/volumes/{{id}}/dicom-export: update the backend); nothing was exported"))
        if call.status == 404 and self._reused:  # the backend lost the upload (evicted, restarted): send it again
            self._reused = False
            self.uploads.forget(self.volume_node)
            voxels, ijk_to_ras = volume_array_and_geometry(self.volume_node)
            return self._begin_upload(voxels, ijk_to_ras)
        self._end(None, DicomExportError(f"the backend refused the export: {message}; nothing was exported"))

    def _downloaded(self, files: dict, bodies, error) -> None:
        if error is not None:
            return self._end(None, DicomExportError(f"the exported DICOM objects could not be downloaded: {error}"))
        try:
            written = save_objects(Fetched(bodies), files, self.directory)
            self.import_folder(str(self.directory))
        except Exception as failure:  # shown in the panel (a full disk, the database refusing the files)
            return self._end(None, failure if isinstance(failure, DicomExportError) else
                             DicomExportError(f"the DICOM objects could not be saved or imported: {failure}"))
        self._end({"files": written, "segments": self.answer.get("segments", []), "edited": self.body["edited"],
                   "empty": list(self.empty), "problems": list(self.answer.get("problems") or [])}, None)

    def _end(self, done, error) -> None:
        self.state = "failed" if error is not None else "done"
        self.on_done(done, error)


def export_summary(done: dict) -> str:
    """The panel's status after an export."""
    names = ", ".join(s.get("name", "?") for s in done["segments"])
    text = (f"Exported {len(done['files'])} DICOM file(s) into the DICOM database: the segments as they are in the "
            f"scene ({names})" + (", edited since the model delivered them" if done["edited"] else "") + ".")
    if done["empty"]:
        text += " Empty segments left out: " + ", ".join(done["empty"]) + "."
    if done.get("problems"):
        text += " Note: " + "; ".join(done["problems"]) + "."
    return text
