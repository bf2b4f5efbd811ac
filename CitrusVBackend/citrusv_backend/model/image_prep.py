"""The image side of the model inputs, bit for bit what the reference computes, in a fraction of the time.

The plain definitions live in processor.py (`resize_for_qwen`, the Hugging Face image processor with
`do_resize=False`) and reference_image.py (`sam2_pixel_values`). Two facts make them fast without changing a single bit:

* every per-pixel step after the resampling (rescale, normalise, the ImageNet normalisation in float64 cast
  to float32) is a function of one uint8 value per channel, so it is computed once for the 256 possible values
  and looked up (`np.take`); the Qwen side's patch layout is a permutation, done on the uint8 pixels before
  the lookup writes float32 straight into the final layout;
* gray images (every volume slice: R = G = B) are resampled as one band: PIL resamples each band on its own
  with the same fixed-point arithmetic, so one band gives the bytes of each of the three (3x less work for
  the bicubic Qwen resize and the LANCZOS stretch to the SAM2 size).

For a model on a GPU, the SAM2 input of a gray slice is made on the device from the Qwen-resized uint8 pixels
(`device_stretch.py`: PIL's integer LANCZOS arithmetic and the same table, ~1 ms of host time instead of ~8).

`FastImagePrep` checks both facts (and the device path) on probe images against the plain definitions the first time it is used
and falls back to the plain path, with a warning, if an installed library ever computes differently; the
tests compare the two on random and real images for every pixel budget.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass
class PreparedImage:
    """The image half of `ModelInputs`: what does not depend on the prompt (so one slice serves every target)."""

    original_size: tuple[int, int]           # (height, width) of the input image
    resized_size: tuple[int, int]            # (height, width) after smart_resize
    pixel_values: torch.Tensor | None        # [patches, 3*2*14*14] float32, None when only SAM2's input was asked
    image_grid_thw: torch.Tensor | None      # [1, 3] int64
    sam2_pixel_values: torch.Tensor | None   # [1, 3, S, S] float32 (on the model device: see use_device), None: not asked

    def image_tokens(self, merge_size: int) -> int:
        return int(self.image_grid_thw.prod().item()) // (merge_size ** 2)


def sam2_lookup_table() -> np.ndarray:
    """[3, 256] float32: `sam2_pixel_values`' arithmetic (x / 255, minus mean, over std, in float64) per value."""
    from .reference_image import IMAGENET_MEAN, IMAGENET_STD

    values = np.arange(256, dtype=np.float64)[:, None] / 255.0
    return ((values - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype(np.float32).T.copy()


def image_pixels(image) -> np.ndarray:
    """uint8 [H, W] for a gray image, [H, W, 3] otherwise: the pixels the reference's `to_rgb` gives."""
    from .reference_image import to_rgb

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise InputError(f"image arrays must be uint8 (H, W) or (H, W, 3|4), got {image.dtype} {image.shape}")
        pixels = image if image.ndim == 2 or image.shape[2] == 3 else np.asarray(to_rgb(Image.fromarray(image)))
    elif image.mode in ("L", "RGB"):
        pixels = np.asarray(image)
    else:
        pixels = np.asarray(to_rgb(image))
    if pixels.ndim == 3 and np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2]):
        pixels = pixels[..., 0]
    return np.ascontiguousarray(pixels)


def resample(pixels: np.ndarray, height: int, width: int, method: int | None = None) -> np.ndarray:
    """PIL's resize of an L or RGB array (method None: PIL's default, bicubic, as `fetch_image` calls it)."""
    picture = Image.fromarray(pixels)
    resized = picture.resize((width, height)) if method is None else picture.resize((width, height), method)
    return np.asarray(resized)


