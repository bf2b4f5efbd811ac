"""Refinement in the service: starting a session from a segmentation job or a client's mask, the worker's
runner for a click, and the JSON of a step.

A click runs on the one GPU worker (the model is used from that thread only) as an urgent job: ahead of queued
volume jobs. Each step answers with the volume id, the segment, the session's version and the changed box, so a
client can check that a result is for the segment it shows before pasting it; `expected_version` refuses a step
on a mask that another client has changed meanwhile.
"""
from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError
from ..server.codec import compress_crop
from ..server.errors import ApiError
from ..server.jobs import DONE, Job
from ..volume.options import VolumeOptions
from ..volume.slices.slice_source import SliceSource
from ..volume.slices.windowing import Window, parse_window
from ..volume.tasks.sampling import task_budget
from .volume_session import RefinementSession, RefineOutcome


@dataclass
class RefineSeed:
    """What a finished segmentation job leaves for refinement: how its slices were made (axis and window, exactly
    as the pipeline chose them) and its options. Not the volume: a finished job must not keep it in memory."""

    axis: str
    window: Window
    options: VolumeOptions

    @classmethod
    def of(cls, source: SliceSource, options: VolumeOptions) -> "RefineSeed":
        return cls(options.axis, source.window, options)


@dataclass
class SessionPlan:
    source: SliceSource
    options: VolumeOptions
    mask: np.ndarray
    query: str | None
    anchors: list[int]


def plan_session(state, volume_id: str, volume, request) -> SessionPlan:
    """Everything a new session needs, from the request's job (checked to be this volume's) and/or mask."""
    if request.job_id is not None:
        plan = _plan_from_job(state, volume_id, volume, request)
    else:
        settings = request.settings
        options = settings.to_dataclass()
        window = parse_window(options.window, request.query or "", volume.modality, volume.voxels)
        plan = SessionPlan(SliceSource(volume, options.axis, window), options, None, request.query, [])
    if request.mask is not None:
        plan.mask = mask_from_crop(request.mask, volume.shape)
    plan.anchors = sorted(set(plan.anchors) | set(request.anchors))
    return plan


def _plan_from_job(state, volume_id: str, volume, request) -> SessionPlan:
    job = state.jobs.get(request.job_id)
    if job.volume_id != volume_id:
        raise ApiError(409, f"job {job.id} segmented volume {job.volume_id}, not {volume_id}: a session refines the "
                            f"volume its mask belongs to", type="wrong_volume")
    if job.status != DONE:
        raise ApiError(409, f"job {job.id} is {job.status}; refinement starts from a finished segmentation job",
                       type="not_ready")
    seed = job.extras.get("refine_seed")
    if seed is None or job.task != "segment":
        raise ApiError(409, f"job {job.id} is a {job.task} job; refinement starts from a segmentation job",
                       type="not_a_segmentation")
    segments = json.loads(job.result)["segments"]
    labels = [s["label"] for s in segments]
    label = request.label if request.label is not None else (labels[0] if len(labels) == 1 else None)
    if label not in labels:
        raise InputError(f"job {job.id} has segments {labels}; say which one to refine with 'label'")
    segment = next(s for s in segments if s["label"] == label)
    mask = mask_from_crop(segment["mask"], volume.shape) if segment["mask"] else np.zeros(volume.shape, bool)
    anchors = [segment["key_slice"]] if segment.get("key_slice") is not None else []
    source = SliceSource(volume, seed.axis, seed.window)
    return SessionPlan(source, seed.options, mask, request.query or segment["query"], anchors)


def start_session(state, volume_id: str, segment: str, volume, request):
    plan = plan_session(state, volume_id, volume, request)
    slice_range = plan.options.validate(plan.source.depth)
    budget = task_budget("segment", plan.options)
    for anchor in plan.anchors:
        if not 0 <= anchor < plan.source.depth:
            raise InputError(f"anchor slice {anchor} is outside the volume's 0:{plan.source.depth}")

    def build(store):
        return RefinementSession(state.engine, plan.source, plan.mask, query=plan.query, slice_range=slice_range,
                                 budget=budget, answer=plan.options.answer, anchors=plan.anchors, features=store)

    return state.refine.open(volume_id, segment, plan.source, budget, build)


def mask_from_crop(crop, shape: tuple[int, int, int]) -> np.ndarray:
    """A (k, j, i) bool mask of the volume from a crop (a `MaskCrop` or its dict), checked against the volume."""
    crop = crop if isinstance(crop, dict) else crop.model_dump()
    offset, size = [int(v) for v in crop["offset"]], [int(v) for v in crop["shape"]]
    if any(o < 0 or o + n > limit for o, n, limit in zip(offset, size, shape)):
        raise InputError(f"the mask crop at {offset} of shape {size} does not fit the volume's {list(shape)}")
    expected = int(np.prod(size))
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(crop["data"], validate=True), expected + 1)
    except (binascii.Error, ValueError, zlib.error) as error:
        raise InputError(f"the mask crop is not zlib-compressed base64 data ({error})") from None
    if len(raw) != expected:
        raise InputError(f"the mask crop holds {len(raw)} bytes, its shape {size} needs {expected}")
    mask = np.zeros(shape, bool)
    mask[tuple(slice(o, o + n) for o, n in zip(offset, size))] = np.frombuffer(raw, np.uint8).reshape(size) > 0
    return mask


# ---------------------------------------------------------------------------------------------- steps

def check_version(entry, expected: int | None) -> dict | None:
    """A conflict answer when the client's view of the segment is stale, else None."""
    version = entry.session.version
    if expected is None or expected == version:
        return None
    return {"conflict": f"segment {entry.segment!r} is at version {version}, not {expected}: another client changed "
                        f"it; fetch it (GET) and try again", "version": version}


def refine_runner(entry, request) -> Callable[[Job], dict]:
    prompts, options = request.prompts(), request.options()

    def run(job: Job) -> dict:
        session = entry.session
        with session.lock:  # the version check and the step are one
            conflict = check_version(entry, request.expected_version)
            if conflict:
                return conflict
            return step_payload(entry, session.refine(prompts, options))

    return run


def run_step(entry, kind: str, expected: int | None) -> dict:
    session = entry.session
    with session.lock:
        conflict = check_version(entry, expected)
        if conflict:
            return conflict
        outcome = session.undo() if kind == "undo" else session.redo()
        if outcome is None:
            return {"nothing": f"nothing to {kind} on segment {entry.segment!r}", "kind": kind}
        return step_payload(entry, outcome)


def crop_payload(offset, voxels: np.ndarray) -> dict:
    return {"offset": [int(v) for v in offset], "shape": [int(v) for v in voxels.shape], "dtype": "uint8",
            "encoding": "zlib+base64", "data": compress_crop(voxels.astype(np.uint8))}


def step_payload(entry, outcome: RefineOutcome) -> dict:
    session = entry.session
    step = outcome.step
    return {"volume_id": entry.volume_id, "segment": entry.segment, "kind": outcome.kind, "version": outcome.version,
            "changed": step is not None, "change": crop_payload(step.offset, outcome.crop) if step else None,
            "changed_slices": outcome.changed_slices, "refined_slices": outcome.refined_slices,
            "propagated_slices": outcome.propagated_slices, "voxels": session.voxels,
            "can_undo": bool(session.history.done), "can_redo": bool(session.history.undone),
            "timings": outcome.timings}


def session_payload(entry, with_mask: bool = False) -> dict:
    payload = entry.describe()
    if with_mask:
        found = entry.session.bounding_crop()
        payload["mask"] = crop_payload(*found) if found else None
    return payload
