"""The `sam2` package's own `SAM2ImagePredictor`, to check our prompt path against SAM2's.

sam2 1.1.0 imports torchvision's Resize / Normalize / ToTensor in `sam2/utils/transforms.py` (for `set_image`),
and no torchvision works with the CPU torch here. The module is loaded from its own source with that one import
pointed at pure-torch equivalents; everything else — the coordinate transforms, the prompt encoder and mask
decoder calls, the mask upsampling — is sam2's code. No fake `torchvision` package is registered (transformers
would then switch to its torchvision backends).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TORCHVISION_IMPORT = "from torchvision.transforms import Normalize, Resize, ToTensor"


class ToTensor:
    def __call__(self, picture):
        array = np.asarray(picture)
        array = array[:, :, None] if array.ndim == 2 else array
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
        return tensor.float().div(255.0) if tensor.dtype == torch.uint8 else tensor.float()


class Resize(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size: List[int] = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.unsqueeze(0), size=self.size, mode="bilinear", align_corners=False,
                             antialias=True).squeeze(0)


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _load_transforms_without_torchvision() -> None:
    if "sam2.utils.transforms" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    spec = importlib.util.find_spec("sam2.utils.transforms")
    source = open(spec.origin, encoding="utf-8").read()
    assert TORCHVISION_IMPORT in source, "sam2's transforms no longer import torchvision this way"
    module = types.ModuleType("sam2.utils.transforms")
    module.__file__ = spec.origin
    module.__dict__.update(Normalize=Normalize, Resize=Resize, ToTensor=ToTensor)
    sys.modules["sam2.utils.transforms"] = module
    exec(compile(source.replace(TORCHVISION_IMPORT, ""), spec.origin, "exec"), module.__dict__)


def image_predictor_on(sam2_model, features, height: int, width: int):
    """sam2's SAM2ImagePredictor set to an image of (height, width) whose features are `features` (ours, batch 1):
    exactly what its `set_image` stores, without running the encoder a second time."""
    _load_transforms_without_torchvision()
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(sam2_model)
    predictor._features = {"image_embed": features.image_embed, "high_res_feats": list(features.high_res_feats)}
    predictor._orig_hw = [(height, width)]
    predictor._is_image_set = True
    predictor._is_batch = False
    return predictor
