"""The options of one 2D run (`citrusv infer`, `POST /v1/images`), declared once: the command line and the
service's request model are derived from these fields (option_fields.py). The volume pipeline's options
share the image-size ones (volume/options.py). Light: no torch."""
from __future__ import annotations

from dataclasses import dataclass

from ..option_fields import option
from ..option_types import PIXEL_BUDGET_MAX, PIXEL_BUDGET_MIN, check_pixel_budget_order

TASKS = ("ask", "segment", "detect", "report")
MASK_UPSAMPLING = ("bilinear", "nearest")
DEFAULT_MAX_NEW_TOKENS = 1024
FORCED_SEGMENT_ANSWER = "Sure, it is [SEG]."


@dataclass
class ImageOptions:
    """How one image is asked: the task, a forced answer, the image-size budget, the answer's length."""

    task: str = option("ask", "what the answer holds: ask (text), segment (masks), detect (boxes), report",
                       choices=TASKS)
    answer: str | None = option(None, "force this answer (e.g. 'Sure, it is [SEG].'): one prefill, no decoding",
                                min_length=1, max_length=1000, advanced=True)
    min_pixels: int | None = option(None, "Qwen resize lower bound in pixels (default: each task's own)",
                                    ge=PIXEL_BUDGET_MIN, le=PIXEL_BUDGET_MAX, advanced=True)
    max_pixels: int | None = option(None, "Qwen resize upper bound in pixels (default: each task's own; segment "
                                           "65535, others 1003520)",
                                    ge=PIXEL_BUDGET_MIN, le=PIXEL_BUDGET_MAX, advanced=True)
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "the most tokens an answer may have", ge=1, advanced=True)
    mask_upsampling: str = option("bilinear", "bilinear: smooth, upsample logits (default); nearest: the "
                                              "reference's exact resize", choices=MASK_UPSAMPLING, advanced=True)

    def check(self) -> None:
        check_pixel_budget_order(self.min_pixels, self.max_pixels)

