"""Bytes in and out of the service: base64, compressed voxels, images, mask crops.

Everything a client sends is checked against the declared sizes before it is expanded: compressed voxels are
inflated with an output bound (no decompression bombs), images are measured from their header before decoding.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from ..inference.images import DECOMPRESSION_BOMB_PIXELS
from . import rle

VOXEL_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")
COMPRESSIONS = ("zlib", "gzip", "none")
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def b64decode(text: str, what: str) -> bytes:
    """Strict base64 (standard alphabet, padding, nothing else) at C speed: 5x faster than b64decode(validate=True)."""
    try:
        try:
            return binascii.a2b_base64(text, strict_mode=True)
        except TypeError:  # Python 3.10: no strict_mode
            return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64 (standard alphabet, with padding)") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def inflate(data: bytes, compression: str, expected: int) -> bytes:
    """`data` decompressed to exactly `expected` bytes, never expanding beyond that."""
    if compression == "none":
        raw = data
    else:
        inflater = zlib.decompressobj(wbits=31 if compression == "gzip" else 15)
        try:
            raw = inflater.decompress(data, expected + 1)
        except zlib.error as error:
            raise InputError(f"the voxels are not valid {compression} data ({error})") from None
        if len(raw) <= expected and not inflater.eof:
            raise InputError(f"the {compression} voxel stream is truncated (it ends before the end marker)")
        if inflater.unused_data:
            raise InputError(f"the {compression} voxel stream has {len(inflater.unused_data)} bytes after its end")
    if len(raw) != expected:
        more = "more than " if len(raw) > expected else ""
        raise InputError(f"the voxels hold {more}{len(raw):,} bytes, but shape x dtype needs {expected:,} bytes; "
                         f"send shape as [k, j, i] and the raw little-endian bytes of exactly that array")
    return raw


def voxels_from_bytes(data: bytes, compression: str, dtype: str, shape: tuple[int, int, int]) -> np.ndarray:
    """(k, j, i) array of `dtype` from little-endian bytes, read-only (it is never written)."""
    kind = np.dtype(dtype).newbyteorder("<")
    raw = inflate(data, compression, math.prod(int(n) for n in shape) * kind.itemsize)
    return np.frombuffer(raw, dtype=kind).reshape(shape)


def compress_crop(crop: np.ndarray) -> str:
    return b64encode(zlib.compress(np.ascontiguousarray(crop, dtype=np.uint8).tobytes(), 6))


def decode_crop(mask: dict) -> np.ndarray:
    """The client side of `compress_crop` (tests, bench, Python clients)."""
    raw = zlib.decompress(base64.b64decode(mask["data"]))
    return np.frombuffer(raw, np.uint8).reshape(mask["shape"])


# ---------------------------------------------------------------------------------------------- images

_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def image_source(text: str, what: str) -> tuple[str, str]:
    """What an image string is: ("inline", base64) for a data URI or bare base64, ("url", url) for a URL,
    ("path", path) for a file:// URI or anything that cannot be base64 (a '.', '~' or '\\' say it is a path).

    A bare base64 JPEG starts with '/9j/', so a leading '/' alone does not make a path."""
    text = text.strip()
    if text.startswith("data:"):
        header, comma, payload = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InputError(f"{what}: a data URI must be base64-encoded ('data:image/png;base64,...')")
        return "inline", payload
    if text[:7].lower() == "file://":
        return "path", text[7:]
    if _SCHEME.match(text):
        return "url", text
    return ("inline", text) if _BASE64.match(text) else ("path", text)


def strip_data_uri(text: str, what: str) -> str:
    """'data:image/png;base64,AAAA' or bare base64 -> the base64 part; anything else (URLs, paths) is refused."""
    kind, value = image_source(text, what)
    if kind != "inline":
        raise InputError(f"{what}: only images sent inline (a base64 data URI) are accepted; this server "
                         f"does not fetch URLs or read files")
    return value


def decode_image(data: bytes, what: str = "the image") -> Image.Image:
    """A PNG/JPEG/... image from bytes, with its size checked before its pixels are decoded."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > DECOMPRESSION_BOMB_PIXELS:
            raise InputError(f"{what} has {width}x{height} pixels, more than the {DECOMPRESSION_BOMB_PIXELS:,} allowed")
        if image.mode not in IMAGE_MODES:
            raise InputError(f"{what} has pixel mode {image.mode}; send an 8-bit grayscale or RGB(A) PNG or JPEG")
        image.load()
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{what} is not a readable image (PNG, JPEG, ...): {error}") from None
    return image


def png_base64(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(buffer, format="PNG", optimize=True)
    return b64encode(buffer.getvalue())


def mask_payload(mask: np.ndarray, fmt: str) -> dict:
    if fmt == "png":
        return {"format": "png", "size": [int(mask.shape[0]), int(mask.shape[1])], "png": png_base64(mask)}
    return {"format": "rle"} | rle.encode(mask)
