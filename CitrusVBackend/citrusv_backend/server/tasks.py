"""What the worker runs for each kind of request, and how results become JSON.

Volume results carry each segment's mask as a compressed crop of the labelmap (its bounding box offset and
shape in (k, j, i), the uint8 voxels of that box holding the segment's label or 0), so a client rebuilds the
labelmap with `labels[k0:k0+dk, j0:j0+dj, i0:i0+di][crop > 0] = label` on the volume it uploaded.
"""
from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..inference.engine import CitrusVEngine, InferenceResult
from ..model.processor import check_prompt_and_answer
from ..serialization import json_default
from ..volume.dicom_out import check_dicom_possible, dataset_bytes, describe_objects, dicom_objects, model_name, wants_dicom
from ..volume.io import Volume
from ..volume.outputs import report_markdown, segment_color
from ..volume.orientation import model_orientation
from ..volume.pipeline import VolumePipeline, VolumeResult
from ..volume.targets import detection_targets, parse_targets
from ..volume.windowing import check_window_spec
from . import rle
from .codec import b64encode, compress_crop, mask_payload
from .conversations import ask_payload
from .jobs import Job
from .refine_service import RefineSeed
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
    depth = volume.shape[model_orientation(volume.geometry.direction, options.plane).slice_axis]
    options.validate(depth)
    if request.options.slice is not None and request.options.slice >= depth:
        raise InputError(f"slice {request.options.slice} is outside the volume's 0:{depth} along the {options.plane} axis")


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


def labelmap_info(volume: Volume) -> dict:
    return {"shape": list(volume.shape), "dtype": "uint8", "ijk_to_ras": volume.geometry.ijk_to_ras().tolist()}


def labelmap_crops(labels: np.ndarray) -> dict[int, dict]:
    """Each label's bounding box in the labelmap as offset + shape + compressed uint8 voxels (one pass)."""
    from scipy import ndimage

    crops = {}
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        crop = (labels[box] == index).astype(np.uint8) * np.uint8(index)
        crops[index] = {"offset": [s.start for s in box], "shape": list(crop.shape), "dtype": "uint8",
                        "encoding": "zlib+base64", "data": compress_crop(crop)}
    return crops


def image_png_base64(rgb: np.ndarray) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return b64encode(buffer.getvalue())


def volume_result_payload(result: VolumeResult, volume: Volume) -> dict:
    crops = labelmap_crops(result.labels)
    segments = [segment.describe() | {"color": list(segment_color(segment.label)), "mask": crops.get(segment.label)}
                for segment in result.segments]
    report = None
    if result.task == "report" or result.report_findings or result.report_impression:
        report = {"findings": result.report_findings, "impression": result.report_impression,
                  "experimental": result.experimental}
        if result.report_image is not None:  # the radiograph-like projection the report was written from
            report["image"] = {"format": "png", "encoding": "base64", "data": image_png_base64(result.report_image)}
    return {"task": result.task, "prompt": result.prompt, "case": result.case, "random_weights": result.random_weights,
            "labelmap": labelmap_info(volume), "segments": segments, "findings": result.findings,
            "boxes": result.boxes, "report": report, "report_markdown": report_markdown(result), "answer": None,
            "experimental": result.experimental,
            "problems": result.problems, "timings": result.timings, "settings": result.settings}


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


# ---------------------------------------------------------------------------------------------- JSON

def to_json_bytes(payload) -> bytes:
    """Strict JSON (no NaN/Infinity: not every client parses them); non-finite numbers become null."""
    try:
        return json.dumps(payload, default=json_default, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        return json.dumps(_finite(payload), default=json_default, allow_nan=False, separators=(",", ":")).encode()


def _finite(value):
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
