"""The reference's own image arithmetic, in plain form: `qwen_vl_utils.to_rgb`, and SAM2's `DirectResize` +
ImageNet normalisation. processor.py builds the model inputs from them; image_prep.py checks its fast path
against them. Kept apart from both so neither imports the other."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """qwen_vl_utils.to_rgb: transparent pixels become white, everything else `convert("RGB")`."""
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def sam2_pixel_values(resized: Image.Image, size: int) -> torch.Tensor:
    """[1, 3, size, size] float32: the reference's DirectResize + ImageNet normalisation."""
    stretched = np.asarray(resized.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.float64) / 255.0
    normalised = (stretched - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(normalised.transpose(2, 0, 1).astype(np.float32)).unsqueeze(0)
