"""SAM2 image features of a volume's slices for interactive refinement, computed once and kept.

Interactive refinement decodes a click on a slice's features and re-propagates through its neighbours with
SAM2's video memory; both need the slice's backbone output (the FPN levels after conv_s0 / conv_s1). A
`SliceFeatureStore` is the view of one `SliceSource` (a volume, a plane, a window) and pixel budget on a
`SAM2FeatureCache` — the same cache the volume pipeline fills, keyed by `SliceSource.feature_key`, so the
service's refinement sessions share one memory budget (least recently used slices out first) and a slice is
prepared exactly as the pipeline prepares it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..model.feature_cache import SAM2FeatureCache, split_backbone
from ..model.processor import PixelBudget

if TYPE_CHECKING:
    from ..inference.engine import CitrusVEngine
    from ..model.modeling import SAM2ImageFeatures
    from ..volume.slices.slice_source import SliceSource

# The video predictor reads the frame image from its cache entry only to expand it; nothing uses its pixels.
_NO_IMAGE = torch.empty(1, 3, 0, 0)
DEFAULT_STORE_BYTES = 1 << 30


class SliceFeatureStore:
    """Backbone outputs of one slice source's slices, computed on first use (`encoded` counts the encoder runs)."""

    def __init__(self, engine: "CitrusVEngine", source: "SliceSource", budget: PixelBudget,
                 cache: SAM2FeatureCache | None = None):
        self.engine = engine
        self.source = source
        self.budget = budget
        self.cache = cache if cache is not None else SAM2FeatureCache(DEFAULT_STORE_BYTES)
        self.encoded = 0
        self.closed = False

    def key(self, index: int):
        return self.source.feature_key(index, self.budget)

    @property
    def cached_slices(self) -> list[int]:
        return [index for index in range(self.source.depth) if self.key(index) in self.cache]

    def pixel_values(self, index: int) -> torch.Tensor:
        """[1, 3, S, S]: the slice's SAM2 input, prepared exactly as the pipeline's."""
        return self.engine.processor.prepare_image(self.source.gray(index), self.budget, qwen=False).sam2_pixel_values

    @torch.inference_mode()
    def backbone(self, index: int) -> dict:
        """SAM2's `forward_image` output for slice `index` (from the cache, or computed once and cached)."""
        entry = self.cache.get(self.key(index))
        if entry is None:
            model = self.engine.model
            out = model.grounding_encoder.backbone(self.pixel_values(index).to(model.device, model.dtype))
            self.encoded += 1
            entry = split_backbone(out)[0]
            if not self.closed:
                self.cache.put(self.key(index), entry)
        return entry.as_backbone_out()

    def features(self, index: int) -> "SAM2ImageFeatures":
        """The mask decoder's input for slice `index`."""
        return self.engine.model.grounding_encoder.features_from_backbone(self.backbone(index))

    def close(self) -> None:
        self.closed = True
        self.cache.discard(self.key(index) for index in range(self.source.depth))

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