def lookup(table: np.ndarray, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[...] = table[indices]; mode="clip" skips numpy's per-element bounds error path (uint8 indices are
    always inside a 256-entry table), which makes `take` about twice as fast."""
    return np.take(table, indices, out=out, mode="clip")


class FastImagePrep:
    """The Qwen-side pixel values and the SAM2 input of one image, from its uint8 pixels, via lookup tables.

    `image_processor` None: only the SAM2 side (propagation frames). `plain`: always the plain definitions (the
    benchmark's "before" figures)."""

    def __init__(self, image_processor, sam2_size: int, plain: bool = False):
        self.image_processor = image_processor
        self.sam2_size = sam2_size
        self.patch_size = int(getattr(image_processor, "patch_size", 14))
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.temporal_patch_size = int(getattr(image_processor, "temporal_patch_size", 2))
        self.sam2_table = sam2_lookup_table()
        self.qwen_table = None if image_processor is None else self._qwen_table()
        self._verified: bool | None = False if plain else None
        self._lock = threading.Lock()
        self.on_device = None  # DeviceSAM2Input once `use_device` accepted a device

    def use_device(self, device, force: bool = False) -> bool:
        """Make gray slices' SAM2 inputs on `device` (a CUDA model; `force`: any device, as the tests
        do), after checking them against PIL there; False (host path kept) if they differ."""
        from .device_stretch import DeviceSAM2Input

        device = torch.device(device)
        if (device.type == "cpu" and not force) or not self.verified():
            return False
        rng = np.random.default_rng(17)
        try:
            candidate = DeviceSAM2Input(self.sam2_table, self.sam2_size, device)
            for shape in ((84, 56), (56, 84), (2 * self.patch_size, self.sam2_size)):
                probe = rng.integers(0, 256, shape, dtype=np.uint8)
                if not (self._device_fits(probe) and torch.equal(candidate(probe).cpu(), self.host_sam2_pixel_values(probe))):
                    log.warning("SAM2 input on %s differs from PIL's; it stays on the host", device)
                    return False
        except (RuntimeError, ValueError) as error:  # e.g. the device is out of memory: the host path still works
            log.warning("SAM2 input stays on the host: %s", error)
            return False
        self.on_device = candidate
        return True

    def _device_fits(self, resized: np.ndarray) -> bool:
        """Gray, and stretched up (or kept) on both axes: the case whose pass order (horizontal first) is
        PIL's own; Pillow orders a downscaling vertical pass differently, so those stay on the host."""
        return resized.ndim == 2 and max(resized.shape) <= self.sam2_size

    def _qwen_table(self) -> np.ndarray:
        """[3, 256] float32: the image processor's own rescale and normalise applied to the 256 values."""
        processor = self.image_processor
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
        if getattr(processor, "do_rescale", True):
            values = processor.rescale(values, processor.rescale_factor)
        if getattr(processor, "do_normalize", True):
            values = processor.normalize(values, processor.image_mean, processor.image_std)
        return np.asarray(values, dtype=np.float32).reshape(3, 256).copy()

    # ------------------------------------------------------------------------------------------ fast paths

    def qwen_pixel_values(self, resized: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [patches, 3*T*p*p], image_grid_thw [1, 3]) exactly as the processor's patchify lays them out."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width = resized.shape[:2]
        grid_h, grid_w = height // p, width // p
        planes = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
        bands = planes.shape[0]
        # patchify's order, on uint8: (merged row, merged col, row in merge, col in merge) x (band, y, x).
        patches = planes.reshape(bands, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = patches.reshape(grid_h * grid_w, bands, p * p)
        out = np.empty((grid_h * grid_w, 3, t, p * p), np.float32)
        values = np.empty((grid_h * grid_w, p * p), np.float32)
        for channel in range(3):
            lookup(self.qwen_table[channel], patches[:, 0 if bands == 1 else channel], values)
            out[:, channel] = values[:, None, :]  # the temporal copies of one image
        pixel_values = torch.from_numpy(out.reshape(grid_h * grid_w, -1))
        return pixel_values, torch.tensor([[1, grid_h, grid_w]], dtype=torch.int64)

    def stretch_for_sam2(self, resized: np.ndarray) -> np.ndarray:
        """The Qwen-resized pixels LANCZOS-stretched to S x S (uint8): DirectResize without the normalisation."""
        return resample(resized, self.sam2_size, self.sam2_size, Image.LANCZOS)

    def normalise_for_sam2(self, stretched: np.ndarray) -> torch.Tensor:
        """[1, 3, S, S] float32 from the stretched uint8 pixels, by the per-channel table."""
        size = stretched.shape[0] * stretched.shape[1]
        out = np.empty((3, size), np.float32)
        gray = stretched.reshape(-1).astype(np.intp) if stretched.ndim == 2 else None
        for channel in range(3):
            indices = gray if gray is not None else stretched[..., channel].reshape(-1).astype(np.intp)
            lookup(self.sam2_table[channel], indices, out[channel])
        return torch.from_numpy(out).view(1, 3, *stretched.shape[:2])

    def host_sam2_pixel_values(self, resized: np.ndarray) -> torch.Tensor:
        return self.normalise_for_sam2(self.stretch_for_sam2(resized))

    def sam2_pixel_values(self, resized: np.ndarray) -> torch.Tensor:
        """[1, 3, S, S] float32: on the model's device when `use_device` enabled it and the slice fits."""
        if self.on_device is not None and self._device_fits(resized):
            return self.on_device(resized)
        return self.host_sam2_pixel_values(resized)

    # ------------------------------------------------------------------------------------------ entry

    def prepare(self, image, height: int, width: int, qwen: bool = True, sam2: bool = True) -> PreparedImage:
        """`image` (PIL or uint8 array) resized to (height, width) for Qwen, then both model inputs."""
        pixels = image_pixels(image)
        original = pixels.shape[:2]
        if not self.verified():
            return self._prepare_plain(pixels, height, width, qwen, sam2)
        resized = resample(pixels, height, width)
        pixel_values, grid = self.qwen_pixel_values(resized) if qwen and self.qwen_table is not None else (None, None)
        return PreparedImage(original, (height, width), pixel_values, grid,
                             self.sam2_pixel_values(resized) if sam2 else None)

    def _prepare_plain(self, pixels: np.ndarray, height: int, width: int, qwen: bool, sam2: bool) -> PreparedImage:
        from .reference_image import sam2_pixel_values

        rgb = Image.fromarray(pixels).convert("RGB")
        resized = rgb.resize((width, height))
        pixel_values, grid = None, None
        if qwen and self.image_processor is not None:
            processed = self.image_processor(images=[resized], do_resize=False, return_tensors="pt")
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
        return PreparedImage(pixels.shape[:2], (height, width), pixel_values, grid,
                             sam2_pixel_values(resized, self.sam2_size) if sam2 else None)

    # ------------------------------------------------------------------------------------------ self-check

    def verified(self) -> bool:
        """Whether the fast path equals the plain one on probe images here (checked once, on first use)."""
        if self._verified is None:
            with self._lock:
                if self._verified is None:
                    self._verified = self._agrees_with_plain()
                    if not self._verified:
                        log.warning("the fast image preprocessing differs from the plain one with the installed "
                                    "Pillow/transformers; using the plain (slower) path")
        return self._verified

    def _agrees_with_plain(self) -> bool:
        rng = np.random.default_rng(16)
        size = 2 * self.patch_size * self.merge_size
        color = rng.permutation(np.resize(np.arange(256, dtype=np.uint8), size * size * 3 // 2)).reshape(size, -1, 3)
        gray = rng.integers(0, 256, (size // 2 * 3, size // 2 * 3), dtype=np.uint8)
        qwen = self.image_processor is not None
        for pixels in (color, gray):
            try:
                plain = self._prepare_plain(pixels, *pixels.shape[:2], qwen=qwen, sam2=True)
                if not torch.equal(plain.sam2_pixel_values, self.sam2_pixel_values(pixels).cpu()):
                    return False
                if qwen:
                    pixel_values, grid = self.qwen_pixel_values(pixels)
                    if not (torch.equal(plain.pixel_values, pixel_values) and torch.equal(plain.image_grid_thw, grid)):
                        return False
            except Exception as error:  # an unexpected processor configuration: not our fast path's business
                log.warning("fast image preprocessing unavailable: %s", error)
                return False
        # One band resampled alone equals each band of the RGB image (bicubic down, as the Qwen resize).
        small = resample(gray, size, size // 2)
        return np.array_equal(np.asarray(Image.fromarray(gray).convert("RGB").resize((size // 2, size)))[..., 1], small)
