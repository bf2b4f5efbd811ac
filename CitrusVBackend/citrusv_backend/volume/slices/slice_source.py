"""The volume's slices along one plane as the model sees them: oriented in SA-Med2D's array order (the
radiological display for previews), windowed to uint8, each computed once per task."""
from __future__ import annotations

import logging
import threading

import numpy as np

from ...model.processor import PixelBudget
from ..input.io import Volume
from .orientation import DisplayOrientation, convert_pixels, display_orientation, model_orientation
from .window_lookup import WindowLookup
from .windowing import Window

log = logging.getLogger(__name__)


def volume_token(volume: Volume) -> object:
    """The volume object's identity in SAM2 feature-cache keys (kept on the object; never the volume itself, so a
    cache entry does not keep a deleted volume in memory)."""
    return volume.__dict__.setdefault("_feature_token", object())


class SliceSource:
    """The volume's slices along one plane, windowed to uint8 (computed on demand, once).

    `orientation` is the model's (SA-Med2D's array order), `display` the radiological one for previews.
    Windowing uses a lookup table over the voxel values when the voxels are integers (`WindowLookup`), checked
    against `window.apply` on the first slice. Windowed slices are kept until `forget_slices` (one byte per
    voxel at most), so the targets and stages of a task share them. `identity` names the source in SAM2
    feature-cache keys (`feature_key`): the same for every source of the same volume object, plane and window."""

    def __init__(self, volume: Volume, plane: str, window: Window):
        self.volume = volume
        self.orientation: DisplayOrientation = model_orientation(volume.geometry.direction, plane)
        self.display: DisplayOrientation = display_orientation(volume.geometry.direction, plane)
        self.window = window
        self.depth = volume.shape[self.orientation.slice_axis]
        self.height, self.width = self.orientation.plane_shape(volume.shape)
        # Stable for the same volume object, plane and window: a cache kept across requests finds its slices again.
        self.identity = (volume_token(volume), plane, repr(window))
        self._gray: dict[int, np.ndarray] = {}
        self._lookup: WindowLookup | None | bool = False  # False: not built yet
        self._lock = threading.Lock()

    def gray(self, index: int) -> np.ndarray:
        """Slice `index` in the model's orientation, windowed to uint8 (H, W); read-only, shared."""
        found = self._gray.get(index)
        if found is None:
            found = self._window(self.orientation.slice(self.volume.voxels, index))
            found.flags.writeable = False
            self._gray[index] = found
        return found

    def rgb(self, index: int) -> np.ndarray:
        return np.repeat(self.gray(index)[:, :, None], 3, axis=2)

    def display_rgb(self, index: int) -> np.ndarray:
        gray = self.window.apply(self.display.slice(self.volume.voxels, index))
        return np.repeat(gray[:, :, None], 3, axis=2)

    def to_display(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """Pixel positions in the model's slice -> the display slice's."""
        return convert_pixels(self.orientation, self.display, np.asarray(rows, float), np.asarray(cols, float),
                              self.volume.shape)

    def feature_key(self, index: int, budget: PixelBudget) -> tuple:
        """What determines slice `index`'s SAM2 input: this source (volume, plane, window), the slice, the budget."""
        return (self.identity, index, budget.min_pixels, budget.max_pixels)

    def forget_slices(self) -> None:
        self._gray.clear()

    def _window(self, plane: np.ndarray) -> np.ndarray:
        if self._lookup is False:
            with self._lock:
                if self._lookup is False:
                    self._lookup = self._checked_lookup(plane)
        return self._lookup(plane) if self._lookup else self.window.apply(plane)

    def _checked_lookup(self, plane: np.ndarray) -> WindowLookup | None:
        try:
            lookup = WindowLookup.for_volume(self.window, self.volume.voxels)
        except (TypeError, ValueError) as error:
            log.debug("windowing without a lookup table: %s", error)
            return None
        if lookup is not None and not np.array_equal(lookup(plane), self.window.apply(plane)):
            log.warning("window %r is not elementwise; windowing slices one by one", self.window)
            return None
        return lookup
