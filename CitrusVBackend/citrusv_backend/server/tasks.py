"""What the worker runs for each kind of request (their JSON: `payloads`).

Volume results carry each segment's own mask (overlaps kept: a lesion inside its organ is in both) as a
compressed crop (its bounding box offset and shape in (k, j, i), the uint8 voxels of that box holding the
segment's label or 0), so a client rebuilds each segment with `mask[k0:k0+dk, j0:j0+dj, i0:i0+di] = crop > 0`
on the volume it uploaded. A target that was not found has `"mask": null`, `"found": false` and its `"reason"`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..inference.engine import CitrusVEngine, InferenceResult
from ..model.processor import check_prompt_and_answer
from ..volume.outputs.dicom_out import (check_dicom_possible, dataset_bytes, describe_objects, dicom_objects,
                                        dicom_skipped, model_name, wants_dicom)
from ..refine.server_service import RefineSeed
from ..volume.input.io import Volume
from ..volume.slices.orientation import model_orientation
from ..volume.slices.windowing import check_window_spec
from ..volume.tasks.pipeline import VolumePipeline
from ..volume.tasks.results import VolumeResult
from ..volume.tasks.targets import detection_targets, parse_targets
from . import rle
from .codec import mask_payload
from .conversations import ask_payload
from .jobs import Job
from .payloads import to_json_bytes, volume_result_payload
from .schemas import ImageRequest, JobRequest



# ---------------------------------------------------------------------------------------------- volumes

def validate_volume_job(request: JobRequest, volume: Volume, max_new_tokens: int) -> None:
    """The checks that are cheap enough to answer at submission (the pipeline repeats them when it runs)."""
    options = request.options.to_volume_options()
    if options.max_new_tokens > max_new_tokens:
        raise InputError(f"max_new_tokens {options.max_new_tokens} is more than this server allows ({max_new_tokens})")
    check_prompt_and_answer(request.prompt, options.answer)
    if request.task != "report" and not request.prompt.strip():
        raise InputError("the prompt is empty; say what to find, e.g. 'segment the liver'")
    if request.task == "segment":
        parse_targets(request.prompt)
    elif request.task == "detect":
        detection_targets(request.prompt)
    if request.task == "report" and options.report_image == "projection" and volume.modality != "CT":
        raise InputError(f"a radiograph-like projection needs a CT volume, not {volume.modality}")
    check_window_spec(options.window)
    if wants_dicom(request.options.dicom_out, volume) and request.task != "ask":
        check_dicom_possible(volume)
    depth = volume.shape[model_orientation(volume.geometry.direction, options.axis).slice_axis]
    options.validate(depth)
    if request.options.slice is not None and request.options.slice >= depth:
        raise InputError(f"slice {request.options.slice} is outside the volume's 0:{depth} along the {options.axis} axis")


def volume_runner(engine: CitrusVEngine, volume_id: str, volume: Volume, request: JobRequest,
                  feature_cache=None) -> Callable[[Job], bytes]:
    """`feature_cache`: where the job's SAM2 slice features go (the refinement sessions' cache, so that a click
    after the job needs no encoding); None: the job's own."""
    options = request.options.to_volume_options()

    def run(job: Job) -> bytes:
        if request.task == "ask":
            payload = ask_payload(engine, volume, request, options, job)
        else:
            pipeline = VolumePipeline(engine, progress=job.progress, should_cancel=job.should_cancel,
                                      feature_cache=feature_cache)
            result = pipeline.run(volume, request.prompt, task=request.task, options=options)
            skipped = dicom_skipped(request.options.dicom_out, volume)   # the default DICOM output cannot be made
            if skipped:
                result.problems.append(skipped)
            payload = volume_result_payload(result, volume)
            job.extras["refine_seed"] = RefineSeed.of(result.source, options)  # how refinement must make its slices
            if wants_dicom(request.options.dicom_out, volume):
                job.progress("DICOM", 0.98, "writing the DICOM SEG and SR")
                payload["dicom"] = dicom_attachments(job, result, volume, model_name(engine.loaded.describe()))
        job.progress("packing the result", 0.99, "compressing the masks")
        return to_json_bytes(payload | {"job_id": job.id, "volume_id": volume_id})

    return run


def dicom_attachments(job: Job, result: VolumeResult, volume: Volume, model: str) -> dict:
    """The DICOM objects as the job's attachments (GET /v1/jobs/{id}/dicom/{name}); their UIDs and URLs."""
    objects = dicom_objects(result, volume, model)
    named = ([("seg", objects.seg)] if objects.seg is not None else []) + [("sr", objects.sr)]
    named += [(f"image_{k + 1:04d}", dataset) for k, dataset in enumerate(objects.images)]
    job.attachments = {name: dataset_bytes(dataset) for name, dataset in named}
    return describe_objects(objects) | {"files": {name: f"/v1/jobs/{job.id}/dicom/{name}" for name, _ in named}}


# ---------------------------------------------------------------------------------------------- 2D

def image_runner(engine: CitrusVEngine, image, request: ImageRequest) -> Callable[[Job], dict]:
    def run(job: Job) -> dict:
        result = engine.run(image, request.prompt, task=request.task, answer=request.answer,
                            min_pixels=request.min_pixels, max_pixels=request.max_pixels,
                            max_new_tokens=request.max_new_tokens, mask_upsampling=request.mask_upsampling,
                            should_cancel=job.should_cancel)
        return image_result_payload(result, request.mask_format)
    return run


def reference_binary_mask(low_res_logits: np.ndarray) -> np.ndarray:
    """The reference server's mask: sigmoid(low-res logits) > 0.5 on SAM2's 256x256 frame."""
    return (torch.sigmoid(torch.from_numpy(np.asarray(low_res_logits)).float()) > 0.5).numpy()


def image_result_payload(result: InferenceResult, mask_format: str) -> dict:
    """`citrusv infer`'s JSON, each mask with its pixels (RLE or PNG) and the reference's 256x256 RLE."""
    payload = result.to_json_dict()
    for entry, mask in zip(payload["masks"], result.masks):
        entry["mask"] = mask_payload(mask.mask, mask_format)
        entry["low_res_rle"] = rle.encode(reference_binary_mask(mask.low_res_logits))
    return payload
