"""DICOM export of the segments a client holds (`POST /v1/volumes/{id}/dicom-export`): after refinement or
manual editing the SEG and SR describe the segments as they are in the client's scene.

The posted masks become segments measured by the pipeline's own code (`measure_into`) and written by the same
SEG/SR code as `citrusv segment` (`volume/outputs/dicom_out`); the job they came from (if still kept) names the prompt,
the answers, the key slices and whether the weights were random. The objects are kept for a while in an
`ExportStore` and fetched by `GET /v1/exports/{export_id}/{seg|sr}`.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from typing import Annotated

import numpy as np
from pydantic import Field

from ..errors import InputError
from ..refine.server_schemas import MaskCrop
from ..refine.server_service import mask_from_crop
from ..volume.input.io import Volume
from ..volume.outputs.dicom_out import check_dicom_possible, dataset_bytes, describe_objects, dicom_objects
from ..volume.slices.orientation import model_orientation
from ..volume.tasks.results import Segment, VolumeResult, measure_into, segment_finding
from .errors import ApiError
from .jobs import DONE
from .schemas import Strict

MAX_EXPORT_SEGMENTS = 254
Byte = Annotated[int, Field(ge=0, le=255)]


class ExportSegment(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    label: Annotated[int, Field(ge=1, le=255)]
    color: tuple[Byte, Byte, Byte] | None = None
    mask: MaskCrop | None = Field(None, description="the segment's voxels as a crop; null: the segment is empty")


class ExportRequest(Strict):
    segments: list[ExportSegment] = Field(max_length=MAX_EXPORT_SEGMENTS)
    job_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    edited: bool = False


class ExportStore:
    """The latest exports' DICOM bytes by export id: at most `capacity`, each for `ttl_s`."""

    def __init__(self, ttl_s: float, capacity: int = 32, clock=time.monotonic):
        self.ttl_s, self.capacity, self.clock = ttl_s, capacity, clock
        self._exports: OrderedDict[str, tuple[float, dict[str, bytes]]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, objects: dict[str, bytes]) -> str:
        export_id = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._exports[export_id] = (self.clock(), objects)
            while len(self._exports) > self.capacity:
                self._exports.popitem(last=False)
        return export_id

    def get(self, export_id: str, name: str) -> bytes:
        with self._lock:
            self._expire()
            entry = self._exports.get(export_id)
        if entry is None:
            raise ApiError(404, f"no export {export_id!r} (exports are kept {self.ttl_s:g} s, the latest "
                                f"{self.capacity}); export again", type="not_found")
        data = entry[1].get(name)
        if data is None:
            raise ApiError(404, f"export {export_id} has no {name!r}; it has {', '.join(sorted(entry[1]))}",
                           type="not_found")
        return data

    def _expire(self) -> None:  # with the lock held
        now = self.clock()
        while self._exports and now - next(iter(self._exports.values()))[0] > self.ttl_s:
            self._exports.popitem(last=False)


def job_context(state, volume_id: str, job_id: str | None) -> tuple[dict | None, list[str]]:
    """The finished segmentation job the segments came from (its result JSON) and notes when it is not at hand."""
    if job_id is None:
        return None, []
    try:
        job = state.jobs.get(job_id)
    except ApiError as missing:
        return None, [f"{missing.message}: the export cannot name the prompt and answers the segments came from"]
    if job.volume_id != volume_id:
        raise ApiError(409, f"job {job_id} segmented volume {job.volume_id}, not {volume_id}", type="wrong_volume")
    if job.status != DONE or job.task != "segment":
        return None, [f"job {job_id} is a {job.status} {job.task} job, not a finished segmentation: the export "
                      f"cannot name the prompt and answers the segments came from"]
    return json.loads(job.result), []


def export_result(volume: Volume, request: ExportRequest, job: dict | None, random_weights: bool) -> VolumeResult:
    """The posted segments as a result: each mask measured as the pipeline measures it, the job's texts kept."""
    if not request.segments:
        raise InputError("nothing to export: send at least one segment")
    labels = [s.label for s in request.segments]
    if len(set(labels)) != len(labels):
        raise InputError(f"segment labels must be distinct, got {labels}")
    axis = ((job or {}).get("settings") or {}).get("axis", "axial")
    slice_axis = model_orientation(volume.geometry.direction, axis).slice_axis
    from_job = {s["label"]: s for s in (job or {}).get("segments", [])}
    result = VolumeResult(task="segment", prompt=(job or {}).get("prompt", ""), case=volume.name,
                          labels=np.zeros(volume.shape, np.uint8),
                          random_weights=bool((job or {}).get("random_weights", random_weights)),
                          settings={"edited": request.edited})
    for posted in request.segments:
        mask = mask_from_crop(posted.mask, volume.shape) if posted.mask is not None else np.zeros(volume.shape, bool)
        origin = from_job.get(posted.label)
        origin = origin if origin is not None and origin.get("name") == posted.name else {}
        segment = Segment(label=posted.label, name=posted.name, query=origin.get("query", posted.name), mask=mask,
                          key_slice=origin.get("key_slice"), key_score=float(origin.get("key_score") or 0.0),
                          color=tuple(posted.color) if posted.color is not None else None,
                          reason="" if mask.any() else "the exported segment is empty")
        for key in ("answer", "answer_source", "answer_note"):
            if origin.get(key):
                setattr(segment, key, origin[key])
        measure_into(segment, volume, slice_axis)
        result.segments.append(segment)
    if not any(s.found for s in result.segments):
        raise InputError("nothing to export: every segment is empty")
    result.findings = [segment_finding(s) for s in result.segments]
    return result


def run_export(state, volume_id: str, volume: Volume, request: ExportRequest, model: str) -> dict:
    """Builds the SEG and SR, keeps them in `state.exports`; the response body."""
    if volume.dicom is None:
        raise ApiError(409, "the volume has no DICOM reference: a DICOM SEG and SR must point at the series they "
                            f"describe; attach it with PUT /v1/volumes/{volume_id}/dicom (load the volume from "
                            "Slicer's DICOM database)", type="no_dicom_reference")
    check_dicom_possible(volume)
    job, notes = job_context(state, volume_id, request.job_id)
    with state.volumes.reserve(len(request.segments) * int(np.prod(volume.shape))):  # the decoded masks
        result = export_result(volume, request, job, state.engine.loaded.random_weights)
        objects = dicom_objects(result, volume, model)
    export_id = state.exports.add({"seg": dataset_bytes(objects.seg), "sr": dataset_bytes(objects.sr)})
    return describe_objects(objects) | {
        "export_id": export_id,
        "files": {"seg": f"/v1/exports/{export_id}/seg", "sr": f"/v1/exports/{export_id}/sr"},
        "segments": [{"name": s.name, "label": s.label, "found": s.found,
                      "segment_number": objects.segment_numbers.get(s.label),
                      "voxel_count": s.measurements.get("voxel_count"), "volume_ml": s.measurements.get("volume_ml"),
                      "long_axis_mm": s.measurements.get("long_axis_mm"),
                      "short_axis_mm": s.measurements.get("short_axis_mm"),
                      "mean_intensity": s.measurements.get("intensity_mean"), "laterality": s.laterality,
                      "reason": s.reason or None} for s in result.segments],
        "edited": request.edited, "job_id": request.job_id if job is not None else None, "problems": notes}
