"""The volume pipeline's options, declared once (`VolumeOptions`), and how a volume file is read
(`ReadOptions`). `citrusv segment / detect / report / refine / demo / batch`, the service's job and refinement
requests and the Slicer panel's choice lists are derived from these fields (option_fields.py); a new option
is one field here. Light: numpy at most, so `citrusv --help` and the batch's readers stay quick."""
from __future__ import annotations

from dataclasses import dataclass

from .. import option_types as types
from ..errors import InputError
from ..inference.options import FORCED_SEGMENT_ANSWER, ImageOptions
from ..option_fields import check_fields, option, same_as
from .slices.orientation import PLANES
from .slices.windowing import CLINICAL, CT_PRESETS
from .tasks.presence import PRESENCE_RULES, PresenceRule

MODES = ("propagate", "per-slice", "hybrid")
TASKS = ("segment", "detect", "report")
ANSWER_MODES = ("forced", "free")
REPORT_IMAGES = ("slices", "projection")
AXES = tuple(PLANES)                       # axial, coronal, sagittal
WINDOW_NAMES = ("auto", CLINICAL, *CT_PRESETS)  # and CENTER,WIDTH
DEFAULT_MAX_VOXELS = 1024 * 1024 * 1024    # 1 G voxels: ~2 GB as int16, the most one job may hold
SEGMENT = ("segment",)


@dataclass
class VolumeOptions:
    """How a volume task runs: which slices the model sees, how a target is followed through them, what is
    written. `advanced` fields are research and tuning switches (`--help-all`)."""

    mode: str = option("propagate", "propagate: key slice + SAM2 memory (default); per-slice: every slice alone; "
                                    "hybrid: propagation re-anchored by Citrus-V where it loses the target",
                       choices=MODES, tasks=SEGMENT)
    window: str = option("auto", "auto/training: each volume normalised as the training data (its 0.5-99.5th "
                                 "percentiles, default); clinical: a CT preset per target from its words; "
                                 "soft_tissue, lung, bone, brain, liver, or CENTER,WIDTH",
                         parse=types.window, max_length=64, presets=WINDOW_NAMES)
    axis: str = option("axial", "the slice axis the model reads along: axial, coronal or sagittal",
                       choices=AXES, old_names=("plane",))
    slice_range: tuple[int, int] | None = option(
        None, "FIRST:LAST slice indices to work on, LAST excluded (the API: [first, last])",
        parse=types.parse_slice_range, check=types.check_slice_range, metavar="FIRST:LAST")
    slice: int | None = option(None, "the slice the 'ask' task reads (default: the middle of the slice range)",
                               ge=0, cli=False)
    min_pixels: int | None = same_as(ImageOptions, "min_pixels", cli=False)
    max_pixels: int | None = same_as(ImageOptions, "max_pixels", help="Qwen resize upper bound per slice, in pixels "
                                                                        "(default: each task's own)")
    answer: str = same_as(ImageOptions, "answer", default=FORCED_SEGMENT_ANSWER, cli=False,
                          help="the answer forced on every slice of a segmentation")
    key_candidates: int = option(9, "coarse key-slice candidates per target", ge=1, le=64, cli=False)
    stop_after_empty: int = option(2, "propagation ends after this many empty slices", ge=1, le=64, cli=False)
    fill_holes: bool = option(True, "keep holes inside masks", flag="--no-fill-holes", tasks=SEGMENT)
    largest_component: bool = option(False, "keep only the largest 3D component", tasks=SEGMENT)
    report_slices: int = option(3, "slices read by the report task", ge=1, le=64, cli=False)
    detect_slices: int = option(16, "slices read by the detect task", ge=1, le=512, cli=False)
    max_new_tokens: int = same_as(ImageOptions, "max_new_tokens")
    batch_size: int = option(4, "slices per batched prefill / SAM2 encoding", ge=1, le=64, advanced=True)
    presence: str = option("mask", "how a slice is judged to show the target: mask (its mask logits, what Citrus-V "
                                   "trained; default), object-score (SAM2's untrained object-score head), both",
                           choices=PRESENCE_RULES, advanced=True, tasks=SEGMENT)
    object_score_suppression: bool = option(
        False, "let SAM2's propagation blank slices whose object score is negative (SAM2's own behaviour; off by "
               "default: Citrus-V never trained that head)", advanced=True, tasks=SEGMENT)
    answer_mode: str = option("forced", "forced: 'Sure, it is [SEG].' on every slice (default); free: the model "
                                        "writes its own answer on the key slice, and that answer (if it has a "
                                        "[SEG]) is forced on the rest",
                              choices=ANSWER_MODES, advanced=True, tasks=SEGMENT)
    mask_upsampling: str = same_as(ImageOptions, "mask_upsampling", tasks=SEGMENT)
    report_image: str = option("slices", "report from representative slices (default) or from a radiograph-like "
                                         "frontal projection of the CT (closer to the chest X-rays the report "
                                         "prompt was trained on)", choices=REPORT_IMAGES, tasks=("report",))
    dicom_out: bool | None = option(None, "also write a DICOM SEG and a TID 1500 SR (default: only for a DICOM "
                                          "series input; other inputs get a new study without patient identity)",
                                    advanced=True)

    def presence_rule(self) -> PresenceRule:
        return PresenceRule(self.presence)

    def check(self) -> None:
        """The rules between fields, before any volume is seen (the request models run it too)."""
        types.check_pixel_budget_order(self.min_pixels, self.max_pixels)

    def validate(self, depth: int) -> tuple[int, int]:
        """Every rule, with the volume's `depth` along the axis: the [first, last) slices to work on."""
        check_fields(self)  # choices and bounds, as declared
        try:
            self.check()
            first, last = types.check_slice_range(self.slice_range or (0, depth))
        except ValueError as error:
            raise InputError(str(error)) from None
        if last > depth:
            raise InputError(f"slice range {first}:{last} is outside the volume's 0:{depth} along the {self.axis} axis")
        return first, last


@dataclass
class ReadOptions:
    """How a volume file is read (the command line's; the service reads uploads under its own limits)."""

    max_voxels: int = option(DEFAULT_MAX_VOXELS, "refuse larger volumes (memory budget)", ge=1, advanced=True,
                             api=False)
    on_bad_dicom: str = option("refuse", "a DICOM series with unreadable files, mixed orientations or stray images: "
                                         "refuse it (default) or leave those files out with a warning (gaps and "
                                         "uneven spacing are always refused)",
                               choices=("refuse", "skip"), advanced=True, api=False)


@dataclass
class RefineOptions:
    """How one refinement step (points and boxes on a segment) is applied."""

    keep_text: bool = option(False, "keep the text's projected [SEG] token among SAM2's sparse prompts",
                             advanced=True)
    mask_prompt: bool = option(True, "give SAM2 the slice's current mask as its dense prompt (--no-mask-prompt: "
                                     "do not)", flag="--no-mask-prompt", advanced=True)
    propagate: bool = option(True, "re-propagate from the corrected slices with SAM2's video memory "
                                   "(--no-propagate: change only the slices with prompts)", flag="--no-propagate",
                             advanced=True)
    max_propagation_slices: int | None = option(None, "slices re-propagated per direction (default: to the end)",
                                                ge=0, le=100_000, advanced=True)
    stop_after_empty: int = option(2, "propagation ends after this many empty slices", ge=1, le=64, cli=False)
    enforce_prompts: bool = option(True, "a box confines and an exclude point never stays inside (--no-enforce: "
                                         "SAM2's answer as is)", flag="--no-enforce", advanced=True)

    def validate(self) -> None:
        check_fields(self)
