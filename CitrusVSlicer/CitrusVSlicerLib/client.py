"""The backend's protocol on the module's side: what an upload says about a volume, and the result rebuilt for the scene.

No I/O here (transport.py moves the bytes, runner.py sequences the requests): numpy and the standard library only.
The volume travels as raw little-endian voxels (`application/octet-stream`) with its geometry in the
`X-CitrusV-Volume` header; results come back as each segment's own compressed crop on the uploaded grid (segments may
overlap); a target that was not found comes back without a mask (`"found": false`, `"reason"`) and becomes a
`MissingTarget`.
"""
from __future__ import annotations

import base64
import json
import zlib

import numpy as np

from .endpoints import BackendError
from .results import MissingTarget, SceneResult, SegmentMask

SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")
VOLUME_HEADER = "X-CitrusV-Volume"
INFLATE_STEP = 8 * 1024 * 1024


def guess_modality(voxels: np.ndarray) -> str:
    """CT in Hounsfield units has air near -1000 and integer voxels; anything else is treated as MR."""
    if np.issubdtype(voxels.dtype, np.integer) and voxels.size and int(voxels.min()) <= -500:
        return "CT"
    return "MR"


def uploadable(voxels: np.ndarray) -> np.ndarray:
    """The array as the backend accepts it (one of its dtypes; anything else as float32)."""
    if voxels.ndim != 3:
        raise BackendError(f"the volume must be 3D, got shape {voxels.shape}")
    return voxels if voxels.dtype.name in SUPPORTED_DTYPES else voxels.astype(np.float32)


def upload_headers(voxels: np.ndarray, ijk_to_ras, name: str, modality: str | None = None,
                   handover: str | None = None, dicom: dict | None = None) -> dict:
    """Headers of POST /v1/volumes for the raw form (the body, or the handover file, holds the voxel bytes). `dicom`:
    the source series (dicom_export.dicom_reference), whose modality wins; the reference itself follows the upload
    (PUT /v1/volumes/{id}/dicom: a header would be too small for one SOP instance UID per slice)."""
    modality = modality or (dicom or {}).get("modality") or guess_modality(voxels)
    description = {"dtype": voxels.dtype.name, "shape": [int(n) for n in voxels.shape],
                   "ijk_to_ras": np.asarray(ijk_to_ras, float).tolist(), "name": (name or "volume")[:200],
                   "modality": "PET" if modality == "PT" else modality}
    if handover:
        description["handover"] = handover
    # ensure_ascii: a header is Latin-1 on the wire; non-ASCII names travel as \\u escapes.
    return {"Content-Type": "application/octet-stream", VOLUME_HEADER: json.dumps(description, ensure_ascii=True)}


class ResultDecoder:
    """The service's result JSON -> `SceneResult`, a bounded amount of inflating per `step()` (main-thread friendly)."""

    def __init__(self, payload: dict, shape_kji):
        # A result without masks (an answer-only conversation turn) may carry no labelmap: nothing to check then.
        expected = list((payload.get("labelmap") or {}).get("shape", shape_kji))
        if list(shape_kji) != expected:
            raise BackendError(f"the result is for a volume of shape {expected}, not {list(shape_kji)}")
        self.payload = payload
        self._pending = [s for s in payload.get("segments", []) if s.get("mask") and s.get("found", True) is not False]
        self._missing = [missing_target(s) for s in payload.get("segments", []) if s not in self._pending]
        self._segments: list[SegmentMask] = []
        self._inflater = None
        self._parts: list[bytes] = []

    def step(self) -> SceneResult | None:
        """Inflate up to INFLATE_STEP bytes of mask; the SceneResult once everything is decoded."""
        if self._pending:
            segment = self._pending[0]
            mask = segment["mask"]
            if self._inflater is None:
                self._inflater = zlib.decompressobj()
                self._tail = base64.b64decode(mask["data"])
                self._parts = []
            self._parts.append(self._inflater.decompress(self._tail, INFLATE_STEP))
            self._tail = self._inflater.unconsumed_tail
            if self._tail:
                return None  # more next step
            self._parts.append(self._inflater.flush())
            if not self._inflater.eof:
                raise BackendError(f"the mask of segment {segment.get('name')!r} is truncated")
            crop = np.frombuffer(b"".join(self._parts), np.uint8).reshape(mask["shape"]) > 0
            self._segments.append(SegmentMask(
                label=int(segment["label"]), name=segment["name"], color=tuple(c / 255.0 for c in segment["color"]),
                offset_kji=tuple(mask["offset"]), crop=crop, measurements=segment.get("measurements", {}),
                laterality=segment.get("laterality"), key_slice=segment.get("key_slice"),
                answer=segment.get("answer") or "", score=segment_score(segment)))
            self._pending.pop(0)
            self._inflater, self._parts = None, []
            if self._pending:
                return None
        return self._result()

    def _result(self) -> SceneResult:
        payload = self.payload
        report = payload.get("report") or {}
        answer = (payload.get("answer") or {}).get("text", "")
        return SceneResult(task=payload.get("task", ""), prompt=payload.get("prompt", ""), segments=self._segments,
                           missing=self._missing,
                           findings=payload.get("findings", []), boxes=payload.get("boxes", []),
                           report_findings=report.get("findings", "") or "",
                           report_impression=report.get("impression", "") or "",
                           answer=answer or "", problems=payload.get("problems", []),
                           random_weights=bool(payload.get("random_weights")), dicom=payload.get("dicom"),
                           experimental=payload.get("experimental") or "",
                           axis=_slice_axis(payload.get("settings") or {}))


def segment_score(segment: dict) -> float | None:
    """The contract's `score`; older backends call it `key_score`."""
    score = segment.get("score", segment.get("key_score"))
    return None if score is None else float(score)


def missing_target(segment: dict) -> MissingTarget:
    """A segment entry without a mask: the target was not found (the backend says why)."""
    reason = segment.get("reason") or ("not found" if segment.get("found") is False
                                       else "the backend sent no voxels for it")
    return MissingTarget(name=segment.get("name", "?"), reason=reason, answer=segment.get("answer") or "",
                         key_slice=segment.get("key_slice"), score=segment_score(segment))


def scene_result_from_payload(payload: dict, shape_kji) -> SceneResult:
    """All at once (scripts, tests): the same decoding as the incremental one."""
    decoder = ResultDecoder(payload, shape_kji)
    while (result := decoder.step()) is None:
        pass
    return result


def _slice_axis(settings: dict) -> str:
    """The axis the run's key slices are counted along (`plane` is what backends before the one-vocabulary change sent)."""
    return settings.get("axis") or settings.get("plane") or "axial"
