"""Intensity windows: volume values -> the 8-bit gray the model's training images had.

CT presets are the usual radiology windows (center, width in HU). A preset is picked from the prompt's
words when the user does not name one; MR and PET have no absolute scale, so they use robust
percentiles of the volume instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    name: str = "custom"

    def apply(self, values: np.ndarray) -> np.ndarray:
        """[center - width/2, center + width/2] -> 0..255, rounded, clipped."""
        low = self.center - self.width / 2.0
        scaled = (values.astype(np.float64) - low) / self.width * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


CT_PRESETS = {
    "soft_tissue": Window(40, 400, "soft_tissue"),
    "lung": Window(-600, 1500, "lung"),
    "bone": Window(400, 1800, "bone"),
    "brain": Window(40, 80, "brain"),
    "liver": Window(60, 160, "liver"),
}

# Prompt words that call for a preset other than soft tissue, checked in this order.
_PRESET_WORDS = [
    ("lung", r"lung|pulmonary|nodule|airway|bronch|emphysema|pneumo|ground[- ]glass"),
    ("bone", r"bone|rib|vertebra|spine|fracture|skull|femur|pelvi|osse"),
    ("brain", r"brain|cerebr|intracranial|hemorrhage|haemorrhage|stroke"),
    ("liver", r"liver|hepat"),
]


def window_for_prompt(prompt: str) -> Window:
    text = prompt.lower()
    for preset, pattern in _PRESET_WORDS:
        if re.search(pattern, text):
            return CT_PRESETS[preset]
    return CT_PRESETS["soft_tissue"]


def percentile_window(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> Window:
    """For MR/PET: the robust intensity range of the volume's non-background voxels."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InputError("the volume has no finite intensity values")
    foreground = finite[finite > finite.min()] if np.any(finite > finite.min()) else finite
    lo, hi = np.percentile(foreground, [low, high])
    width = max(float(hi - lo), 1e-6)
    return Window(float(lo + hi) / 2.0, width, f"percentile_{low:g}_{high:g}")


def parse_window(spec: str | None, prompt: str, modality: str = "CT", values: np.ndarray | None = None) -> Window:
    """`spec`: None/'auto' (from the prompt for CT, percentiles otherwise), a preset name, or 'CENTER,WIDTH'."""
    if spec in (None, "", "auto"):
        if modality.upper() == "CT":
            return window_for_prompt(prompt)
        if values is None:
            raise InputError("a percentile window needs the volume's values")
        return percentile_window(values)
    if spec in CT_PRESETS:
        return CT_PRESETS[spec]
    try:
        center, width = (float(part) for part in spec.split(","))
    except ValueError:
        raise InputError(f"window {spec!r}: use auto, one of {', '.join(CT_PRESETS)}, or CENTER,WIDTH") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise InputError(f"window {spec!r}: CENTER and WIDTH must be finite numbers and WIDTH positive")
    return Window(center, width)
