"""Turning an image and a prompt into model inputs exactly as the reference's `citrus_v_infer` template does.

Qwen side (reference: `qwen_vl_utils.fetch_image` + the HF image processor with `do_resize=False`):
the RGB image is resized by PIL's default (bicubic) `resize` to the `smart_resize` size (multiples of 28,
pixel count within [min_pixels, max_pixels]); the image processor then only rescales, normalises and
patches it. SAM2 side (reference: `DirectResize`): the *Qwen-resized* image, LANCZOS-stretched to the SAM2
input size (1024 for the released model), /255, ImageNet mean/std computed in float64, cast to float32.

The functions here are the plain definitions; `image_prep.FastImagePrep` computes the same bytes several
times faster and is what the processor runs (see that module for why it is exact).

Text: ChatML with the system prompt "You are a helpful assistant."; the image block goes where the query's first
`<image>` tag stands (before the query when it has none), as ms-swift's template places it. ms-swift joins the
conversation into one string and tokenises it; the pieces here are cut only at special tokens, which the
tokenizer never merges across, so the ids are the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError, InputError
from .image_prep import FastImagePrep, PreparedImage

SYSTEM_PROMPT = "You are a helpful assistant."
SEG_TOKEN = "[SEG]"
IMAGE_TAG = "<image>"  # ms-swift's mark, in the user's text, of where the image goes
EXTRA_SPECIAL_TOKENS = ["[SEG]", "<bbox>", "</bbox>"]
IMAGE_FACTOR = 28
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28  # qwen_vl_utils' defaults (MIN_PIXELS, MAX_PIXELS)
MAX_RATIO = 200
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Text that would break the prompt's structure: image placeholders make the image features and tokens
# disagree; a [SEG] in the question would be taken for an answer's [SEG] and give a phantom mask.
IMAGE_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
PROMPT_FORBIDDEN = IMAGE_TOKENS + (SEG_TOKEN,)


def check_prompt_and_answer(prompt: str | None, answer: str | None) -> None:
    for text, what, forbidden in ((prompt, "prompt", PROMPT_FORBIDDEN), (answer, "answer", IMAGE_TOKENS)):
        for token in forbidden:
            if text and token in text:
                raise InputError(f"the {what} contains the special token {token}, which only the model may write; "
                                 f"remove it")


def split_at_image_tag(query: str) -> tuple[str, str]:
    """(text before the image, text after it), as ms-swift's template places one image in a query.

    The first `<image>` is replaced by the image block and all that follows it, its newline included, comes
    after the image (`Template._pre_tokenize_images`); a query without a tag gets one in front, with no newline
    (`Template._add_default_tags`). Later tags stay literal text: swift replaces only as many tags as there are
    images (and warns about the rest)."""
    before, after = split_at_image_tags(query, 1)
    return before, after


def split_at_image_tags(query: str, images: int) -> list[str]:
    """The text around `images` image blocks: `images + 1` pieces. The first `images` tags are replaced in order;
    tags that are missing are added in front (no newline), tags beyond the images stay literal text — ms-swift's
    rules for one image (`split_at_image_tag`) applied to several."""
    if images == 0:
        return [query]
    missing = max(0, images - query.count(IMAGE_TAG))
    return [""] * missing + query.split(IMAGE_TAG, images - missing)


@dataclass(frozen=True)
class ChatTurn:
    """One user turn of a conversation as the template renders it: its query (`<image>` tags where its images
    go), how many placeholders each of its images takes, and the assistant's answer (None: the turn being asked)."""

    query: str
    image_tokens: tuple[int, ...] = ()   # placeholders of each of its images, in order; () for a text-only turn
    answer: str | None = None


@dataclass(frozen=True)
class PixelBudget:
    """Bounds on the Qwen-resized image's pixel count (the reference's MIN_PIXELS / MAX_PIXELS)."""

    min_pixels: int
    max_pixels: int


