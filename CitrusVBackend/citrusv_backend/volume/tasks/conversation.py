"""A conversation about a volume: questions asked on slices (or ROI crops of them), with their history.

Each turn shows the model one image — the slice, axis and window it was asked on, or the crop of that slice
inside a 3D ROI — or none (a text-only follow-up). The model gets the whole conversation so far, every earlier
question with its image and every earlier answer, rendered as Qwen2.5-VL's chat template renders a multi-turn,
multi-image conversation (`CitrusVProcessor.conversation_pieces`). Earlier images are re-made from the volume
(slice, axis, window and crop are recorded in each turn), so a conversation saved to JSON continues later.

What an answer holds becomes geometry on the turn's slice:
- every `[SEG]` is a mask exactly as the 2D path makes it (its hidden state -> projector -> SAM2 on that turn's
  image), written into the volume's grid by the exact inverse of the slice mapping; optionally carried through
  the volume by SAM2's video memory, the propagation Apply uses (`propagation.propagate`);
- every box (JSON `bbox_2d` or `<|box_start|>` form, in the resized image's pixels as the model writes them)
  becomes a 3D ROI one slice thick: inclusive voxel index ranges (i, j, k) in the volume's own index space.
A text-only turn's `[SEG]` and boxes refer to the latest image of the conversation (ms-swift's `citrus_v_infer`
would use the first; a conversation moves from slice to slice, so the latest is the one being talked about).

The conversation is bounded: its rendered length (every turn's image and text, and room for the new answer)
must stay within `budget_tokens`. A turn that would go over is refused with a message to start a new
conversation; nothing is dropped silently (dropping earlier images would change what the earlier answers
referred to).
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch.nn.functional as F
import torch

from ...errors import InputError, JobCancelled, TooLargeError
from ...inference.engine import CitrusVEngine, InferenceResult
from ...inference.parsing import Box, parse_boxes, scale_boxes
from ...model.processor import IMAGE_TOKENS, TASK_PIXEL_BUDGETS, PixelBudget, check_prompt_and_answer, smart_resize
from ...option_fields import same_as
from ..input.io import Volume
from ..options import VolumeOptions
from ..outputs.quantify import laterality_of, measure_segment
from ..slices.orientation import PLANES, DisplayOrientation, model_orientation
from ..slices.slice_source import SliceSource
from ..slices.windowing import Window, check_window_spec, parse_window
from .boxes import box_to_patient
from .presence import Evidence, PresenceRule
from .report import REPORT_EXPERIMENTAL
from .results import Segment, VolumeResult

CONVERSATION_FORMAT = "citrusv-conversation/1"
DEFAULT_BUDGET_TOKENS = 16384
MAX_TURNS = 64
MAX_PROMPT_CHARS = 8000
ProgressFn = Callable[[str, float, str], None]
REPORT_WORDS = re.compile(r"\breport\b", re.IGNORECASE)
REPORT_FORM = re.compile(r"<think>|<answer>|\bFINDINGS\s*:|\bIMPRESSION\s*:")


class ConversationTooLong(TooLargeError):
    """A turn would take the conversation past its token budget (HTTP 413)."""


@dataclass
class TurnRequest:
    """One question. `slice` None: a text-only follow-up (no new image). `roi`: {"ijk_min": [i, j, k],
    "ijk_max": [i, j, k]}, inclusive voxel indices that contain the slice: the model sees the slice's crop inside
    it. `answer`: a forced answer (as `segment`'s), instead of the model writing one."""

    prompt: str
    slice: int | None = None
    axis: str = same_as(VolumeOptions, "axis")
    window: str | None = same_as(VolumeOptions, "window", default=None)  # None: the training normalisation
    roi: dict | None = None
    propagate: bool = False
    answer: str | None = None
    max_new_tokens: int = same_as(VolumeOptions, "max_new_tokens")
    min_pixels: int | None = same_as(VolumeOptions, "min_pixels")
    max_pixels: int | None = same_as(VolumeOptions, "max_pixels")

    def budget(self) -> PixelBudget:
        default = TASK_PIXEL_BUDGETS["ask"]
        return PixelBudget(self.min_pixels or default.min_pixels, self.max_pixels or default.max_pixels)


@dataclass
class Turn:
    """A turn as the conversation keeps it: what was asked where, what came back, with which model."""

    number: int
    prompt: str
    answer: str
    slice: int | None                # None: a text-only turn
    axis: str | None
    window: dict | None              # the window the slice was shown with (center, width, name)
    window_spec: str | None          # as the user asked for it (None: the training normalisation)
    roi: dict | None                 # the crop, as asked
    crop: list[int] | None           # [row0, row1, col0, col1] (inclusive) of the model-oriented slice
    pixel_budget: list[int]          # [min_pixels, max_pixels]
    image_size: list[int] | None     # [height, width] of the image the model was shown
    masks_on_turn: int | None        # the turn whose image the answer's [SEG] and boxes refer to
    model: str
    random_weights: bool
    forced_answer: bool
    experimental: str                # "" or why the answer is experimental
    segments: list[dict] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    prompt_tokens: int = 0           # the rendered conversation up to this turn's answer
    answer_tokens: int = 0
    created_at: float = field(default_factory=time.time)


@dataclass
class Conversation:
    id: str
    volume: dict                     # what identifies the volume: name, shape, modality, ijk_to_ras (and its id)
    title: str | None = None
    budget_tokens: int = DEFAULT_BUDGET_TOKENS
    turns: list[Turn] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    @classmethod
    def new(cls, volume: Volume, volume_id: str | None = None, title: str | None = None,
            budget_tokens: int = DEFAULT_BUDGET_TOKENS) -> "Conversation":
        return cls(id=uuid.uuid4().hex, volume=volume_identity(volume, volume_id), title=title,
                   budget_tokens=budget_tokens)

    @property
    def tokens(self) -> int:
        """The rendered length of the conversation so far (every question, image and answer)."""
        last = self.turns[-1] if self.turns else None
        return 0 if last is None else last.prompt_tokens + last.answer_tokens + 1  # + the newline after <|im_end|>

    @property
    def random_weights(self) -> bool:
        return any(turn.random_weights for turn in self.turns)

    @property
    def experimental(self) -> bool:
        return any(turn.experimental for turn in self.turns)

    def summary(self) -> dict:
        return {"conversation_id": self.id, "volume_id": self.volume.get("volume_id"), "title": self.title,
                "turns": len(self.turns), "tokens": self.tokens, "budget_tokens": self.budget_tokens,
                "random_weights": self.random_weights, "experimental": self.experimental}

    def to_dict(self) -> dict:
        return {"format": CONVERSATION_FORMAT, "conversation_id": self.id, "volume_id": self.volume.get("volume_id"),
                "volume": self.volume, "title": self.title, "budget_tokens": self.budget_tokens,
                "tokens": self.tokens, "created_at": self.created_at, "random_weights": self.random_weights,
                "experimental": self.experimental, "turns": [asdict(turn) for turn in self.turns]}

    @classmethod
    def from_dict(cls, data: dict) -> "Conversation":
        if not isinstance(data, dict) or data.get("format") != CONVERSATION_FORMAT:
            raise InputError(f"not a CitrusV conversation (expected \"format\": \"{CONVERSATION_FORMAT}\")")
        try:
            turns = [Turn(**turn) for turn in data["turns"]]
            return cls(id=str(data["conversation_id"]), volume=dict(data["volume"]), title=data.get("title"),
                       budget_tokens=int(data["budget_tokens"]), turns=turns,
                       created_at=float(data.get("created_at") or time.time()))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"the conversation file is damaged ({type(error).__name__}: {error})") from None

    def check_volume(self, volume: Volume) -> None:
        """Refuses a volume other than the conversation's (its earlier images are re-made from it)."""
        mine, theirs = self.volume, volume_identity(volume)
        if mine["shape"] != theirs["shape"] or not np.allclose(mine["ijk_to_ras"], theirs["ijk_to_ras"], atol=1e-4):
            raise InputError(f"this conversation is about {mine.get('name')!r} of shape {mine['shape']}; "
                             f"{volume.name!r} of shape {theirs['shape']} is another volume")


