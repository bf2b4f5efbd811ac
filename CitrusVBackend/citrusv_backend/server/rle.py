"""COCO run-length encoding of binary masks, byte-for-byte what `pycocotools.mask.encode` writes.

The reference server returns its masks this way (`raw_response.seg_masks_rle`), so its clients decode ours
with pycocotools unchanged. Pure numpy + Python: pycocotools is a C extension we do not need at run time.

Format: the mask is read in column-major (Fortran) order; `counts` alternates runs of 0s and 1s, starting
with 0s; each count is written as a 5-bit-per-character little-endian varint (characters from '0', bit 0x20 =
more follows, bit 0x10 of the last chunk = sign), and from the fourth count on as the difference to the count
two places before (`i > 2` in the C code, kept as is).
"""
from __future__ import annotations

import numpy as np


def mask_to_counts(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    return [0] + runs if flat[0] else runs


def counts_to_string(counts: list[int]) -> str:
    chars = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end in all-ones
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def string_to_counts(text: str) -> list[int]:
    counts: list[int] = []
    position = 0
    while position < len(text):
        x, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("RLE counts string ends inside a number")
            c = ord(text[position]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE counts string has an invalid character {text[position]!r}")
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position += 1
            shift += 5
            if not more and c & 0x10:
                x |= -1 << shift
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict:
    """A 2D binary mask -> {"size": [height, width], "counts": str} (pycocotools' dict, counts as text)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2D, got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(mask_to_counts(mask))}


def decode(rle: dict) -> np.ndarray:
    """The inverse of `encode` (also accepts pycocotools' bytes counts or an uncompressed list of counts)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    counts = string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise ValueError(f"RLE counts do not describe a {height}x{width} mask")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")
