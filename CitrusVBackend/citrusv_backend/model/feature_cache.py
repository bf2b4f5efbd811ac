"""A bounded cache of SAM2 image-encoder outputs, so that no slice is encoded twice.

The SAM2 image encoder is the costliest per-slice step of the mask side, and the same slice is encoded again
and again by a volume task: the key-slice search encodes its candidates, propagation then encodes the key
slice for SAM2's memory, a second target of the same prompt searches the same coarse candidates, hybrid mode
propagates again after each re-anchoring. One entry holds what `SAM2GroundingEncoder.backbone` returns for
one image — exactly the dict SAM2's video predictor keeps per frame — so both the language-prompted decoder
(`features_from_backbone`) and the video predictor (`propagation.reuse_image_features`) take it unchanged.

Keys are opaque and must name everything that determined the SAM2 input: for a volume slice
`SliceSource.feature_key(index, budget)` = (the source's identity: volume, plane, window; the slice; the
pixel budget of the Qwen resize that precedes the SAM2 stretch). A cache lives as long as its owner wants:
`VolumePipeline` makes one per task by default; a caller that refines masks interactively on the same
slices (clicks, boxes) keeps one `SliceSource` and one cache across requests and passes both in.

Entries stay on the model's device; position encodings depend only on the feature-map shapes and are stored
once for all entries. Eviction is least-recently-used by bytes. Entries are views of the encoder's batch output
(no copies on the model thread), so a batch's memory is released when its last row leaves the cache: the cache
can hold up to one batch's worth beyond `max_bytes`. Thread-safe (prefetch workers ask whether a slice is
cached, to skip preparing its SAM2 input).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch

DEFAULT_MAX_BYTES = 512 * 2**20


@dataclass
class SAM2Backbone:
    """One image's `forward_image` output (batch 1)."""

    fpn: list[torch.Tensor]   # backbone_fpn levels [1, C, h, w] (conv_s0 / conv_s1 applied)
    pos: list[torch.Tensor]   # vision_pos_enc levels [1, C, h, w]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fpn)

    def as_backbone_out(self) -> dict:
        return {"vision_features": self.fpn[-1], "vision_pos_enc": list(self.pos), "backbone_fpn": list(self.fpn)}


def split_backbone(backbone_out: dict) -> list[SAM2Backbone]:
    """A batch's `forward_image` output -> one entry per image: views, no copies (nothing modifies these
    tensors in place; SAM2's own per-frame cache relies on that too)."""
    batch = backbone_out["backbone_fpn"][0].size(0)
    pos = [p[:1] for p in backbone_out["vision_pos_enc"]]  # the same for every row
    return [SAM2Backbone([f[row:row + 1] for f in backbone_out["backbone_fpn"]], pos) for row in range(batch)]


def stack_backbones(entries: list[SAM2Backbone]) -> dict:
    """Entries -> one batch's `forward_image` dict (the inverse of `split_backbone`)."""
    fpn = [torch.cat(level) for level in zip(*(e.fpn for e in entries))]
    pos = [p.expand(len(entries), *p.shape[1:]) for p in entries[0].pos]
    return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}


class SAM2FeatureCache:
    """Least-recently-used SAM2 backbone outputs, at most `max_bytes` of feature maps."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, SAM2Backbone] = OrderedDict()
        self._bytes = 0
        self._shared_pos: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> SAM2Backbone | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: Hashable, entry: SAM2Backbone) -> None:
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            shape = tuple((tuple(p.shape), p.dtype, p.device) for p in entry.pos)
            if shape not in self._shared_pos:  # its own copy: a view would keep a whole batch's encodings alive
                self._shared_pos[shape] = [p.clone() for p in entry.pos]
            entry = SAM2Backbone(entry.fpn, self._shared_pos[shape])
            if key in self._entries:
                self._bytes -= self._entries.pop(key).nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1].nbytes

    def discard(self, keys) -> None:
        """Forget these entries (those that are there)."""
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    self._bytes -= entry.nbytes

    def discard_where(self, predicate) -> None:
        """Forget every entry whose key `predicate(key)` picks (e.g. all slices of a deleted volume)."""
        with self._lock:
            for key in [k for k in self._entries if predicate(k)]:
                self._bytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._shared_pos.clear()
            self._bytes = 0

    def describe(self) -> dict:
        return {"entries": len(self._entries), "mb": round(self._bytes / 2**20, 1), "hits": self.hits,
                "misses": self.misses, "used_bytes": self._bytes, "max_bytes": self.max_bytes}
