"""SAM2 image features of a volume's slices, computed once and kept within a memory budget.

Interactive refinement decodes a click on a slice's features and re-propagates through its neighbours with
SAM2's video memory; both need the slice's backbone output (the FPN levels after conv_s0 / conv_s1). One
`SliceFeatureStore` holds them for the slices of one `SliceSource` (a volume, a plane, a window, a pixel
budget), least recently used first out once the shared `FeatureBudget` is spent. The position encodings are
the same for every slice of a size, so one copy serves all.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..model.processor import PixelBudget, resize_for_qwen, sam2_pixel_values

if TYPE_CHECKING:
    from ..inference.engine import CitrusVEngine
    from ..model.modeling import SAM2ImageFeatures
    from .pipeline import SliceSource

# The video predictor reads the frame image from its cache entry only to expand it; nothing uses its pixels.
_NO_IMAGE = torch.empty(1, 3, 0, 0)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class FeatureBudget:
    """Bytes of slice features that all stores together may hold; the least recently used slice goes first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._order: OrderedDict[tuple[int, int], tuple["SliceFeatureStore", int]] = OrderedDict()
        self.used_bytes = 0
        self.lock = threading.RLock()

    def touch(self, store: "SliceFeatureStore", index: int) -> None:
        with self.lock:
            self._order.move_to_end((id(store), index))

    def add(self, store: "SliceFeatureStore", index: int, nbytes: int) -> None:
        with self.lock:
            self._order[(id(store), index)] = (store, nbytes)
            self.used_bytes += nbytes
            while self.used_bytes > self.max_bytes and len(self._order) > 1:
                (_, oldest), (owner, size) = self._order.popitem(last=False)
                owner._drop(oldest)
                self.used_bytes -= size

    def forget(self, store: "SliceFeatureStore") -> None:
        with self.lock:
            for key in [k for k in self._order if k[0] == id(store)]:
                self.used_bytes -= self._order.pop(key)[1]

    def stats(self) -> dict:
        with self.lock:
            return {"slices": len(self._order), "used_bytes": self.used_bytes, "max_bytes": self.max_bytes}


class SliceFeatureStore:
    """Backbone outputs of one slice source's slices, computed on first use (`encoded` counts the encoder runs)."""

    def __init__(self, engine: "CitrusVEngine", source: "SliceSource", budget: PixelBudget,
                 memory: FeatureBudget | None = None):
        self.engine = engine
        self.source = source
        self.budget = budget
        self.memory = memory or FeatureBudget(1 << 30)
        self._fpn: dict[int, list[torch.Tensor]] = {}
        self._pos_enc: list[torch.Tensor] | None = None
        self.encoded = 0
        self.closed = False

    @property
    def cached_slices(self) -> list[int]:
        return sorted(self._fpn)

    def pixel_values(self, index: int) -> torch.Tensor:
        """[1, 3, S, S]: the slice's SAM2 input, preprocessed exactly as the pipeline's."""
        from PIL import Image

        resized = resize_for_qwen(Image.fromarray(self.source.rgb(index)), self.budget)
        return sam2_pixel_values(resized, self.engine.model.grounding_encoder.image_size)

    @torch.inference_mode()
    def backbone(self, index: int) -> dict:
        """SAM2's `forward_image` output for slice `index` (from the store, or computed once and stored)."""
        fpn = self._fpn.get(index)
        if fpn is None:
            model = self.engine.model
            out = model.grounding_encoder.backbone(self.pixel_values(index).to(model.device, model.dtype))
            self.encoded += 1
            self._keep(index, out)
            fpn = self._fpn.get(index, out["backbone_fpn"])
        else:
            self.memory.touch(self, index)
        return {"backbone_fpn": list(fpn), "vision_pos_enc": list(self._pos_enc), "vision_features": fpn[-1]}

    def features(self, index: int) -> "SAM2ImageFeatures":
        """The mask decoder's input for slice `index`."""
        return self.engine.model.grounding_encoder.features_from_backbone(self.backbone(index))

    def _keep(self, index: int, backbone_out: dict) -> None:
        if self._pos_enc is None:
            self._pos_enc = list(backbone_out["vision_pos_enc"])
        if self.closed:
            return
        fpn = list(backbone_out["backbone_fpn"])
        self._fpn[index] = fpn
        self.memory.add(self, index, _tensor_bytes(fpn))

    def _drop(self, index: int) -> None:
        self._fpn.pop(index, None)

    def close(self) -> None:
        self.closed = True
        self.memory.forget(self)
        self._fpn.clear()

    @contextmanager
    def serving(self, predictor, first: int):
        """Let SAM2's video predictor take frame features (frame f = slice first + f) from this store.

        The predictor's own cache holds one frame; `init_state` warms up frame 0 before any object exists,
        which refinement never needs, so that call is skipped (the predictor discards its result anyway)."""
        original = predictor._get_image_feature

        def from_store(inference_state, frame_idx, batch_size):
            if not inference_state["obj_ids"]:
                return None
            inference_state["cached_features"] = {frame_idx: (_NO_IMAGE, self.backbone(first + frame_idx))}
            return original(inference_state, frame_idx, batch_size)

        predictor._get_image_feature = from_store  # an instance attribute: shadows the method for this call only
        try:
            yield
        finally:
            del predictor._get_image_feature
