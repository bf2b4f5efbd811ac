"""Our COCO RLE against pycocotools (the reference clients' decoder), both ways."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask

from citrusv_backend.server import rle

pytestmark = [pytest.mark.service, pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")]

masks = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda shape: arrays(np.bool_, shape, elements=st.booleans()))


def _coco(mask: np.ndarray) -> dict:
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


@settings(max_examples=300, deadline=None)
@given(masks)
def test_encode_is_byte_identical_to_pycocotools(mask):
    assert rle.encode(mask) == _coco(mask)
    np.testing.assert_array_equal(rle.decode(rle.encode(mask)), mask)


@pytest.mark.parametrize("mask", [np.zeros((256, 256), bool), np.ones((256, 256), bool),
                                  np.random.default_rng(0).random((256, 256)) > 0.5,
                                  np.pad(np.ones((100, 3), bool), ((100, 56), (0, 253)))])
def test_large_and_extreme_masks(mask):
    ours = rle.encode(mask)
    assert ours == _coco(mask)
    np.testing.assert_array_equal(coco_mask.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)


def test_decode_refuses_nonsense():
    with pytest.raises(ValueError):
        rle.decode({"size": [4, 4], "counts": "12"})
    with pytest.raises(ValueError):
        rle.decode({"size": [2, 2], "counts": "\x7f"})
