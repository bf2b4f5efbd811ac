"""Reading the one image a 2D task works on, with errors that say what is wrong with it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

DECOMPRESSION_BOMB_PIXELS = 50_000_000  # far beyond any slice or screenshot: a larger image is refused before decoding


def load_image(source) -> Image.Image:
    """A PIL image from a path, a PIL image, or a uint8 array (H, W) / (H, W, 3|4)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = image_from_array(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: no such image file")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise InputError(f"{path}: not a readable image (PNG, JPEG, BMP, TIFF...): {error}") from None
    if image.width * image.height == 0:
        raise InputError("the image is empty (0 pixels)")
    if image.width * image.height > DECOMPRESSION_BOMB_PIXELS:
        raise InputError(f"the image has {image.width}x{image.height} pixels, more than the {DECOMPRESSION_BOMB_PIXELS} allowed")
    return image


def image_from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8 (window the intensities first), got {array.dtype}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))
    raise InputError(f"image arrays must be (H, W) or (H, W, 3|4), got shape {array.shape}")