def volume_identity(volume: Volume, volume_id: str | None = None) -> dict:
    return {"volume_id": volume_id, "name": volume.name, "shape": [int(n) for n in volume.shape],
            "modality": volume.modality, "ijk_to_ras": np.round(volume.geometry.ijk_to_ras(), 6).tolist()}


# ---------------------------------------------------------------------------------------------- checks

def check_turn(conversation: Conversation, volume: Volume, request: TurnRequest, max_new_tokens: int) -> None:
    """Everything about a turn that can be refused before the model runs (also at a service's submission)."""
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise InputError("the question is empty; ask something about the slice, e.g. 'What is in this slice?'")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the question has {len(request.prompt):,} characters, more than the {MAX_PROMPT_CHARS:,} allowed")
    check_prompt_and_answer(request.prompt, request.answer)
    if request.max_new_tokens > max_new_tokens:
        raise InputError(f"max_new_tokens {request.max_new_tokens} is more than allowed here ({max_new_tokens})")
    if len(conversation.turns) >= MAX_TURNS:
        raise ConversationTooLong(f"the conversation has {MAX_TURNS} turns, the most one may have; start a new "
                                  f"conversation (export this one to keep it)")
    if request.slice is None:
        if request.roi is not None:
            raise InputError("an ROI needs a slice: say which slice of the ROI to show the model")
        return
    if request.axis not in PLANES:
        raise InputError(f"unknown axis {request.axis!r}; use one of {', '.join(PLANES)}")
    check_window_spec(request.window)
    orientation = model_orientation(volume.geometry.direction, request.axis)
    depth = volume.shape[orientation.slice_axis]
    if not 0 <= request.slice < depth:
        raise InputError(f"slice {request.slice} is outside the volume's 0:{depth} along the {request.axis} axis")
    if request.roi is not None:
        roi_crop(request.roi, orientation, request.slice, volume.shape)
    height, width = _shown_size(orientation, volume.shape, request)
    smart_resize(height, width, min_pixels=request.budget().min_pixels, max_pixels=request.budget().max_pixels)


