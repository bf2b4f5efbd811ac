"""A radiograph-like frontal projection of a CT volume: the image a chest-radiograph report can be written from.

Citrus-V's report prompt ("Evaluate the provided chest radiograph and compile a report. Let's think step by
step.") was trained and benchmarked on chest X-rays (CheXpert Plus), and the reference made CT-based CoT data
by projecting CT volumes into X-ray-like images (`asset/ct-convert-to-xray.png`: rays front to back through
the volume). This module does the same: Hounsfield units -> attenuation relative to water
(mu = 1 + HU/1000, air 0, water 1, dense bone about 2), summed along the anterior-posterior axis (mm of
water-equivalent path), shown as a radiograph shows attenuation (bright = much tissue in the ray's way),
superior up and patient right on the image's left (a PA film's display), resampled to square pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ...errors import InputError
from ..input.io import Volume
from .orientation import display_orientation
from .windowing import CT_PADDING_BELOW

PROJECTION_PERCENTILES = (0.5, 99.5)


def attenuation(hounsfield: np.ndarray) -> np.ndarray:
    """HU -> linear attenuation relative to water; field-of-view padding (< -1024 HU) is air."""
    values = hounsfield.astype(np.float32)
    mu = np.clip(1.0 + values / 1000.0, 0.0, None)
    mu[values < CT_PADDING_BELOW] = 0.0
    return mu


def radiograph_projection(volume: Volume) -> np.ndarray:
    """[H, W, 3] uint8: the frontal projection of a CT volume, square pixels of the in-plane spacing."""
    if volume.modality.upper() != "CT":
        raise InputError(f"a radiograph-like projection needs CT in Hounsfield units, not {volume.modality}")
    orientation = display_orientation(volume.geometry.direction, "coronal")
    spacing = lambda axis: float(volume.geometry.spacing[2 - axis])  # noqa: E731  numpy axis -> (i, j, k) spacing
    path_mm = attenuation(volume.voxels).sum(axis=orientation.slice_axis) * spacing(orientation.slice_axis)
    plane = orientation.arrange(path_mm)
    gray = _expose(plane)
    row_mm, col_mm = spacing(orientation.row_axis), spacing(orientation.col_axis)
    pixel_mm = min(row_mm, col_mm)
    size = (max(1, round(plane.shape[1] * col_mm / pixel_mm)), max(1, round(plane.shape[0] * row_mm / pixel_mm)))
    image = Image.fromarray(gray).resize(size, Image.BILINEAR) if size != (plane.shape[1], plane.shape[0]) \
        else Image.fromarray(gray)
    return np.repeat(np.asarray(image)[:, :, None], 3, axis=2)


def _expose(path_mm: np.ndarray) -> np.ndarray:
    """Path length -> 8-bit gray: the robust range of the rays that cross the body mapped to 0..255."""
    body = path_mm[path_mm > 1.0]
    if body.size == 0:
        raise InputError("the volume has no tissue to project (every ray crosses air only)")
    low, high = np.percentile(body, PROJECTION_PERCENTILES)
    scaled = (path_mm - low) / max(float(high - low), 1e-6)
    return np.clip(np.rint(np.clip(scaled, 0, 1) * 255), 0, 255).astype(np.uint8)
