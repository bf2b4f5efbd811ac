"""Segments that may overlap (a lesion inside its organ, two targets given the same mask): each keeps its own mask.

Files that hold one label per voxel cannot hold overlapping segments, so there are two derived forms:
- the *multi-label* labelmap (`multilabel`): every segment painted largest first, so a segment lying inside
  another (smaller) is drawn over it and stays visible; among equal sizes the later label is on top;
- *layers* (`layers`): as few labelmaps as the overlaps need, each segment whole in one of them (what Slicer's
  `.seg.nrrd` stores; the first layer that none of its voxels is taken in, in label order).
Every measurement and every other output uses the segment's own mask (`Segment.mask`), never these.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Masked(Protocol):
    label: int
    mask: np.ndarray


def drawing_order(segments: Sequence[Masked]) -> list[Masked]:
    """Largest first (drawn first, so under the others); equal sizes in label order."""
    return sorted(segments, key=lambda s: (-int(np.count_nonzero(s.mask)), s.label))


def multilabel(segments: Sequence[Masked], shape: tuple[int, ...]) -> np.ndarray:
    """One uint8 label per voxel: the smaller segment on top where segments overlap."""
    labels = np.zeros(shape, np.uint8)
    for segment in drawing_order(segments):
        labels[segment.mask] = segment.label
    return labels


def overlapping(segments: Sequence[Masked]) -> dict[int, list[int]]:
    """label -> the labels of the other segments sharing at least one voxel with it (only labels that overlap)."""
    found = [s for s in segments if s.mask.any()]
    shared: dict[int, list[int]] = {}
    for n, first in enumerate(found):
        for second in found[n + 1:]:
            if np.logical_and(first.mask, second.mask).any():
                shared.setdefault(first.label, []).append(second.label)
                shared.setdefault(second.label, []).append(first.label)
    return {label: sorted(others) for label, others in sorted(shared.items())}


def layers(segments: Sequence[Masked], shape: tuple[int, ...]) -> tuple[np.ndarray, dict[int, int]]:
    """(layers as a (count, *shape) uint8 array holding each segment's label, label -> its layer).

    One layer when nothing overlaps; a segment goes into the first layer where none of its voxels is taken."""
    stack: list[np.ndarray] = []
    where: dict[int, int] = {}
    for segment in sorted(segments, key=lambda s: s.label):
        for index, layer in enumerate(stack):
            if not layer[segment.mask].any():
                break
        else:
            stack.append(np.zeros(shape, np.uint8))
            index = len(stack) - 1
        stack[index][segment.mask] = segment.label
        where[segment.label] = index
    if not stack:
        stack.append(np.zeros(shape, np.uint8))
    return np.stack(stack), where


def visible_voxels(segment: Masked, labels: np.ndarray) -> int:
    """How many of the segment's voxels carry its label in the multi-label labelmap."""
    return int(np.count_nonzero(labels[segment.mask] == segment.label))
