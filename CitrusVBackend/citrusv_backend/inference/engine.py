"""The four 2D tasks on one image — ask, segment, detect, report — with the reference's exact model path.

One language-model pass gives both the text and the `[SEG]` hidden states: a forward hook on the final
RMSNorm records `hidden_states[-1]` for every position as generation goes (the prompt at prefill, one row
per decoding step), so nothing is generated twice and no mask can be lost to a shorter second pass (the
reference generates twice). With a forced answer (`answer="Sure, it is [SEG]."`) there is no decoding at all:
one prefill of prompt + answer. SAM2's image features are computed once per image, however many `[SEG]`.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, JobCancelled
from ..model.feature_cache import SAM2FeatureCache, split_backbone, stack_backbones
from ..model.loader import LoadedModel, load_citrusv
from ..model.processor import TASK_PIXEL_BUDGETS, ModelInputs, PixelBudget
from .hostwork import POSTPROCESS, HostStats
from .images import load_image
from .parsing import parse_boxes, scale_boxes
from .reports import ParsedReport, parse_report
from .streaming import TextDeltaStreamer

log = logging.getLogger(__name__)

TASKS = ("ask", "segment", "detect", "report")
MASK_UPSAMPLING = ("bilinear", "nearest")
DEFAULT_MAX_NEW_TOKENS = 1024
FORCED_SEGMENT_ANSWER = "Sure, it is [SEG]."


@dataclass
class SegmentationMask:
    """One `[SEG]` token's mask and everything that led to it."""

    token_position: int          # index of the [SEG] token in the full sequence
    seg_hidden: np.ndarray       # [H] last-layer state at the [SEG] position
    seg_embedding: np.ndarray    # [C] projector output (SAM2 prompt token)
    low_res_logits: np.ndarray   # [256, 256] float32, SAM2's stretched-square frame
    mask: np.ndarray             # [H_img, W_img] bool at the original image size
    iou: float                   # SAM2's predicted IoU of the chosen candidate
    object_score: float          # SAM2's object-score logit (never used to suppress, as in the reference)


