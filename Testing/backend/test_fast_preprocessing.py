"""The fast preprocessing equals the plain definitions bit for bit, on random and real images, for every budget.

Plain = the reference's steps as processor.py defines them (`to_rgb`, `resize_for_qwen`, the Hugging Face image
processor with `do_resize=False`, `sam2_pixel_values`) and `window.apply` for windowing; fast = what the pipeline
runs (lookup tables, gray images as one band). Equality is exact (`torch.equal` / `np.array_equal`).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from citrusv_backend.inference.images import load_image
from citrusv_backend.model.image_prep import FastImagePrep
from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS, PixelBudget, resize_for_qwen, sam2_pixel_values
from citrusv_backend.volume.input.io import read_volume
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.window_lookup import WindowLookup
from citrusv_backend.volume.slices.windowing import CT_PRESETS, Window, percentile_window, training_window
from citrusv_backend.volume.tasks.mask_cleanup import fill_holes

pytestmark = pytest.mark.model

# Every budget the tasks use, and the edges of the Qwen resize: a tiny one, min == max, upscaling small images.
BUDGETS = {**TASK_PIXEL_BUDGETS, "tiny": PixelBudget(28 * 28, 4 * 28 * 28), "fixed": PixelBudget(65536, 65536),
           "upscale": PixelBudget(512 * 28 * 28, 1280 * 28 * 28)}


def plain_inputs(processor, image, budget: PixelBudget) -> dict:
    """The image side exactly as the processor computed it before the fast path."""
    resized = resize_for_qwen(load_image(image), budget)
    processed = processor.image_processor(images=[resized], do_resize=False, return_tensors="pt")
    return {"pixel_values": processed["pixel_values"], "grid": processed["image_grid_thw"],
            "sam2": sam2_pixel_values(resized, processor.sam2_image_size), "resized": (resized.height, resized.width)}


def assert_same_inputs(processor, image, budget: PixelBudget) -> None:
    plain = plain_inputs(processor, image, budget)
    fast = processor.prepare_image(image, budget)
    assert fast.resized_size == plain["resized"]
    assert torch.equal(fast.image_grid_thw, plain["grid"])
    assert fast.pixel_values.dtype == plain["pixel_values"].dtype == torch.float32
    assert torch.equal(fast.pixel_values, plain["pixel_values"])
    assert fast.sam2_pixel_values.dtype == torch.float32
    assert torch.equal(fast.sam2_pixel_values, plain["sam2"])


def random_images(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, (512, 512), dtype=np.uint8)
    rgba = rng.integers(0, 256, (60, 90, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((60, 90)) < 0.3, 0, 255)
    return {
        "gray 512x512 array": gray,
        "gray 77x203 array (odd size)": rng.integers(0, 256, (77, 203), dtype=np.uint8),
        "gray as RGB (R = G = B)": np.repeat(rng.integers(0, 256, (150, 90), dtype=np.uint8)[:, :, None], 3, axis=2),
        "colour 131x97": rng.integers(0, 256, (131, 97, 3), dtype=np.uint8),
        "RGBA array (transparent = white)": rgba,
        "PIL L": Image.fromarray(rng.integers(0, 256, (100, 120), dtype=np.uint8)),
        "PIL P (palette)": Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).convert("P"),
        "PIL LA": Image.fromarray(rng.integers(0, 256, (40, 50, 2), dtype=np.uint8), "LA"),
    }


@pytest.mark.parametrize("budget_name", sorted(BUDGETS))
def test_fast_image_inputs_equal_the_plain_ones_on_random_images(tiny_engine, budget_name):
    processor = tiny_engine.processor
    assert processor.fast.verified()
    for name, image in random_images().items():
        try:
            assert_same_inputs(processor, image, BUDGETS[budget_name])
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.fixture(scope="module")
def chest(chest_ct_path):
    return read_volume(chest_ct_path)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_windowing_and_inputs_equal_the_plain_ones_on_the_chest_ct(tiny_engine, chest, plane):
    """Real slices (slicerio's chest CT) in every plane and window, for the segment and detect budgets."""
    processor = tiny_engine.processor
    windows = [training_window(chest.voxels, "CT"), CT_PRESETS["lung"], CT_PRESETS["soft_tissue"], CT_PRESETS["bone"],
               percentile_window(chest.voxels)]
    for window in windows:
        source = SliceSource(chest, plane, window)
        for index in (source.depth // 3, source.depth // 2):
            plain_gray = window.apply(source.orientation.slice(chest.voxels, index))
            assert np.array_equal(source.gray(index), plain_gray)
            assert np.array_equal(source.rgb(index), np.repeat(plain_gray[:, :, None], 3, axis=2))
        index = source.depth // 2
        for budget in (TASK_PIXEL_BUDGETS["segment"], TASK_PIXEL_BUDGETS["detect"]):
            assert_same_inputs(processor, source.gray(index), budget)
            assert_same_inputs(processor, source.rgb(index), budget)  # what the 2D tasks get from a client


def test_model_inputs_equal_the_plain_ones(tiny_engine, ct_slice_rgb):
    """The processor's whole output (tokens too) for a slice, fast path and plain definitions."""
    processor = tiny_engine.processor
    budget = TASK_PIXEL_BUDGETS["segment"]
    inputs = processor(Image.fromarray(ct_slice_rgb), "Please segment the left lung.", budget, answer="Sure, it is [SEG].")
    plain = plain_inputs(processor, ct_slice_rgb, budget)
    tokens = int(plain["grid"].prod()) // 4
    expected_ids = processor.prompt_pieces("Please segment the left lung.", tokens) + processor.answer_ids("Sure, it is [SEG].")
    assert inputs.input_ids[0].tolist() == expected_ids
    assert torch.equal(inputs.pixel_values, plain["pixel_values"]) and torch.equal(inputs.sam2_pixel_values, plain["sam2"])
    again = processor(Image.fromarray(ct_slice_rgb), "Please segment the left lung.", budget, answer="Sure, it is [SEG].")
    assert torch.equal(again.input_ids, inputs.input_ids)  # the remembered prompt ids are copies, not shared


def test_a_failed_self_check_falls_back_to_the_plain_path(tiny_engine, monkeypatch):
    """Were an installed library to compute differently, the fast path is not used (and results stay plain)."""
    image_processor = tiny_engine.processor.image_processor
    broken = FastImagePrep(image_processor, 1024)
    broken.sam2_table = broken.sam2_table + np.float32(1e-3)
    assert not broken.verified()
    image = np.random.default_rng(5).integers(0, 256, (90, 70), dtype=np.uint8)
    prepared = broken.prepare(image, 84, 56)
    resized = Image.fromarray(image).convert("RGB").resize((56, 84))
    assert torch.equal(prepared.sam2_pixel_values, sam2_pixel_values(resized, 1024))
    plain = FastImagePrep(image_processor, 1024, plain=True)
    assert not plain.verified() and torch.equal(plain.prepare(image, 84, 56).sam2_pixel_values, prepared.sam2_pixel_values)
    assert FastImagePrep(image_processor, 1024).verified()


# ---------------------------------------------------------------------------------------------- windowing


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint8", "int8", "int32"])
def test_window_lookup_equals_apply(dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    low, high = max(info.min, -3000), min(info.max, 4000)
    voxels = rng.integers(low, high + 1, (3, 40, 50)).astype(dtype)
    voxels.flat[:2] = (low, high)
    windows = [CT_PRESETS["soft_tissue"], CT_PRESETS["lung"], Window(float(low + 3), 7.5), percentile_window(voxels)]
    for window in windows:
        lookup = WindowLookup.for_volume(window, voxels)
        assert lookup is not None
        for plane in (voxels[1], voxels[:, 5, :], voxels[2, ::-1, ::-1].T):
            assert np.array_equal(lookup(plane), window.apply(plane)), window


def test_float_and_very_wide_volumes_use_apply():
    assert WindowLookup.for_volume(CT_PRESETS["lung"], np.zeros((2, 4, 4), np.float32)) is None
    wide = np.array([[[0, 2**30]]], np.int32)
    assert WindowLookup.for_volume(CT_PRESETS["lung"], wide) is None


class NotElementwise:
    """A Window-like mapping that looks at the whole slice (stretches each slice to its own range)."""

    def apply(self, values):
        values = values.astype(np.float64)
        return np.clip((values - values.min()) / max(values.max() - values.min(), 1) * 255, 0, 255).astype(np.uint8)


def test_a_mapping_that_is_not_elementwise_is_applied_slice_by_slice(chest):
    source = SliceSource(chest, "axial", NotElementwise())
    for index in (5, 17, 30):
        assert np.array_equal(source.gray(index), NotElementwise().apply(source.orientation.slice(chest.voxels, index)))


# ---------------------------------------------------------------------------------------------- masks


def random_masks(count: int = 150, seed: int = 2):
    rng = np.random.default_rng(seed)
    for n in range(count):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        mask = rng.random(shape) < rng.uniform(0.05, 0.8)
        if n % 3 == 0:
            mask = ndimage.binary_closing(mask, iterations=2)
        yield mask
    yield np.zeros((30, 30), bool)
    yield np.ones((30, 30), bool)
    ring = np.zeros((20, 20), bool)
    ring[[0, -1], :] = ring[:, [0, -1]] = True  # a hole bounded by the image border itself
    yield ring


def test_bounding_box_hole_filling_equals_scipy():
    for mask in random_masks():
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask)), mask.shape


# ---------------------------------------------------------------------------------------------- on the device


def test_integer_lanczos_stretch_equals_pil():
    """PIL's fixed-point arithmetic in torch (what a GPU runs; integer ops give the same bytes on the CPU)."""
    from citrusv_backend.model.device_stretch import lanczos_stretch

    rng = np.random.default_rng(8)
    for shape in ((252, 252), (77, 203), (28, 1008), (1024, 56), (1, 1), (255, 3)):
        noise = rng.integers(0, 256, shape, dtype=np.uint8)
        edges = (rng.random(shape) < 0.5).astype(np.uint8) * 255  # overshoot: exercises the clipping
        for pixels in (noise, edges):
            expected = np.asarray(Image.fromarray(pixels).resize((1024, 1024), Image.LANCZOS))
            assert np.array_equal(lanczos_stretch(torch.from_numpy(pixels), 1024).numpy(), expected), shape


@pytest.fixture(scope="module")
def device_prep(tiny_engine):
    prep = FastImagePrep(tiny_engine.processor.image_processor, tiny_engine.processor.sam2_image_size)
    assert not prep.use_device("cpu")          # a CPU model keeps PIL on the host (faster there) ...
    assert prep.use_device("cpu", force=True)  # ... but the device path runs on any device
    return prep


def test_sam2_input_on_the_device_equals_the_plain_one_for_every_budget(tiny_engine, device_prep, chest):
    images = [image for name, image in random_images().items() if name.startswith("gray 7") or name.startswith("gray 5")]
    images += [SliceSource(chest, plane, CT_PRESETS["soft_tissue"]).gray(10) for plane in ("axial", "coronal")]
    on_device = 0
    for budget in BUDGETS.values():
        for image in images:
            plain = plain_inputs(tiny_engine.processor, image, budget)
            height, width = plain["resized"]
            prepared = device_prep.prepare(image, height, width, qwen=False)
            assert torch.equal(prepared.sam2_pixel_values, plain["sam2"])
            on_device += max(height, width) <= 1024
    assert on_device >= len(images) * 4  # the segment budget and the small ones ran the device path


def test_the_device_path_is_refused_when_it_differs(tiny_engine, monkeypatch):
    from citrusv_backend.model import device_stretch

    prep = FastImagePrep(tiny_engine.processor.image_processor, tiny_engine.processor.sam2_image_size)
    monkeypatch.setattr(device_stretch, "PRECISION_BITS", 21)  # an arithmetic that is not PIL's
    device_stretch.lanczos_coefficients.cache_clear()
    try:
        assert not prep.use_device("cpu", force=True) and prep.on_device is None
    finally:
        device_stretch.lanczos_coefficients.cache_clear()
