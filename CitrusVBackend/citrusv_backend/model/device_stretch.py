"""The SAM2 input made on the model's device: PIL's LANCZOS stretch and the ImageNet table, bit for bit.

On one CPU core the exact stretch of a slice to 1024² costs ~5 ms in PIL's C code and the float32 tensor it
becomes is 12 MB, so a GPU server's host would spend ~8 ms per slice on the SAM2 input alone. Both steps are
integer and table arithmetic, which every device computes identically, so the host can hand the device the
Qwen-resized uint8 slice (64 KB) and let it do them:

* PIL's 8-bit resampling (Pillow `src/libImaging/Resample.c`): per output pixel, filter weights computed in
  double (`precompute_coeffs`), turned into 22-bit fixed point (`normalize_coeffs_8bpc`), summed in integers
  from `1 << 21`, shifted right by 22 and clipped to 0..255; the horizontal pass first (into uint8), then the
  vertical one. The weights are computed here in Python doubles with the same formulas and order (libm's
  `sin`, as the C code calls it); the sums run in int64 (PIL's int32 never overflows, so they agree).
* `sam2_pixel_values`' normalisation: the 256-entry float32 table per channel, gathered on the device.

`FastImagePrep` uses this only for a CUDA model, after checking it against PIL on probe images on that device;
the tests compare it with PIL on random and real images (on the CPU: the same integer arithmetic)."""
from __future__ import annotations

import math
import threading
from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2   # Resample.c: 8 bits of result, 2 of headroom for negative lobes
LANCZOS_SUPPORT = 3.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def _fixed_point(weight: float) -> int:
    """`normalize_coeffs_8bpc`: C's truncating cast after rounding half away from zero."""
    scaled = weight * (1 << PRECISION_BITS)
    return int(-0.5 + scaled) if weight < 0 else int(0.5 + scaled)


@lru_cache(maxsize=64)
def lanczos_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [out, K] int64, weights [out, K] int64): `precompute_coeffs` for the whole image as the box.

    Taps past an output's `xmax` get weight 0 and repeat its first index (so every gather is in range)."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    indices = np.zeros((out_size, ksize), np.int64)
    weights = np.zeros((out_size, ksize), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in taps:
            total += w
        if total != 0.0:
            taps = [w / total for w in taps]
        indices[xx] = xmin
        indices[xx, :xmax] = np.arange(xmin, xmin + xmax)
        weights[xx, :xmax] = [_fixed_point(w) for w in taps]
    return indices, weights


def _pass(image: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """One 8-bit resampling pass of a [H, W] int64 image along `axis` (1: horizontal, 0: vertical)."""
    in_size = image.shape[axis]
    if in_size == out_size:
        return image  # PIL skips a pass whose size does not change (the box is the whole image)
    indices, weights = (torch.from_numpy(a).to(image.device) for a in lanczos_coefficients(in_size, out_size))
    if axis == 1:
        total = (image[:, indices] * weights).sum(dim=-1)                  # [H, out, K] -> [H, out]
    else:
        total = (image[indices] * weights[:, :, None]).sum(dim=1)          # [out, K, W] -> [out, W]
    total += 1 << (PRECISION_BITS - 1)
    return (total >> PRECISION_BITS).clamp_(0, 255)


def lanczos_stretch(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [H, W] -> uint8 [size, size], `Image.fromarray(pixels).resize((size, size), Image.LANCZOS)`."""
    image = pixels.to(torch.int64)
    return _pass(_pass(image, 1, size), 0, size).to(torch.uint8)


class DeviceSAM2Input:
    """The SAM2 input of a gray uint8 slice, stretched and normalised on `device`.

    Called on prefetch workers: on CUDA each worker thread queues its work on a side stream of its own and
    waits for that stream alone, so it neither waits for the model's queued kernels nor makes the model wait;
    the result is recorded on the default stream (where the model reads it) for the caching allocator."""

    def __init__(self, table: np.ndarray, size: int, device: torch.device):
        self.device = torch.device(device)
        self.size = size
        self.table = torch.from_numpy(table).to(self.device)   # [3, 256] float32
        self._local = threading.local()

    def _compute(self, resized: np.ndarray) -> torch.Tensor:
        pixels = torch.tensor(resized, dtype=torch.uint8, device=self.device)  # a 64 KB copy, not 12 MB
        indices = lanczos_stretch(pixels, self.size).to(torch.int64)
        return self.table[:, indices][None]

    def __call__(self, resized: np.ndarray) -> torch.Tensor:
        """[1, 3, size, size] float32 on the device (gray [H, W] input only: volume slices and gray images)."""
        if self.device.type != "cuda":
            return self._compute(resized)
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            out = self._compute(resized)
        stream.synchronize()
        out.record_stream(torch.cuda.default_stream(self.device))
        return out
