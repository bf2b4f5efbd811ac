"""Intensity windows: volume values -> the 8-bit gray levels the model's training images had.

Citrus-V's segmentation data (MeCoVQA-G) are SA-Med2D-20M slices, made from volumes by a per-volume
normalisation, not by a clinical window: each volume clipped at its 0.5th and 99.5th intensity percentiles
and scaled linearly to 0-255. The reference's own sample slice (`asset/ct_00--MSD_Liver--liver_123--y_0175.png`)
measures air 0-3, lung 16, fat 95, soft tissue 110 — a linear map of about [-1050, +1500] HU; the SA-Med2D
demo slices of other CTs put lung at 35-42 and soft tissue at 66-167 (their percentiles differ per volume).
That normalisation (`training`, alias `auto`) is the default for every modality and task. For CT, values below
-1024 HU (no tissue is less dense than air) are left out of the percentiles: they are the padding outside the
scanner's field of view (-2048, -3024), which would otherwise set the lower bound (slicerio's chest CT is 21 %
padding) and push lung to mid-gray; a volume without padding gets exactly the plain recipe.

Clinical windows stay available on request: `clinical` picks a preset per target from the target's words
(lung, bone, brain, liver, else soft tissue), a preset name or `CENTER,WIDTH` applies one window to all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ...errors import InputError

TRAINING = "training"      # the SA-Med2D per-volume percentile normalisation (default)
CLINICAL = "clinical"      # a CT preset per target, chosen from the target's words
TRAINING_PERCENTILES = (0.5, 99.5)
CT_PADDING_BELOW = -1024.0  # HU; lower values are outside the field of view, never tissue


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

    @property
    def bounds(self) -> tuple[float, float]:
        return self.center - self.width / 2.0, self.center + self.width / 2.0


CT_PRESETS = {
    "soft_tissue": Window(40, 400, "soft_tissue"),
    "lung": Window(-600, 1500, "lung"),
    "bone": Window(400, 1800, "bone"),
    "brain": Window(40, 80, "brain"),
    "liver": Window(60, 160, "liver"),
}
WINDOW_CHOICES = ("auto", TRAINING, CLINICAL) + tuple(CT_PRESETS)

# Words that call for a preset other than soft tissue, checked in this order (the `clinical` choice).
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
    """The robust intensity range of the volume's non-background voxels (values above its minimum)."""
    finite = _finite(values)
    foreground = finite[finite > finite.min()] if np.any(finite > finite.min()) else finite
    return _window_between(*np.percentile(foreground, [low, high]), f"percentile_{low:g}_{high:g}")


def training_window(values: np.ndarray, modality: str = "CT") -> Window:
    """SA-Med2D's normalisation of one volume: its 0.5th..99.5th percentiles -> 0..255.

    CT: voxels below -1024 HU (field-of-view padding) are left out. MR and PET have no absolute scale and a
    large zero background; their percentiles are taken over the voxels above the volume's minimum, as before."""
    if modality.upper() != "CT":
        return replace_name(percentile_window(values, *TRAINING_PERCENTILES), TRAINING)
    finite = _finite(values)
    inside = finite[finite >= CT_PADDING_BELOW]
    return _window_between(*np.percentile(inside if inside.size else finite, TRAINING_PERCENTILES), TRAINING)


def replace_name(window: Window, name: str) -> Window:
    return Window(window.center, window.width, name)


def _finite(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).ravel()
    finite = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if finite.size == 0:
        raise InputError("the volume has no finite intensity values")
    return finite


def _window_between(low: float, high: float, name: str) -> Window:
    width = max(float(high - low), 1e-6)
    return Window(float(low) + width / 2.0, width, name)


def check_window_spec(spec: str | None) -> None:
    """A clear error for a window the user mistyped, before any work is done."""
    if spec in (None, "", "auto", TRAINING, CLINICAL) or spec in CT_PRESETS:
        return
    try:
        center, width = (float(part) for part in str(spec).split(","))
    except ValueError:
        raise InputError(f"window {spec!r}: use {TRAINING} (default), {CLINICAL}, one of {', '.join(CT_PRESETS)}, "
                         f"or CENTER,WIDTH") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise InputError(f"window {spec!r}: CENTER and WIDTH must be finite numbers and WIDTH positive")


def parse_window(spec: str | None, prompt: str, modality: str = "CT", values: np.ndarray | None = None) -> Window:
    """The window for one target (`prompt`: its name or the user's words).

    `spec`: None/'auto'/'training' (the training normalisation; needs `values`), 'clinical' (a CT preset from
    the words; MR/PET fall back to the training normalisation), a preset name, or 'CENTER,WIDTH'."""
    check_window_spec(spec)
    if spec == CLINICAL and modality.upper() == "CT":
        return window_for_prompt(prompt)
    if spec in (None, "", "auto", TRAINING, CLINICAL):
        if values is None:
            raise InputError("the training normalisation needs the volume's values")
        return training_window(values, modality)
    if spec in CT_PRESETS:
        return CT_PRESETS[spec]
    center, width = (float(part) for part in spec.split(","))
    return Window(center, width)


class WindowChoice:
    """The windows of one job: one per target for `clinical`, else one for the whole volume (computed once)."""

    def __init__(self, spec: str | None, modality: str, values: np.ndarray):
        check_window_spec(spec)
        self.spec, self.modality, self.values = spec, modality, values
        self._cache: dict[str, Window] = {}

    @property
    def per_target(self) -> bool:
        return self.spec == CLINICAL and self.modality.upper() == "CT"

    def for_target(self, text: str) -> Window:
        key = text.lower() if self.per_target else ""
        if key not in self._cache:
            self._cache[key] = parse_window(self.spec, text, self.modality, self.values)
        return self._cache[key]