# The reference's settings per task: segmentation evals and the deploy example use MAX_PIXELS=65535
# (qwen_vl_utils' default MIN_PIXELS); the detection eval sets MAX_PIXELS=1003520 and leaves MIN_PIXELS unset
# (eval/eval_detection.py: qwen_vl_utils' default 3136); report demos use 200704..1003520.
TASK_PIXEL_BUDGETS = {
    "segment": PixelBudget(4 * 28 * 28, 65535),
    "detect": PixelBudget(4 * 28 * 28, 1280 * 28 * 28),
    "report": PixelBudget(256 * 28 * 28, 1280 * 28 * 28),
    "ask": PixelBudget(256 * 28 * 28, 1280 * 28 * 28),
}


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """qwen_vl_utils.smart_resize: (height, width) rounded to multiples of `factor` within the pixel budget."""
    if min(height, width) <= 0:
        raise InputError(f"image of {width}x{height} pixels is empty")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"image aspect ratio must be at most {MAX_RATIO}, got {max(height, width) / min(height, width):.0f}")
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """qwen_vl_utils.to_rgb: transparent pixels become white, everything else `convert("RGB")`."""
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def resize_for_qwen(image: Image.Image, budget: PixelBudget) -> Image.Image:
    rgb = to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    return rgb.resize((width, height))  # PIL's default resampling (bicubic), as fetch_image


def sam2_pixel_values(resized: Image.Image, size: int) -> torch.Tensor:
    """[1, 3, size, size] float32: the reference's DirectResize + ImageNet normalisation."""
    stretched = np.asarray(resized.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.float64) / 255.0
    normalised = (stretched - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(normalised.transpose(2, 0, 1).astype(np.float32)).unsqueeze(0)


@dataclass
class ModelInputs:
    """Everything one image + prompt needs: Qwen inputs (batch 1), SAM2 input, and the geometry.

    A text-only question (no image) has None for every image field."""

    input_ids: torch.Tensor          # [1, L]
    attention_mask: torch.Tensor     # [1, L]
    mm_token_type_ids: torch.Tensor  # [1, L]: 1 at image tokens (M-RoPE positions need it in transformers 5)
    pixel_values: torch.Tensor | None        # [patches, 3*2*14*14]
    image_grid_thw: torch.Tensor | None      # [1, 3]
    sam2_pixel_values: torch.Tensor | None   # [1, 3, S, S]
    original_size: tuple[int, int] | None    # (height, width) of the input image
    resized_size: tuple[int, int] | None     # (height, width) after smart_resize: the frame of box coordinates
    prompt_length: int               # tokens before the answer (the forced answer starts here)

    def qwen_kwargs(self, device: torch.device, dtype: torch.dtype | None = None) -> dict:
        """The Qwen2.5-VL forward/generate arguments; `dtype` is the model's, for the image patches."""
        kwargs = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                  "mm_token_type_ids": self.mm_token_type_ids.to(device)}
        if self.pixel_values is not None:
            kwargs |= {"image_grid_thw": self.image_grid_thw.to(device), "pixel_values": self.pixel_values.to(device, dtype)}
        return kwargs

    def with_sequence(self, input_ids: torch.Tensor, image_token_id: int) -> "ModelInputs":
        """The same image with another token sequence [L] (e.g. prompt + generated answer)."""
        ids = input_ids.reshape(1, -1).cpu()
        return replace(self, input_ids=ids, attention_mask=torch.ones_like(ids),
                       mm_token_type_ids=(ids == image_token_id).to(torch.int32))


