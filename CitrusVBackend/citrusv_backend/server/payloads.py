"""How volume results become JSON: each segment's own mask as a compressed crop of its bounding box (offset and
shape in (k, j, i), uint8 voxels holding the segment's label or 0; overlapping segments each keep all their voxels),
and strict JSON for every route. Shared by the volume jobs (`tasks`) and the conversations (`conversations`)."""
from __future__ import annotations

import json
import math

import numpy as np

from ..serialization import json_default
from ..volume.input.io import Volume
from ..volume.outputs.files import report_markdown, segment_color
from ..volume.tasks.results import VolumeResult
from .codec import b64encode, compress_crop


def labelmap_info(volume: Volume) -> dict:
    return {"shape": list(volume.shape), "dtype": "uint8", "ijk_to_ras": volume.geometry.ijk_to_ras().tolist()}


def segment_crop(mask: np.ndarray, label: int) -> dict | None:
    """The segment's own mask as its bounding box: offset + shape + compressed uint8 voxels (label or 0); None
    when the mask is empty."""
    from scipy import ndimage

    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    box = boxes[0]
    crop = mask[box].astype(np.uint8) * np.uint8(label)
    return {"offset": [s.start for s in box], "shape": list(crop.shape), "dtype": "uint8",
            "encoding": "zlib+base64", "data": compress_crop(crop)}


def image_png_base64(rgb: np.ndarray) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return b64encode(buffer.getvalue())


def volume_result_payload(result: VolumeResult, volume: Volume) -> dict:
    segments = [segment.describe() | {"color": list(segment_color(segment.label)),
                                      "mask": segment_crop(segment.mask, segment.label)}
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