def budget_problem(conversation: Conversation, new_tokens: int, max_new_tokens: int) -> str | None:
    """Why a turn adding `new_tokens` (its question, image and template) with room for `max_new_tokens` of
    answer would not fit the conversation's budget; None when it fits. The one rule, at submission (with an
    upper bound of `new_tokens`) and when the turn runs (exact)."""
    total = conversation.tokens + new_tokens + max_new_tokens
    if total <= conversation.budget_tokens:
        return None
    return (f"turn {len(conversation.turns) + 1} would make the conversation {total:,} tokens ({conversation.tokens:,} "
            f"so far, {new_tokens:,} for this question and its image, {max_new_tokens:,} of room for the answer), over "
            f"its budget of {conversation.budget_tokens:,}; start a new conversation (export this one to keep it), "
            f"or ask with fewer max_new_tokens")


def estimated_turn_tokens(volume: Volume, request: TurnRequest, merge_size: int = 2) -> int:
    """An upper bound of what a turn adds, without the tokenizer: its image's placeholders, one token per byte
    of the question (a byte-level BPE token is at least one byte) and the template's tokens."""
    template = 12  # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n and the image block's two marks
    if request.slice is None:
        return template + len(request.prompt.encode())
    orientation = model_orientation(volume.geometry.direction, request.axis)
    height, width = _shown_size(orientation, volume.shape, request)
    budget = request.budget()
    h, w = smart_resize(height, width, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    return template + len(request.prompt.encode()) + (h // 14) * (w // 14) // (merge_size ** 2)


def roi_crop(roi: dict, orientation: DisplayOrientation, index: int, shape) -> tuple[int, int, int, int]:
    """The ROI's rows and columns (inclusive) on slice `index` of the model-oriented slices; refuses an ROI
    outside the volume, inverted, or not containing the slice."""
    try:
        low = [int(v) for v in roi["ijk_min"]]
        high = [int(v) for v in roi["ijk_max"]]
    except (KeyError, TypeError, ValueError):
        raise InputError('the ROI must be {"ijk_min": [i, j, k], "ijk_max": [i, j, k]} (voxel indices)') from None
    if len(low) != 3 or len(high) != 3:
        raise InputError("the ROI's ijk_min and ijk_max need three voxel indices each (i, j, k)")
    size_ijk = [shape[2], shape[1], shape[0]]
    for axis, (a, b, n) in enumerate(zip(low, high, size_ijk)):
        if not (0 <= a <= b < n):
            raise InputError(f"the ROI's {'ijk'[axis]} range {a}..{b} is not inside the volume's 0..{n - 1} "
                             f"(or is inverted)")
    kji_low, kji_high = low[::-1], high[::-1]
    if not kji_low[orientation.slice_axis] <= index <= kji_high[orientation.slice_axis]:
        raise InputError(f"slice {index} is outside the ROI ({kji_low[orientation.slice_axis]}.."
                         f"{kji_high[orientation.slice_axis]} along that axis); ask on a slice through the ROI")
    height, width = orientation.plane_shape(shape)
    rows = _oriented(kji_low[orientation.row_axis], kji_high[orientation.row_axis], height, orientation.flip_rows)
    cols = _oriented(kji_low[orientation.col_axis], kji_high[orientation.col_axis], width, orientation.flip_cols)
    return rows[0], rows[1], cols[0], cols[1]


def _oriented(low: int, high: int, size: int, flipped: bool) -> tuple[int, int]:
    return ((size - 1) - high, (size - 1) - low) if flipped else (low, high)


def _shown_size(orientation: DisplayOrientation, shape, request: TurnRequest) -> tuple[int, int]:
    if request.roi is None:
        return orientation.plane_shape(shape)
    r0, r1, c0, c1 = roi_crop(request.roi, orientation, request.slice, shape)
    return r1 - r0 + 1, c1 - c0 + 1


# ---------------------------------------------------------------------------------------------- the turn

@dataclass
class ShownImage:
    """What the model was shown on a turn: a slice (axis, window), or its crop inside an ROI."""

    turn: int
    slice: int
    axis: str
    window: Window
    roi: dict | None
    crop: list[int] | None           # [row0, row1, col0, col1] of the model-oriented slice (inclusive)
    budget: PixelBudget

    @classmethod
    def of(cls, turn: Turn) -> "ShownImage":
        return cls(turn.number, turn.slice, turn.axis, Window(**turn.window), turn.roi, turn.crop,
                   PixelBudget(*turn.pixel_budget))

    def pixels(self, volume: Volume) -> tuple[SliceSource, np.ndarray]:
        source = SliceSource(volume, self.axis, self.window)
        image = source.gray(self.slice)
        if self.crop is not None:
            r0, r1, c0, c1 = self.crop
            image = np.ascontiguousarray(image[r0:r1 + 1, c0:c1 + 1])
        return source, image

    def prepare(self, volume: Volume, processor, sam2: bool):
        """(its slice source, its prepared image at its pixel budget)."""
        source, image = self.pixels(volume)
        return source, processor.prepare_image(image, self.budget, sam2=sam2)


@dataclass
class TurnOutcome:
    turn: Turn
    result: VolumeResult             # the turn's segments (in the volume's grid) and boxes, as a volume result
    inference: InferenceResult


class ConversationRunner:
    """Asks turns of conversations with one engine; `progress(stage, fraction, message)` carries the answer's
    text while it is written (stage "answering", message = the text so far)."""

    def __init__(self, engine: CitrusVEngine, model_name: str, progress: ProgressFn | None = None,
                 should_cancel: Callable[[], bool] | None = None):
        self.engine = engine
        self.model_name = model_name
        self.progress = progress or (lambda stage, fraction, message: None)
        self.should_cancel = should_cancel or (lambda: False)

    def ask(self, conversation: Conversation, volume: Volume, request: TurnRequest,
            max_new_tokens: int | None = None) -> TurnOutcome:
        """Runs one turn and appends it to `conversation` (only when it succeeded)."""
        check_turn(conversation, volume, request, max_new_tokens or request.max_new_tokens)
        conversation.check_volume(volume)
        processor = self.engine.processor
        self.progress("preparing", 0.0, "re-making the conversation's images")
        history, latest = self._history(conversation, volume)
        number = len(conversation.turns) + 1
        budget = request.budget()
        if request.slice is not None:
            window = parse_window(request.window, request.prompt, volume.modality, volume.voxels)
            crop = None if request.roi is None else list(roi_crop(
                request.roi, model_orientation(volume.geometry.direction, request.axis), request.slice, volume.shape))
            shown = ShownImage(number, request.slice, request.axis, window, request.roi, crop, budget)
        else:
            shown = latest  # a text-only turn: the answer's [SEG] and boxes refer to the latest image (None: none yet)
        source, focus = (None, None) if shown is None else shown.prepare(volume, processor, sam2=True)
        history.append((request.prompt, [focus] if request.slice is not None else [], None))
        inputs = processor.conversation_inputs(history, focus, answer=request.answer)
        problem = budget_problem(conversation, inputs.prompt_length - conversation.tokens, request.max_new_tokens)
        if problem:
            raise ConversationTooLong(problem)
        if self.should_cancel():
            raise JobCancelled("cancelled by the user")
        written: list[str] = []

        def on_text(piece: str) -> None:
            written.append(piece)
            self.progress("answering", min(0.9, 0.05 + 0.85 * len(written) / request.max_new_tokens), "".join(written))

        self.progress("answering", 0.05, "")
        inference = self.engine.run_inputs(inputs, request.prompt, task="ask", answer=request.answer,
                                           max_new_tokens=request.max_new_tokens, on_text=on_text,
                                           should_cancel=self.should_cancel)
        own = request.slice is not None
        turn = Turn(number=number, prompt=request.prompt, answer=inference.text, slice=request.slice,
                    axis=request.axis if own else None, window=shown.window.__dict__ if own else None,
                    window_spec=request.window if own else None, roi=request.roi, crop=shown.crop if own else None,
                    pixel_budget=[budget.min_pixels, budget.max_pixels],
                    image_size=list(focus.original_size) if own else None,
                    masks_on_turn=None if shown is None else shown.turn, model=self.model_name,
                    random_weights=inference.random_weights, forced_answer=inference.forced_answer,
                    experimental=experimental_note(request.prompt, inference.text, volume.modality),
                    problems=list(inference.problems), prompt_tokens=inputs.prompt_length,
                    answer_tokens=len(inference.generated_ids))
        result = VolumeResult(task="ask", prompt=request.prompt, case=volume.name,
                              labels=np.zeros(volume.shape, np.uint8), random_weights=inference.random_weights,
                              experimental=turn.experimental, problems=turn.problems, timings=inference.timings,
                              settings={"conversation_id": conversation.id, "turn": number})
        result.source = source or SliceSource(volume, request.axis, parse_window(request.window, request.prompt,
                                                                                 volume.modality, volume.voxels))
        if shown is not None:
            self._segments(inference, turn, result, volume, source, (shown.axis, shown.slice), shown.crop,
                           request.propagate)
            self._boxes(inference, turn, result, volume, source, shown.slice, shown.crop)
            result.settings |= {"slice": shown.slice, "axis": shown.axis, "window": shown.window.__dict__}
        conversation.turns.append(turn)
        self.progress("done", 1.0, inference.text)
        return TurnOutcome(turn=turn, result=result, inference=inference)

    # ------------------------------------------------------------------------------------------ helpers

    def _history(self, conversation: Conversation, volume: Volume) -> tuple[list, "ShownImage | None"]:
        """The earlier turns as the model sees them again (their images re-made from the volume), and the latest
        image shown."""
        history, latest = [], None
        for turn in conversation.turns:
            images = []
            if turn.slice is not None:
                latest = ShownImage.of(turn)
                images = [latest.prepare(volume, self.engine.processor, sam2=False)[1]]
            history.append((turn.prompt, images, _history_text(turn.answer)))
        return history, latest

    def _segments(self, inference: InferenceResult, turn: Turn, result: VolumeResult, volume: Volume,
                  source: SliceSource, where: tuple[str, int], crop, propagate: bool) -> None:
        axis, index = where
        rule = PresenceRule("mask")
        many = len(inference.masks) > 1
        for number, mask in enumerate(inference.masks, start=1):
            plane = np.zeros((source.height, source.width), bool)
            if crop is None:
                plane[:] = mask.mask
            else:
                plane[crop[0]:crop[1] + 1, crop[2]:crop[3] + 1] = mask.mask
            evidence = Evidence.from_logits(mask.low_res_logits, mask.object_score, mask.iou)
            segment = Segment(label=number, name=f"turn {turn.number}" + (f" [SEG] {number}" if many else ""),
                              query=turn.prompt, mask=np.zeros(volume.shape, bool), key_slice=index,
                              key_score=rule.score(evidence), answer=turn.answer,
                              answer_source="forced" if turn.forced_answer else "generated",
                              answer_note=f"[SEG] {number} of the answer to turn {turn.number}, on "
                                          f"{axis} slice {index}",
                              key_evidence=evidence.to_dict())
            source.orientation.put_slice(segment.mask, index, plane)
            if propagate and plane.any():
                self.progress("propagating", 0.92, f"{segment.name} through the volume")
                for other, item in propagate_mask(self.engine, source, index, plane, turn.pixel_budget,
                                                  self.should_cancel).items():
                    if other != index and item.present:
                        source.orientation.put_slice(segment.mask, other, item.mask)
            if not plane.any():
                turn.problems.append(f"{segment.name}: the [SEG] gave an empty mask on slice {index}")
            axis_sum = tuple(a for a in range(3) if a != source.orientation.slice_axis)
            segment.slices = sorted(np.nonzero(segment.mask.any(axis=axis_sum))[0].tolist())
            measurements = measure_segment(segment.mask, volume.geometry, volume.voxels, source.orientation.slice_axis)
            segment.measurements = measurements.to_dict()
            if segment.mask.any():
                segment.laterality = laterality_of(measurements.centroid_lps, volume.geometry, volume.shape)
            result.labels[segment.mask & (result.labels == 0)] = number
            result.segments.append(segment)
            turn.segments.append({"label": number, "name": segment.name, "slice": index,
                                  "slices": [segment.slices[0], segment.slices[-1]] if segment.slices else [],
                                  "voxels": int(segment.mask.sum()), "propagated": bool(propagate),
                                  "volume_ml": segment.measurements.get("volume_ml")})

    def _boxes(self, inference: InferenceResult, turn: Turn, result: VolumeResult, volume: Volume,
               source: SliceSource, index: int, crop) -> None:
        parsed = parse_boxes(inference.text)
        turn.problems.extend(parsed.problems)
        if not parsed.boxes:
            return
        boxes = scale_boxes(parsed.boxes, inference.resized_size, inference.original_size)
        row0, col0 = (crop[0], crop[2]) if crop else (0, 0)
        for box in boxes:
            on_slice = Box(box.x1 + col0, box.y1 + row0, box.x2 + col0, box.y2 + row0, box.label)
            # The detect task's description (patient coordinates, size, laterality) and the voxels it covers.
            entry = box_to_patient({"box": on_slice, "first": index, "last": index}, source) \
                | box_roi(on_slice, source.orientation, index, volume.shape) | {"turn": turn.number}
            result.boxes.append(entry)
            turn.boxes.append(entry)


def _history_text(answer: str) -> str:
    """An earlier answer as the model sees it again: image placeholders it may have written are removed (they
    would claim images the conversation does not have)."""
    for token in IMAGE_TOKENS:
        answer = answer.replace(token, "")
    return answer


def box_roi(box, orientation: DisplayOrientation, index: int, shape) -> dict:
    """A box in a model-oriented slice's pixels (edges on pixel borders) -> the voxels it covers on that slice:
    inclusive (i, j, k) index ranges, one slice thick."""
    height, width = orientation.plane_shape(shape)
    first_row = min(max(int(np.floor(box.y1)), 0), height - 1)
    last_row = min(max(int(np.ceil(box.y2)) - 1, first_row), height - 1)
    first_col = min(max(int(np.floor(box.x1)), 0), width - 1)
    last_col = min(max(int(np.ceil(box.x2)) - 1, first_col), width - 1)
    rows = np.array([first_row, first_row, last_row, last_row], float)
    cols = np.array([first_col, last_col, first_col, last_col], float)
    kji = orientation.display_to_index(index, rows, cols, shape)
    low, high = kji.min(axis=0).astype(int), kji.max(axis=0).astype(int)
    return {"label": box.label or "", "ijk_min": low[::-1].tolist(), "ijk_max": high[::-1].tolist(), "slice": index,
            "box_slice_pixels": [first_col, first_row, last_col + 1, last_row + 1]}


def experimental_note(prompt: str, answer: str, modality: str) -> str:
    """Why a turn's answer is experimental: a report (asked for, or written in the report's form) on anything but
    a chest radiograph, which is all Citrus-V's reports were trained on."""
    if REPORT_WORDS.search(prompt) or REPORT_FORM.search(answer):
        return REPORT_EXPERIMENTAL.format(what=f"{modality} slices")
    return ""


def propagate_mask(engine: CitrusVEngine, source: SliceSource, index: int, plane: np.ndarray, pixel_budget,
                   should_cancel: Callable[[], bool]) -> dict:
    """A slice's mask carried through the volume by SAM2's video memory, as Apply's propagation does (same
    frames, presence rule and stopping), anchored on the mask itself."""
    from .propagation import Cancelled, SliceFrames, propagate

    grounding = engine.model.grounding_encoder
    size = grounding.image_size
    budget = PixelBudget(*pixel_budget)
    frames = SliceFrames(source.gray, 0, source.depth, budget, size, prep=engine.processor.fast)
    anchor = F.interpolate(torch.from_numpy(plane.astype(np.float32))[None, None], size=(size, size),
                           mode="nearest")[0, 0] > 0.5
    predictor = engine.video_predictor()
    rule = PresenceRule("mask")
    try:
        return propagate(predictor, frames, source.height, source.width, {index: anchor.numpy()},
                         autocast=grounding._autocast(next(predictor.parameters()).device),
                         should_cancel=should_cancel,
                         presence=lambda logits, object_score: rule.present(Evidence.from_logits(logits, object_score)))
    except Cancelled:
        raise JobCancelled("cancelled by the user") from None
    finally:
        frames.stop()


# ---------------------------------------------------------------------------------------------- export

def conversation_markdown(conversation: Conversation, slice_image_links: dict[int, str] | None = None) -> str:
    """The conversation for people: each turn's question, where it was asked (slice, axis, window, ROI), the
    answer, its segments and ROIs; RANDOM WEIGHTS and EXPERIMENTAL markings where they apply.
    `slice_image_links`: turn number -> a picture of the turn's slice (a file name or a data URI)."""
    volume = conversation.volume
    lines = [f"# Conversation {conversation.title or conversation.id}", ""]
    if conversation.random_weights:
        lines += ["> **RANDOM WEIGHTS** — answers in this conversation came from a model with random weights; they "
                  "mean nothing.", ""]
    if conversation.experimental:
        lines += ["> **EXPERIMENTAL** — some answers are reports on images Citrus-V's reports were not trained on "
                  "(see the turns marked below).", ""]
    lines += [f"Volume: {volume.get('name')} ({volume.get('modality')}, shape {volume.get('shape')}), "
              f"conversation `{conversation.id}`, {len(conversation.turns)} turn(s), {conversation.tokens:,} of "
              f"{conversation.budget_tokens:,} tokens.", ""]
    for turn in conversation.turns:
        lines.append(f"## Turn {turn.number}")
        lines.append("")
        if turn.slice is None:
            where = "text only" + (f" (masks and boxes on turn {turn.masks_on_turn}'s image)" if turn.masks_on_turn else "")
        else:
            window = turn.window or {}
            where = (f"{turn.axis} slice {turn.slice}, window {window.get('name')} "
                     f"({window.get('center', 0):.0f}/{window.get('width', 0):.0f})")
            if turn.roi:
                where += f", ROI ijk {turn.roi['ijk_min']}..{turn.roi['ijk_max']}"
        lines += [f"*Asked on:* {where}  ", f"*Model:* {turn.model}"
                  + (" — **RANDOM WEIGHTS**" if turn.random_weights else "")
                  + (" — forced answer" if turn.forced_answer else ""), ""]
        if slice_image_links and turn.number in slice_image_links:
            lines += [f"![turn {turn.number}: {turn.axis} slice {turn.slice}]({slice_image_links[turn.number]})", ""]
        lines += ["**Question:**", "", _fenced(turn.prompt), "", "**Answer:**", "", _fenced(turn.answer), ""]
        if turn.experimental:
            lines += [f"> {turn.experimental}", ""]
        for segment in turn.segments:
            extent = segment["slices"]
            lines.append(f"- Segment *{segment['name']}* (label {segment['label']}) on slice {segment['slice']}: "
                         f"{segment['voxels']:,} voxels" + (f", slices {extent[0]}..{extent[1]}" if extent else "")
                         + (f", {segment['volume_ml']:.2f} mL" if segment.get("volume_ml") is not None else "")
                         + (" (propagated)" if segment.get("propagated") else ""))
        for box in turn.boxes:
            lines.append(f"- ROI *{box['label'] or 'box'}*: ijk {box['ijk_min']}..{box['ijk_max']}")
        for problem in turn.problems:
            lines.append(f"- Problem: {problem}")
        if turn.segments or turn.boxes or turn.problems:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _fenced(text: str) -> str:
    """Text shown verbatim in Markdown: a fence longer than any run of backticks in it (answers hold ```json)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def turn_slice_png(volume: Volume, turn: Turn) -> bytes | None:
    """The picture of what the model was shown on a turn (its slice or crop, in the model's orientation)."""
    if turn.slice is None:
        return None
    import io

    from PIL import Image

    _, image = ShownImage.of(turn).pixels(volume)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
