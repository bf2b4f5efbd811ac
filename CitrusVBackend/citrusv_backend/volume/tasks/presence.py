"""Is the target on this slice? Decided from what Citrus-V trained: the mask logits.

Citrus-V trains its SAM2 only with BCE + Dice losses on the mask logits, and the reference comments out SAM2's
object-score suppression (`architectures/sam2_base.py`): the object-score and IoU heads got no training
signal while the decoder they read was fine-tuned, so their values are uncalibrated. The default rule
("mask") therefore reads the 256x256 mask logits only:

* area: the share of the frame with logit > 0 (the reference's binary mask), between `min_area` (noise) and
  `max_area` (a mask covering nearly everything is a failure, not a target);
* mean logit over the mask: how sure the model is of the pixels it marked (`min_mean_logit`);
* consistency: in per-slice mode a slice counts only when a neighbouring slice shows the target too
  (`neighbour_support`), so isolated blips on unrelated slices are dropped.

The object score is kept as a reported figure; `rule="object-score"` restores the former decision
(object score > 0, ranked by P(object) x predicted IoU) and `rule="both"` requires both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ...errors import InputError

PRESENCE_RULES = ("mask", "object-score", "both")


@dataclass(frozen=True)
class Evidence:
    """What one slice's mask says, from its low-resolution logits (and the untrained heads, for reporting)."""

    area: float            # share of the frame with logit > 0
    peak_logit: float
    mean_logit: float      # mean logit over the pixels with logit > 0 (0 when there are none)
    object_score: float    # SAM2's object-score logit (reported; decides only under rule "object-score"/"both")
    iou: float             # SAM2's predicted IoU (reported)

    @classmethod
    def from_logits(cls, logits: np.ndarray, object_score: float = float("nan"), iou: float = float("nan")) -> "Evidence":
        logits = np.asarray(logits, dtype=np.float32)
        inside = logits > 0
        area = float(inside.mean()) if logits.size else 0.0
        mean = float(logits[inside].mean()) if inside.any() else 0.0
        return cls(area, float(logits.max()) if logits.size else float("-inf"), mean, float(object_score), float(iou))

    @classmethod
    def from_result(cls, result) -> "Evidence | None":
        """From an InferenceResult's first mask (None when the answer had no [SEG])."""
        if not result.masks:
            return None
        found = result.masks[0]
        return cls.from_logits(found.low_res_logits, found.object_score, found.iou)

    def to_dict(self) -> dict:
        return {key: (round(value, 4) if math.isfinite(value) else None) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class PresenceRule:
    rule: str = "mask"
    min_area: float = 8 / 65536       # 8 pixels of SAM2's 256x256 frame: smaller is noise, not a lesion
    max_area: float = 0.9
    min_mean_logit: float = 1.0       # mean P(mask) of the marked pixels >= 0.73
    neighbour_support: bool = True

    def __post_init__(self):
        if self.rule not in PRESENCE_RULES:
            raise InputError(f"unknown presence rule {self.rule!r}; use one of {', '.join(PRESENCE_RULES)}")
        if not 0 <= self.min_area < self.max_area <= 1:
            raise InputError("presence areas must satisfy 0 <= min_area < max_area <= 1")

    def _mask_says(self, evidence: Evidence) -> bool:
        return self.min_area <= evidence.area <= self.max_area and evidence.mean_logit >= self.min_mean_logit

    def _object_says(self, evidence: Evidence) -> bool:
        return evidence.object_score > 0 and 0 < evidence.area <= self.max_area

    def present(self, evidence: Evidence | None) -> bool:
        if evidence is None:
            return False
        if self.rule == "mask":
            return self._mask_says(evidence)
        if self.rule == "object-score":
            return self._object_says(evidence)
        return self._mask_says(evidence) and self._object_says(evidence)

    def score(self, evidence: Evidence | None) -> float:
        """Confidence used to rank candidate key slices; 0 when the slice does not show the target."""
        if not self.present(evidence):
            return 0.0
        mask_score = _sigmoid(evidence.mean_logit)  # mean P(mask) of the marked pixels, in (0.5, 1]
        object_score = _sigmoid(evidence.object_score) * max(evidence.iou, 0.0)
        if self.rule == "mask":
            return mask_score
        if self.rule == "object-score":
            return object_score
        return mask_score * object_score

    def describe(self) -> dict:
        return asdict(self)


def consistent_slices(present: dict[int, bool], first: int, last: int, rule: PresenceRule) -> set[int]:
    """The slices that count: present, and (with neighbour support) with a present neighbour in [first, last).

    A range of one slice has no neighbours to ask, so its only slice counts on its own."""
    shown = {index for index, yes in present.items() if yes}
    if not rule.neighbour_support or last - first <= 1:
        return shown
    return {index for index in shown if index - 1 in shown or index + 1 in shown}


def _sigmoid(value: float) -> float:
    if not math.isfinite(value):
        return 0.0 if value < 0 else 1.0
    return 1.0 / (1.0 + math.exp(-value))