class CitrusVProcessor:
    """Tokenizer + Qwen2-VL image processor + the SAM2 input, for one image and one prompt."""

    def __init__(self, tokenizer, image_processor, seg_token_idx: int, image_token_id: int, sam2_image_size: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.seg_token_idx = seg_token_idx
        self.image_token_id = image_token_id
        self.sam2_image_size = sam2_image_size
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.fast = FastImagePrep(image_processor, sam2_image_size)
        self._prompt_ids: dict[tuple, list[int]] = {}  # (query, image tokens) -> ids: the same for every slice

    @classmethod
    def from_checkpoint(cls, directory: Path, seg_token_idx: int, image_token_id: int, sam2_image_size: int):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except Exception as error:
            raise CheckpointError(f"{directory}: the tokenizer files cannot be loaded ({error})") from None
        # The reference adds these right after loading any tokenizer; a no-op when they are already there.
        tokenizer.add_tokens(EXTRA_SPECIAL_TOKENS, special_tokens=True)
        actual = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        if actual != seg_token_idx:
            raise CheckpointError(f"{directory}: the tokenizer gives {SEG_TOKEN} id {actual}, but config.json says "
                                  f"seg_token_idx={seg_token_idx}; tokenizer and weights do not belong together")
        if (directory / "preprocessor_config.json").is_file():
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory))
        else:
            image_processor = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2)
        return cls(tokenizer, image_processor, seg_token_idx, image_token_id, sam2_image_size)

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_pieces(self, query: str, image_tokens: int | None) -> list[int]:
        """Token ids of the conversation up to and including `<|im_start|>assistant\\n`; the image block (of
        `image_tokens` placeholders) where `split_at_image_tag` puts it, none for a text-only question (whose
        `<image>` tags, with no image to replace them, stay text as in swift)."""
        return self.conversation_pieces([ChatTurn(query, () if image_tokens is None else (image_tokens,))])

    def conversation_pieces(self, turns: list["ChatTurn"]) -> list[int]:
        """Token ids of a multi-turn conversation, rendered as Qwen2.5-VL's chat template (and ms-swift's
        ChatML history) renders it: the default system prompt, then per turn `<|im_start|>user\\n` + its image
        block (if any) + its query + `<|im_end|>\\n<|im_start|>assistant\\n`, and for each answered turn its answer
        + `<|im_end|>\\n`. The last turn is the one being asked (no answer)."""
        ids = self._encode_text(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
        for number, turn in enumerate(turns, start=1):
            pieces = split_at_image_tags(turn.query, len(turn.image_tokens))
            ids += self._encode_text(f"<|im_start|>user\n{pieces[0]}")
            for tokens, after in zip(turn.image_tokens, pieces[1:]):
                ids += self._encode_text("<|vision_start|>") + [self.image_token_id] * tokens
                ids += self._encode_text("<|vision_end|>")
                ids += self._encode_text(after)
            ids += self._encode_text("<|im_end|>\n<|im_start|>assistant\n")
            if turn.answer is not None:
                if number == len(turns):
                    raise ValueError("the last turn of a conversation is the question being asked: it has no answer")
                ids += self._encode_text(turn.answer) + self._encode_text("<|im_end|>\n")
            elif number != len(turns):
                raise ValueError(f"turn {number} of {len(turns)} has no answer; only the last turn may be unanswered")
        return ids

    def prompt_ids(self, query: str, image_tokens: int | None) -> list[int]:
        """`prompt_pieces`, remembered: a volume's slices share one query and one image size."""
        key = (query, image_tokens)
        if key not in self._prompt_ids:
            if len(self._prompt_ids) >= 64:
                self._prompt_ids.clear()
            self._prompt_ids[key] = self.prompt_pieces(query, image_tokens)
        return list(self._prompt_ids[key])

    def answer_ids(self, answer: str) -> list[int]:
        """A forced answer as the reference would have generated it: its tokens, then `<|im_end|>`."""
        return self._encode_text(answer) + self._encode_text("<|im_end|>")

    def __call__(self, image: Image.Image | None, query: str, budget: PixelBudget, answer: str | None = None,
                 allow_empty: bool = False) -> ModelInputs:
        """`image` None: a text-only question. `allow_empty`: an empty query about an image is asked as it is
        (the reference's clients send one for reports); otherwise it is refused."""
        self.check_query(query, answer, allow_empty=image is not None and allow_empty)
        prepared = None if image is None else self.prepare_image(image, budget)
        return self.inputs_for(prepared, query, answer, allow_empty=allow_empty)

    def check_query(self, query: str, answer: str | None, allow_empty: bool = False) -> None:
        if not isinstance(query, str) or (not query.strip() and not allow_empty):
            raise InputError("the prompt is empty; say what to find, e.g. 'Please segment the liver in this scan.'")
        check_prompt_and_answer(query, answer)

    def prepare_image(self, image, budget: PixelBudget, qwen: bool = True, sam2: bool = True) -> PreparedImage:
        """The prompt-independent half (thread-safe: prefetch workers call it): `image` is a PIL image or a
        uint8 array, gray (H, W) or (H, W, 3|4)."""
        height, width = (image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width))
        height, width = smart_resize(height, width, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
        return self.fast.prepare(image, height, width, qwen=qwen, sam2=sam2)

    def inputs_for(self, prepared: PreparedImage | None, query: str, answer: str | None = None,
                   allow_empty: bool = False) -> ModelInputs:
        """A prepared image (None: a text-only question) + the prompt (and forced answer) -> the model inputs."""
        self.check_query(query, answer, allow_empty=prepared is not None and allow_empty)
        ids = self.prompt_ids(query, None if prepared is None else prepared.image_tokens(self.merge_size))
        prompt_length = len(ids)
        if answer is not None:
            ids += self.answer_ids(answer)
        input_ids = torch.tensor([ids], dtype=torch.long)
        return ModelInputs(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == self.image_token_id).to(torch.int32),
            pixel_values=None if prepared is None else prepared.pixel_values,
            image_grid_thw=None if prepared is None else prepared.image_grid_thw,
            sam2_pixel_values=None if prepared is None else prepared.sam2_pixel_values,
            original_size=None if prepared is None else prepared.original_size,
            resized_size=None if prepared is None else prepared.resized_size,
            prompt_length=prompt_length)

    def conversation_inputs(self, turns: list[tuple[str, list[PreparedImage], str | None]],
                            focus: PreparedImage | None, answer: str | None = None,
                            allow_empty: bool = False) -> ModelInputs:
        """Model inputs of a multi-turn conversation: `turns` are (query, its prepared images, answer), the last
        one unanswered; their images go to the model in order. `focus`: the image (one of them) whose SAM2 input,
        sizes and box frame the answer's `[SEG]` and boxes refer to (None: no image at all).
        `answer`: a forced answer for the last turn (one prefill, as `inputs_for`); `allow_empty`: an empty last
        question about an image is asked as it is (as `__call__`)."""
        query = turns[-1][0]
        self.check_query(query, answer, allow_empty=allow_empty and bool(turns[-1][1]))
        for earlier, _, said in turns[:-1]:
            check_prompt_and_answer(earlier, said)
        chat = [ChatTurn(q, tuple(image.image_tokens(self.merge_size) for image in images), a) for q, images, a in turns]
        ids = self.conversation_pieces(chat)
        prompt_length = len(ids)
        if answer is not None:
            ids += self.answer_ids(answer)
        input_ids = torch.tensor([ids], dtype=torch.long)
        images = [image for _, each, _ in turns for image in each]
        focused = focus
        return ModelInputs(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == self.image_token_id).to(torch.int32),
            pixel_values=torch.cat([image.pixel_values for image in images]) if images else None,
            image_grid_thw=torch.cat([image.image_grid_thw for image in images]) if images else None,
            sam2_pixel_values=None if focused is None else focused.sam2_pixel_values,
            original_size=None if focused is None else focused.original_size,
            resized_size=None if focused is None else focused.resized_size,
            prompt_length=prompt_length)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