@dataclass
class InferenceResult:
    task: str
    prompt: str
    text: str
    forced_answer: bool
    input_ids: list[int]
    generated_ids: list[int]
    original_size: tuple[int, int] | None   # None: a text-only question
    resized_size: tuple[int, int] | None
    image_grid_thw: list[int]
    masks: list[SegmentationMask] = field(default_factory=list)
    boxes: list = field(default_factory=list)            # parsing.Box in original-image pixels
    boxes_resized: list = field(default_factory=list)    # the same, as the model wrote them
    report: ParsedReport | None = None
    problems: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    random_weights: bool = False
    mask_upsampling: str = "bilinear"

    def to_json_dict(self) -> dict:
        return {
            "task": self.task, "prompt": self.prompt, "text": self.text, "forced_answer": self.forced_answer,
            "random_weights": self.random_weights, "input_ids": self.input_ids, "generated_ids": self.generated_ids,
            "original_size": _listed(self.original_size), "resized_size": _listed(self.resized_size),
            "image_grid_thw": self.image_grid_thw, "mask_upsampling": self.mask_upsampling,
            "masks": [{"token_position": m.token_position, "iou": m.iou, "object_score": m.object_score,
                       "pixels": int(m.mask.sum())} for m in self.masks],
            "boxes": [b.to_dict() for b in self.boxes], "boxes_resized": [b.to_dict() for b in self.boxes_resized],
            "report": self.report.to_dict() if self.report is not None else None,
            "problems": self.problems, "timings": self.timings,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The NPZ payload: shapes hold for zero masks too."""
        height, width = self.original_size or (0, 0)
        hidden = self.masks[0].seg_hidden.shape[0] if self.masks else 0
        embed = self.masks[0].seg_embedding.shape[0] if self.masks else 0
        side = self.masks[0].low_res_logits.shape if self.masks else (256, 256)
        stack = lambda name, shape, dtype: (np.stack([getattr(m, name) for m in self.masks]).astype(dtype)  # noqa: E731
                                            if self.masks else np.zeros((0, *shape), dtype))
        return {"low_res_logits": stack("low_res_logits", side, np.float32),
                "masks": stack("mask", (height, width), bool),
                "seg_hidden": stack("seg_hidden", (hidden,), np.float32),
                "seg_embedding": stack("seg_embedding", (embed,), np.float32),
                "iou": np.array([m.iou for m in self.masks], np.float32),
                "object_score": np.array([m.object_score for m in self.masks], np.float32)}


def _listed(size: tuple[int, int] | None) -> list[int] | None:
    return None if size is None else list(size)


@contextmanager
def record_final_hidden_states(module: torch.nn.Module):
    """Collect the output of `module` (the final norm) for every forward call while active."""
    recorded: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _inp, out: recorded.append(out.detach()))
    try:
        yield recorded
    finally:
        handle.remove()


def upsample_mask(low_res_logits: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """[N, h, w] logits -> [N, H, W] bool.

    "bilinear" (default, Sa2VA's way): interpolate the logits, threshold at 0 — smoother edges for large images.
    "nearest" (the reference's clients): threshold at 256x256 (sigmoid > 0.5), then PIL nearest resize.
    """
    if mode == "bilinear":
        up = F.interpolate(low_res_logits[:, None].float(), size=size, mode="bilinear", align_corners=False)
        return up[:, 0] > 0
    if mode == "nearest":
        binary = (torch.sigmoid(low_res_logits.float()) > 0.5).cpu().numpy().astype(np.uint8) * 255
        resized = [np.asarray(Image.fromarray(m).resize((size[1], size[0]), Image.NEAREST)) > 0 for m in binary]
        return torch.from_numpy(np.stack(resized)) if resized else torch.zeros((0, *size), dtype=torch.bool)
    raise InputError(f"unknown mask upsampling {mode!r}; use one of {', '.join(MASK_UPSAMPLING)}")


class CitrusVEngine:
    """Runs the 2D tasks with one loaded model."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        tokenizer = self.processor.tokenizer
        self.stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        self._video_predictor = None

    @classmethod
    def load(cls, model, device: str | None = None, dtype: str | None = None, attention: str | None = None):
        return cls(load_citrusv(model, device=device, dtype=dtype, attention=attention))

    # ------------------------------------------------------------------------------------------ text side

    @staticmethod
    def _cancellation(should_cancel: Callable[[], bool] | None):
        """A stopping criterion that aborts decoding (JobCancelled) once `should_cancel()` says so."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if should_cancel():
                    raise JobCancelled("cancelled while decoding")
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([Cancelled()] if should_cancel is not None else [])

    def _generation_config(self, max_new_tokens: int, repetition_penalty: float | None):
        from transformers import GenerationConfig

        penalty = repetition_penalty if repetition_penalty is not None else \
            self.loaded.generation_defaults.get("repetition_penalty", 1.0)
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=penalty,
                                eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[-1])

    @property
    def context_length(self) -> int | None:
        """The language model's longest sequence (prompt + answer), from its config."""
        return getattr(self.model.mllm.config.get_text_config(), "max_position_embeddings", None)

    @torch.inference_mode()
    def language_pass(self, inputs: ModelInputs, forced: bool, max_new_tokens: int,
                      repetition_penalty: float | None = None,
                      on_text: Callable[[str], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(full token sequence [T], last-layer hidden states [T', H] aligned with it, T' >= T - 1).

        `on_text`: called on this thread with each new piece of the answer's text while it is generated.
        `should_cancel` is asked after every decoded token: True aborts with JobCancelled."""
        mllm = self.model.mllm
        kwargs = inputs.qwen_kwargs(self.model.device, self.model.dtype)
        with record_final_hidden_states(self.model.final_norm) as recorded:
            if forced:
                mllm(**kwargs, use_cache=False, logits_to_keep=1)
                sequence = kwargs["input_ids"][0]
            else:
                streamer = None if on_text is None else TextDeltaStreamer(self.processor.decode, self.stop_ids, on_text)
                output = mllm.generate(**kwargs, generation_config=self._generation_config(max_new_tokens, repetition_penalty),
                                       stopping_criteria=self._cancellation(should_cancel), return_dict_in_generate=True,
                                       streamer=streamer)
                sequence = output.sequences[0]
        hidden = torch.cat(recorded, dim=1)[0]
        if sequence[-1].item() == self.processor.seg_token_idx and hidden.size(0) < sequence.size(0):
            # Generation stopped right after a [SEG] (token budget): its state was never computed.
            hidden = self._forced_hidden_batch([inputs.with_sequence(sequence, self.processor.image_token_id)])[0]
        return sequence, hidden

    # ------------------------------------------------------------------------------------------ mask side

    def video_predictor(self):
        """SAM2's video predictor over this model's SAM2 tensors, built once (every volume job reuses it)."""
        if self._video_predictor is None:
            from ..model.sam2_support import build_sam2_video_predictor, resolve_sam2_config

            config_path = resolve_sam2_config(self.loaded.config.sam2_config_name, self.loaded.checkpoint_dir)
            self._video_predictor = build_sam2_video_predictor(config_path, self.model.grounding_encoder.sam2_model)
        return self._video_predictor

    @torch.inference_mode()
    def encode_sam2(self, sam2_pixel_values: torch.Tensor):
        return self.model.grounding_encoder.encode_images(sam2_pixel_values.to(self.model.device, self.model.dtype))

    @torch.inference_mode()
    def sam2_features(self, batch: list[ModelInputs], keys: list[Hashable] | None = None,
                      cache: SAM2FeatureCache | None = None):
        """SAM2 image features of a batch, each image encoded at most once per `cache` (see feature_cache.py).

        Rows found in `cache` need no `sam2_pixel_values`; the others are encoded together and stored."""
        if cache is None or keys is None:
            return self.encode_sam2(torch.cat([inputs.sam2_pixel_values for inputs in batch]))
        grounding = self.model.grounding_encoder
        found = [cache.get(key) for key in keys]
        missing = [row for row, entry in enumerate(found) if entry is None]
        if missing:
            pixels = torch.cat([batch[row].sam2_pixel_values for row in missing])
            backbone = grounding.backbone(pixels.to(self.model.device, self.model.dtype))
            for row, entry in zip(missing, split_backbone(backbone)):
                cache.put(keys[row], entry)
                found[row] = entry
            if len(missing) == len(batch):
                return grounding.features_from_backbone(backbone)
        return grounding.features_from_backbone(stack_backbones(found))

    @torch.inference_mode()
    def masks_for(self, inputs: ModelInputs, sequence: torch.Tensor, hidden: torch.Tensor,
                  upsampling: str, timings: dict, features=None, row: int = 0,
                  host: HostStats | None = None) -> list[SegmentationMask]:
        """Masks of every [SEG] in `sequence`; `features`/`row`: SAM2 features already computed for a batch."""
        positions = (sequence[: hidden.size(0)] == self.processor.seg_token_idx).nonzero().flatten()
        # Only the answer's [SEG]: a conversation's history holds earlier answers' [SEG] tokens, masks of other turns.
        positions = positions[positions >= inputs.prompt_length]
        # No [SEG], or no image to segment (a text-only question; an image whose SAM2 features come from a
        # cache has no SAM2 input but does have its size).
        if positions.numel() == 0 or inputs.original_size is None:
            return []
        grounding = self.model.grounding_encoder
        seg_hidden = hidden[positions]
        embeddings = self.model.project_seg(seg_hidden)
        if features is None:
            started = time.perf_counter()
            features = self.encode_sam2(inputs.sam2_pixel_values)
            timings["sam2_image_encoder_s"] = time.perf_counter() - started
        started = time.perf_counter()
        prediction = grounding.decode_masks(features.select(torch.full_like(positions, row)), embeddings)
        if host is not None and prediction.low_res_logits.is_cuda:
            torch.cuda.synchronize(prediction.low_res_logits.device)  # the decoder's time is not host time
        with host.work(POSTPROCESS, critical=True) if host is not None else nullcontext():
            masks = upsample_mask(prediction.low_res_logits, inputs.original_size, upsampling)
            timings["mask_decoder_s"] = time.perf_counter() - started
            return [SegmentationMask(
                token_position=int(positions[i]), seg_hidden=seg_hidden[i].float().cpu().numpy(),
                seg_embedding=embeddings[i, 0].float().cpu().numpy(),
                low_res_logits=prediction.low_res_logits[i].cpu().numpy(), mask=masks[i].cpu().numpy(),
                iou=float(prediction.iou[i]), object_score=float(prediction.object_score[i]))
                for i in range(positions.numel())]

    @torch.inference_mode()
    def seg_embeddings(self, image, prompt: str, answer: str = FORCED_SEGMENT_ANSWER,
                       budget: PixelBudget | None = None) -> torch.Tensor:
        """[n, 1, C] projected [SEG] tokens of a forced answer on one image (one prefill, no SAM2): the text
        prompt as SAM2 receives it, for refinement that keeps it beside clicks."""
        inputs = self.processor(load_image(image), prompt, budget or TASK_PIXEL_BUDGETS["segment"], answer=answer)
        hidden = self._forced_hidden_batch([inputs])[0]
        positions = (inputs.input_ids[0].to(hidden.device) == self.processor.seg_token_idx).nonzero().flatten()
        if positions.numel() == 0:
            raise InputError(f"the answer {answer!r} has no [SEG] token, so the text gives SAM2 no prompt")
        return self.model.project_seg(hidden[positions])

    # ------------------------------------------------------------------------------------------ tasks

    def run(self, image, prompt: str, task: str = "ask", answer: str | None = None, min_pixels: int | None = None,
            max_pixels: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            mask_upsampling: str = "bilinear", repetition_penalty: float | None = None,
            allow_empty_prompt: bool = False, on_text: Callable[[str], None] | None = None,
            should_cancel: Callable[[], bool] | None = None) -> InferenceResult:
        """One 2D task. `image` None: a text-only question (no masks, no boxes in image pixels).
        `max_new_tokens` is clipped to what the model's context leaves after the prompt (as ms-swift does);
        `on_text` receives the answer's text piece by piece while it is generated (not for forced answers);
        `should_cancel()` is asked before the model runs and after every decoded token (a client that hung up,
        a cancelled job): True raises JobCancelled."""
        if task not in TASKS:
            raise InputError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        if mask_upsampling not in MASK_UPSAMPLING:
            raise InputError(f"unknown mask upsampling {mask_upsampling!r}; use one of {', '.join(MASK_UPSAMPLING)}")
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image = None if image is None else load_image(image)
        default = TASK_PIXEL_BUDGETS[task]
        budget = PixelBudget(min_pixels or default.min_pixels, max_pixels or default.max_pixels)
        inputs = self.processor(image, prompt, budget, answer=answer, allow_empty=allow_empty_prompt)
        timings["preprocess_s"] = time.perf_counter() - started
        return self.run_inputs(inputs, prompt, task, answer, max_new_tokens, mask_upsampling, repetition_penalty,
                               on_text, should_cancel, timings, started)

    def run_inputs(self, inputs: ModelInputs, prompt: str, task: str = "ask", answer: str | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, mask_upsampling: str = "bilinear",
                   repetition_penalty: float | None = None, on_text: Callable[[str], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None, timings: dict | None = None,
                   started: float | None = None) -> InferenceResult:
        """`run` on inputs already made (a conversation's several images and turns, `processor.
        conversation_inputs`): the answer (generated, or forced when `answer` is given), its masks on the
        inputs' SAM2 image, its text parsed for the task."""
        timings = {} if timings is None else timings
        started = time.perf_counter() if started is None else started
        max_new_tokens = self._clip_to_context(max_new_tokens, inputs.prompt_length)
        if should_cancel is not None and should_cancel():
            raise JobCancelled("cancelled before the model ran")

        step = time.perf_counter()
        sequence, hidden = self.language_pass(inputs, answer is not None, max_new_tokens, repetition_penalty, on_text,
                                              should_cancel)
        timings["forced_prefill_s" if answer is not None else "generate_s"] = time.perf_counter() - step
        masks = self.masks_for(inputs, sequence, hidden, mask_upsampling, timings)
        result = self._result(task, prompt, answer, inputs, sequence, masks, mask_upsampling)
        timings["total_s"] = time.perf_counter() - started
        result.timings = {k: round(v, 4) for k, v in timings.items()}
        return result

    def _clip_to_context(self, max_new_tokens: int, prompt_length: int) -> int:
        context = self.context_length
        if context is None:
            return max_new_tokens
        if prompt_length >= context:
            raise InputError(f"the prompt is {prompt_length} tokens, as long as the model's whole context ({context}); "
                             f"shorten the question or send a smaller image (max_pixels)")
        return min(max_new_tokens, context - prompt_length)

    def _result(self, task, prompt, answer, inputs: ModelInputs, sequence: torch.Tensor, masks,
                mask_upsampling: str) -> InferenceResult:
        generated = sequence[inputs.prompt_length:].tolist()
        result = InferenceResult(
            task=task, prompt=prompt, text=self.processor.decode([t for t in generated if t not in self.stop_ids]),
            forced_answer=answer is not None, input_ids=inputs.input_ids[0, : inputs.prompt_length].tolist(),
            generated_ids=generated, original_size=inputs.original_size, resized_size=inputs.resized_size,
            image_grid_thw=[] if inputs.image_grid_thw is None else inputs.image_grid_thw[0].tolist(), masks=masks,
            random_weights=self.loaded.random_weights, mask_upsampling=mask_upsampling)
        self._parse_text(result)
        return result

    @torch.inference_mode()
    def segment_batch(self, images: list, prompt: str, answer: str = FORCED_SEGMENT_ANSWER,
                      min_pixels: int | None = None, max_pixels: int | None = None,
                      mask_upsampling: str = "bilinear") -> list[InferenceResult]:
        """Forced-answer segmentation of several images: one prefill and one SAM2 encoding per group.

        A volume's slices share one size and so one sequence length, so they batch without padding (the
        outputs equal one-by-one runs up to float rounding). Images of other sizes form their own groups."""
        if mask_upsampling not in MASK_UPSAMPLING:
            raise InputError(f"unknown mask upsampling {mask_upsampling!r}; use one of {', '.join(MASK_UPSAMPLING)}")
        default = TASK_PIXEL_BUDGETS["segment"]
        budget = PixelBudget(min_pixels or default.min_pixels, max_pixels or default.max_pixels)
        prepared = [self.processor(load_image(image), prompt, budget, answer=answer) for image in images]
        return self.segment_inputs(prepared, prompt, answer, mask_upsampling)

    @torch.inference_mode()
    def segment_inputs(self, prepared: list[ModelInputs], prompt: str, answer: str = FORCED_SEGMENT_ANSWER,
                       mask_upsampling: str = "bilinear", feature_keys: list[Hashable] | None = None,
                       feature_cache: SAM2FeatureCache | None = None,
                       host: HostStats | None = None) -> list[InferenceResult]:
        """`segment_batch` on inputs already made (e.g. prefetched); `feature_keys`/`feature_cache`: SAM2
        features reused across calls; `host`: where the host-side postprocessing time is counted."""
        groups: dict[tuple, list[int]] = {}
        for index, inputs in enumerate(prepared):
            groups.setdefault((tuple(inputs.input_ids.shape), tuple(inputs.image_grid_thw[0].tolist())), []).append(index)
        results: list[InferenceResult | None] = [None] * len(prepared)
        for members in groups.values():
            batch = [prepared[i] for i in members]
            started = time.perf_counter()
            hidden = self._forced_hidden_batch(batch)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            keys = None if feature_keys is None else [feature_keys[i] for i in members]
            features = self.sam2_features(batch, keys, feature_cache)
            encoder = time.perf_counter() - started
            for row, (index, inputs) in enumerate(zip(members, batch)):
                timings = {"batch_size": len(batch), "forced_prefill_s": prefill / len(batch),
                           "sam2_image_encoder_s": encoder / len(batch)}
                sequence = inputs.input_ids[0].to(hidden.device)
                masks = self.masks_for(inputs, sequence, hidden[row], mask_upsampling, timings, features, row, host)
                with host.work(POSTPROCESS, critical=True) if host is not None else nullcontext():
                    results[index] = self._result("segment", prompt, answer, inputs, sequence, masks, mask_upsampling)
                    results[index].timings = {k: round(v, 4) for k, v in timings.items()}
        return results

    def _forced_hidden_batch(self, batch: list[ModelInputs]) -> torch.Tensor:
        """[B, L, H] final-norm states of same-length sequences in one forward."""
        each = [b.qwen_kwargs(self.model.device, self.model.dtype) for b in batch]
        kwargs = {key: torch.cat([k[key] for k in each]) for key in each[0]}
        with record_final_hidden_states(self.model.final_norm) as recorded:
            self.model.mllm(**kwargs, use_cache=False, logits_to_keep=1)
        return recorded[-1]

    def _parse_text(self, result: InferenceResult) -> None:
        """Boxes for detection, structured findings for reports; both in original-image pixels."""
        if result.original_size is None:
            if self.processor.seg_token_idx in result.generated_ids:
                result.problems.append("the answer has a [SEG] token, but there is no image to segment (a "
                                       "text-only question)")
            return
        if result.task == "detect":
            parsed = parse_boxes(result.text)
            result.boxes_resized = parsed.boxes
            result.boxes = scale_boxes(parsed.boxes, result.resized_size, result.original_size)
            result.problems.extend(parsed.problems)
        elif result.task == "report":
            report = parse_report(result.text)
            for region in report.regions:
                region.box = scale_boxes([region.box], result.resized_size, result.original_size)[0]
            result.report = report
            result.problems.extend(report.problems)
        if result.task == "segment" and not result.masks:
            result.problems.append("the answer has no [SEG] token, so there is no mask (the model did not find "
                                   "the target, or answered in words; try a forced answer)")

    def ask(self, image, prompt: str, **options) -> InferenceResult:
        return self.run(image, prompt, task="ask", **options)

    def segment(self, image, prompt: str, answer: str | None = FORCED_SEGMENT_ANSWER, **options) -> InferenceResult:
        return self.run(image, prompt, task="segment", answer=answer, **options)

    def detect(self, image, prompt: str, **options) -> InferenceResult:
        return self.run(image, prompt, task="detect", **options)

    def report(self, image, prompt: str, **options) -> InferenceResult:
        return self.run(image, prompt, task="report", **options)
