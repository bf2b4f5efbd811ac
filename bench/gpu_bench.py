#!/usr/bin/env python3
"""The GPU figures in one prepared run, part by part (bench/gpu.sh runs it; docs/gpu-benchmarks.md explains it).

    python bench/gpu_bench.py --parts correctness,ceilings --out DIR [--dry-run] [--deadline EPOCH_S]
    python bench/gpu_bench.py --summarise DIR        # one table, and gpu-<device>-<date>.json of every part
    python bench/gpu_bench.py --record-golden        # re-record bench/golden/tiny-segment.json (CPU, float32)

Each part writes DIR/<n>-<part>.json as soon as it ends, its figures or its error: a part that fails does not
stop the next one. Correctness first (the tiny checkpoint on the device against the CPU, the device-made SAM2
input against PIL's, the golden 2D case), then the figures of the released architecture with random bf16 weights
built on the device (nothing downloaded). Each figure has its hardware limit and the ratio to it where the
device's limits are known. `--dry-run`: the same code on the CPU with the tiny model and small sizes (the test
suite runs it, so that this script works on the rare day a GPU is there).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from citrusv_backend.benchmark import (Figure, decode_figure, _device_description, _versions, decode_weight_bytes,
                                       gpu_limits, measure, synthetic_ct, text_parameter_count)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GOLDEN = BENCH / "golden" / "tiny-segment.json"
QUERY = "Please help segment the lesion in this scan."
PART_ORDER = ("correctness", "ceilings", "language", "propagation", "refine", "volume")


@dataclass(frozen=True)
class Scale:
    """Sizes of one run: the GPU's (the figures the issue asks for) or the dry run's (seconds on a CPU)."""

    slice_side: int = 512                              # the forced-answer segmentation's slice
    volume: tuple[int, int, int] = (200, 512, 512)     # the whole CT, one target
    warmup_volume: tuple[int, int, int] = (8, 512, 512)
    decode_tokens: int = 32
    repeats: int = 5
    warmup: int = 2
    propagation_slices: int = 32                       # frames of the SAM2 propagation figure (1024² inputs)
    refine_shape: tuple[int, int, int] = (24, 512, 512)
    refine_propagation: tuple[int, ...] = (4,)
    copy_mib: int = 2048                               # the measured memory bandwidth's buffer
    matmul_side: int = 8192                            # the measured bf16 matrix rate's product
    sam2_input_slices: int | None = None               # slices of the bit-identity check (None: all of them)
    sam2_input_budgets: tuple[str, ...] | None = None  # tasks whose pixel budgets it covers (None: every task's)


GPU_SCALE = Scale()
# A dry run's CPU time goes mostly to the tiny SAM2 (1024² inputs still): few frames, no warm-up, and no
# re-propagation after a click (Testing/backend/test_bench_refine.py covers that path).
DRY_RUN_SCALE = Scale(slice_side=64, volume=(4, 64, 64), warmup_volume=(2, 32, 32), decode_tokens=3, repeats=1,
                      warmup=0, propagation_slices=2, refine_shape=(4, 64, 64), refine_propagation=(),
                      copy_mib=16, matmul_side=256, sam2_input_slices=3, sam2_input_budgets=("segment",))


@dataclass
class Run:
    out: Path
    dry_run: bool
    deadline: float
    scale: Scale
    device: torch.device
    flops: dict = field(default_factory=dict)     # counted FLOPs per unit of work, shared between parts
    _engines: dict = field(default_factory=dict)

    @property
    def limits(self) -> tuple[float, float] | None:
        """(memory bandwidth GB/s, dense bf16 TFLOP/s) of the device, from its name; None when unknown (a CPU)."""
        return gpu_limits(self.device)

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def tiny_checkpoint(self) -> Path:
        """The tiny checkpoint of the golden case: CITRUSV_TINY_CHECKPOINT (the tests' own), else made once."""
        given = os.environ.get("CITRUSV_TINY_CHECKPOINT")
        if given:
            return Path(given)
        directory = Path(tempfile.gettempdir()) / "citrusv-gpu-bench-tiny"
        if not (directory / "config.json").is_file():
            from citrusv_backend.model.tiny import make_tiny_checkpoint

            make_tiny_checkpoint(directory, seed=0)
        return directory

    def tiny_engine(self, device: str, dtype: str | None = None):
        from citrusv_backend.inference.engine import CitrusVEngine

        from citrusv_backend.model.loader import choose_dtype

        key = ("tiny", device, choose_dtype(torch.device(device), dtype))
        if key not in self._engines:
            self._engines[key] = CitrusVEngine.load(self.tiny_checkpoint(), device=device, dtype=dtype)
        return self._engines[key]

    def figures_engine(self):
        """The released architecture with random bf16 weights on the GPU; the tiny model in a dry run."""
        if "figures" not in self._engines:
            if self.dry_run:
                self._engines["figures"] = self.tiny_engine(str(self.device))
            else:
                from citrusv_backend.inference.engine import CitrusVEngine
                from citrusv_backend.model.random_model import build_full_size_random

                self._engines["figures"] = CitrusVEngine(build_full_size_random(self.device, torch.bfloat16))
        return self._engines["figures"]

    def flop_limit_s(self, flops: float | None) -> float | None:
        """Seconds the counted FLOPs take at the device's dense bf16 rate (None: unknown device or count)."""
        return None if self.limits is None or not flops else flops / (self.limits[1] * 1e12)


# ---------------------------------------------------------------------------------------------- helpers

def counted_flops(fn) -> int | None:
    """FLOPs of `fn()` as torch's FLOP counter counts them (matrix products, convolutions, attention); None, and
    `fn()` run plainly, when the counter cannot follow it (the figure then has no limit rather than a wrong one)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    except Exception as error:  # e.g. an operator the counter has no rule for
        print(f"FLOP counter: {type(error).__name__}: {error}; no limit for this figure", file=sys.stderr, flush=True)
        fn()
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    if not (np.isfinite(value).all() and np.isfinite(reference).all()):
        return float("inf")  # NaN never passes
    return float(np.linalg.norm(value - reference) / max(np.linalg.norm(reference), 1e-30))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def slice_rgb(side: int) -> np.ndarray:
    """The middle axial slice of a CT-like side x side volume, soft-tissue window, as the pipeline feeds it."""
    from citrusv_backend.volume.slices.slice_source import SliceSource
    from citrusv_backend.volume.slices.windowing import CT_PRESETS

    volume = synthetic_ct((8, side, side))
    return SliceSource(volume, "axial", CT_PRESETS["soft_tissue"]).rgb(volume.shape[0] // 2)


def weights_fingerprint(model) -> list[float]:
    """Sum and sum of squares of every weight (float64): which random weights a tiny checkpoint holds."""
    total = squares = 0.0
    for parameter in model.parameters():
        values = parameter.detach().double()
        total += float(values.sum())
        squares += float((values * values).sum())
    return [total, squares]


def check(checks: list[dict], name: str, value: float, limit: float, passed: bool) -> None:
    checks.append({"check": name, "value": value, "limit": limit, "passed": bool(passed)})


# ---------------------------------------------------------------------------------------------- correctness

def part_correctness(run: Run) -> dict:
    """Tiny checkpoint on the device vs the CPU; device-made SAM2 input vs PIL's; the golden 2D case."""
    checks: list[dict] = []
    figures: list[Figure] = []
    reference = run.tiny_engine("cpu")
    on_device = run.tiny_engine(str(run.device), None)  # bf16 on CUDA, float32 on a CPU (a dry run)
    image = slice_rgb(run.scale.slice_side)
    # bf16 operands (1e-3..1e-2 relative error per product) through the language model and SAM2's dozens of
    # layers, against float32 on the CPU: a few 1e-2 at the end. A wrong kernel or layout gives errors of order 1.
    tolerance = 1e-1 if on_device.loaded.dtype == torch.bfloat16 else 1e-4
    ours, theirs = on_device.segment(image, QUERY), reference.segment(image, QUERY)
    for name in ("seg_hidden", "seg_embedding", "low_res_logits"):
        error = relative_error(getattr(ours.masks[0], name), getattr(theirs.masks[0], name))
        check(checks, f"{name}: relative error, {run.device} vs cpu", error, tolerance, error <= tolerance)
    agreement = dice(ours.masks[0].mask, theirs.masks[0].mask)
    check(checks, f"mask Dice, {run.device} vs cpu", agreement, 0.97, agreement >= 0.97)
    logits = [next_token_logits(engine, image) for engine in (on_device, reference)]
    error = relative_error(*logits)
    check(checks, f"next-token logits: relative error, {run.device} vs cpu", error, tolerance, error <= tolerance)
    sam2_input = sam2_input_bit_identity(run, checks, figures)
    golden = golden_case(run, checks)
    failed = [c["check"] for c in checks if not c["passed"]]
    return {"checks": checks, "figures": figures, "passed": not failed, "sam2_input": sam2_input, "golden": golden,
            "error": f"failed: {'; '.join(failed)}" if failed else None}


@torch.inference_mode()
def next_token_logits(engine, image: np.ndarray) -> np.ndarray:
    from PIL import Image

    from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS

    inputs = engine.processor(Image.fromarray(image), QUERY, TASK_PIXEL_BUDGETS["segment"])
    output = engine.model.mllm(**inputs.qwen_kwargs(engine.model.device, engine.model.dtype), use_cache=False,
                               logits_to_keep=1)
    return output.logits[0, -1].float().cpu().numpy()


def sam2_input_slices(side: int) -> list[np.ndarray]:
    """Gray slices of a CT-like volume (every plane, three windows) and two random ones, odd-sized too."""
    from citrusv_backend.volume.slices.slice_source import SliceSource
    from citrusv_backend.volume.slices.windowing import CT_PRESETS, percentile_window

    volume = synthetic_ct((max(side // 4, 8), side, side))
    slices = []
    for window in (CT_PRESETS["lung"], CT_PRESETS["soft_tissue"], percentile_window(volume.voxels)):
        for plane in ("axial", "coronal", "sagittal"):
            source = SliceSource(volume, plane, window)
            slices.append(source.gray(source.depth // 2))
    rng = np.random.default_rng(0)
    return slices + [rng.integers(0, 256, (side, side), dtype=np.uint8), rng.integers(0, 256, (77, 203), dtype=np.uint8)]


def sam2_input_bit_identity(run: Run, checks: list[dict], figures: list[Figure]) -> dict:
    """The SAM2 input made on the device (model/device_stretch.py) equals PIL's bit for bit, at every task's pixel
    budget; and the host CPU ms per slice of both ways (the Qwen resize, its first step, included in both)."""
    from citrusv_backend.hostbench import cpu_ms, one_torch_thread
    from citrusv_backend.model.image_prep import FastImagePrep, resample
    from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS, smart_resize

    prep = FastImagePrep(None, 1024)
    if not prep.use_device(run.device, force=True):
        check(checks, f"SAM2 input made on {run.device}", 0, 1, False)
        return {"refused": True}
    compared = mismatched = on_device = 0
    images = sam2_input_slices(run.scale.slice_side)[-(run.scale.sam2_input_slices or 0):]
    for task, budget in TASK_PIXEL_BUDGETS.items():
        if run.scale.sam2_input_budgets is not None and task not in run.scale.sam2_input_budgets:
            continue
        for image in images:
            height, width = smart_resize(*image.shape, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
            resized = resample(image, height, width)
            made = prep.sam2_pixel_values(resized)
            on_device += made.device.type == run.device.type
            mismatched += not torch.equal(made.cpu(), prep.host_sam2_pixel_values(resized))
            compared += 1
    check(checks, "SAM2 input: slices differing from PIL's", mismatched, 0, mismatched == 0)
    check(checks, "SAM2 input: slices made on the device", on_device, 1, on_device >= 1)
    gray = images[-2]
    budget = TASK_PIXEL_BUDGETS["segment"]
    height, width = smart_resize(*gray.shape, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    ways = {"host path": lambda: prep.host_sam2_pixel_values(resample(gray, height, width)),
            "device path": lambda: prep.sam2_pixel_values(resample(gray, height, width))}
    with one_torch_thread():
        for way, fn in ways.items():
            fn()
            figures.append(Figure(f"SAM2 input, host CPU per slice ({way})", "ms",
                                  [cpu_ms(fn) for _ in range(run.scale.repeats * 4)],
                                  note=f"{gray.shape[0]}x{gray.shape[1]} slice, one thread, device work not waited for"))
    return {"compared": compared, "made_on_device": on_device, "mismatches": mismatched}


# ---------------------------------------------------------------------------------------------- golden case

def golden_outputs(engine) -> dict:
    """The golden case: a forced-answer segmentation of a 128x128 CT-like slice by the tiny checkpoint (seed 0).
    Deterministic: the prompt's tokens, and a mask made clear by the tiny model's scaled mask head."""
    result = engine.segment(slice_rgb(128), QUERY)
    mask = result.masks[0]
    return {"fingerprint": weights_fingerprint(engine.model), "input_ids": result.input_ids,
            "image_grid_thw": result.image_grid_thw, "seg_hidden": mask.seg_hidden[:16].tolist(),
            "seg_hidden_norm": float(np.linalg.norm(mask.seg_hidden)), "iou": mask.iou,
            "low_res_mask": base64.b64encode(np.packbits(mask.low_res_logits > 0)).decode(),
            "mask_pixels": int(mask.mask.sum())}


def record_golden() -> Path:
    from citrusv_backend.inference.engine import CitrusVEngine
    from citrusv_backend.model.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        engine = CitrusVEngine.load(make_tiny_checkpoint(Path(scratch) / "tiny", seed=0), device="cpu")
        recorded = golden_outputs(engine)
    recorded["recorded_with"] = _versions()
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(recorded) + "\n")
    return GOLDEN


def golden_case(run: Run, checks: list[dict]) -> dict:
    """The golden case on the device in float32 (matrix products without TF32; the tiny SAM2 autocasts to bf16
    on CUDA as the released one does) against the recorded CPU outputs."""
    golden = json.loads(GOLDEN.read_text())
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ours = golden_outputs(run.tiny_engine(str(run.device), "float32"))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
    fingerprint = relative_error(ours["fingerprint"], golden["fingerprint"])
    check(checks, "golden: the tiny checkpoint's weights are the recorded ones (relative difference)", fingerprint,
          1e-9, fingerprint <= 1e-9)
    check(checks, "golden: prompt tokens equal the recorded ones", int(ours["input_ids"] == golden["input_ids"]), 1,
          ours["input_ids"] == golden["input_ids"] and ours["image_grid_thw"] == golden["image_grid_thw"])
    hidden = relative_error(ours["seg_hidden"], golden["seg_hidden"])
    check(checks, "golden: [SEG] hidden state (relative error)", hidden, 1e-3, hidden <= 1e-3)
    unpack = lambda text: np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8)).astype(bool)  # noqa: E731
    agreement = dice(unpack(ours["low_res_mask"]), unpack(golden["low_res_mask"]))
    check(checks, "golden: low-resolution mask Dice", agreement, 0.98, agreement >= 0.98)
    return {"recorded_with": golden.get("recorded_with"), "mask_pixels": ours["mask_pixels"],
            "recorded_mask_pixels": golden["mask_pixels"], "iou": ours["iou"], "recorded_iou": golden["iou"]}


# ---------------------------------------------------------------------------------------------- ceilings

def part_ceilings(run: Run) -> dict:
    """The two ceilings measured here (METHOD.md): device-to-device copy bandwidth and a bf16 matrix product's
    rate, on random data; the data sheet's values beside them."""
    device, scale = run.device, run.scale
    count = scale.copy_mib * 2**20 // 4
    source = torch.rand(count, device=device)
    target = torch.empty_like(source)
    seconds = measure(lambda: target.copy_(source), device, scale.repeats * 4, scale.warmup + 1)
    bandwidth = [2 * source.nbytes / s / 1e9 for s in seconds]  # bytes read plus bytes written
    del source, target
    side = scale.matmul_side
    a, b = (torch.randn(side, side, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = measure(lambda: a @ b, device, scale.repeats * 4, scale.warmup + 1)
    rate = [2 * side**3 / s / 1e12 for s in seconds]
    limits = run.limits
    return {"figures": [
        Figure("device-to-device copy bandwidth", "GB/s", bandwidth, limit=limits[0] if limits else None,
               note=f"{scale.copy_mib} MiB copied, read + written bytes; limit = data sheet"),
        Figure("bf16 matrix product rate", "TFLOP/s", rate, limit=limits[1] if limits else None,
               note=f"{side}^3 on random data; limit = data sheet, dense")]}


# ---------------------------------------------------------------------------------------------- language model

def part_language(run: Run) -> dict:
    """Prefill of a forced-answer segmentation of one slice; decode ms/token at batch 1; the whole 2D segmentation."""
    from PIL import Image

    from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS

    engine = run.figures_engine()
    scale, device = run.scale, run.device
    image = slice_rgb(scale.slice_side)
    inputs = engine.processor(Image.fromarray(image), QUERY, TASK_PIXEL_BUDGETS["segment"])
    tokens = int(inputs.input_ids.shape[1])
    timed = lambda fn: measure(fn, device, scale.repeats, scale.warmup)  # noqa: E731
    prefill = lambda: engine.language_pass(inputs, forced=True, max_new_tokens=1)  # noqa: E731
    run.flops["prefill"] = counted_flops(prefill)
    run.flops["segment_slice"] = counted_flops(lambda: engine.segment(image, QUERY))
    figures = [Figure(f"prefill, forced-answer segmentation of one {scale.slice_side}² slice", "ms",
                      [s * 1000 for s in timed(prefill)], limit=_ms(run.flop_limit_s(run.flops["prefill"])),
                      note=f"{tokens} tokens, vision encoder included; limit = counted FLOPs / bf16 rate")]
    limits = run.limits
    settings = argparse.Namespace(decode_tokens=scale.decode_tokens)
    figures.append(decode_figure(engine, inputs, 1, settings, timed, limits, decode_weight_bytes(engine.loaded)))
    figures.append(Figure(f"forced-answer segmentation of one {scale.slice_side}² slice, whole", "ms",
                          [s * 1000 for s in timed(lambda: engine.segment(image, QUERY))],
                          limit=_ms(run.flop_limit_s(run.flops["segment_slice"])),
                          note="prefill + SAM2 image encoder + mask decoder + host work"))
    return {"figures": figures, "details": {"prompt_tokens": tokens, "counted_flops": dict(run.flops),
                                            "text_parameters": text_parameter_count(engine.loaded)}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# ---------------------------------------------------------------------------------------------- SAM2 propagation

def part_propagation(run: Run) -> dict:
    """SAM2 propagation through the slices of a CT-like volume, frames at SAM2's 1024² input, from one key mask."""
    from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS
    from citrusv_backend.volume.slices.slice_source import SliceSource
    from citrusv_backend.volume.slices.windowing import CT_PRESETS
    from citrusv_backend.volume.tasks.propagation import SliceFrames, propagate

    engine = run.figures_engine()
    count = run.scale.propagation_slices
    volume = synthetic_ct((count, run.scale.slice_side, run.scale.slice_side))
    source = SliceSource(volume, "axial", CT_PRESETS["soft_tissue"])
    grounding = engine.model.grounding_encoder
    size = grounding.image_size
    key = np.zeros((size, size), bool)
    key[size // 3: size // 2, size // 2: 2 * size // 3] = True
    predictor = engine.video_predictor()
    autocast = grounding._autocast(run.device)

    def whole():
        frames = SliceFrames(source.rgb, 0, count, TASK_PIXEL_BUDGETS["segment"], size)
        propagate(predictor, frames, source.height, source.width, {0: key}, stop_after_empty=count + 1, autocast=autocast)

    counted = counted_flops(whole)  # also the warm-up
    run.flops["propagation_slice"] = None if counted is None else counted / count
    seconds = measure(whole, run.device, max(run.scale.repeats // 2, 1), 0)
    limit_s = run.flop_limit_s(run.flops["propagation_slice"])
    return {"figures": [Figure(f"SAM2 propagation at {size}²", "slices/s", [count / s for s in seconds],
                               limit=None if limit_s is None else 1 / limit_s,
                               note=f"{count} slices from slice 0, frames prepared inline; limit = bf16 rate / counted FLOPs")],
            "details": {"sam2_image_size": size, "counted_flops_per_slice": run.flops["propagation_slice"]}}


# ---------------------------------------------------------------------------------------------- refinement

def part_refine(run: Run) -> dict:
    """A refinement click (bench/bench_refine.py) with the figures' SAM2 (Hiera-L on a GPU)."""
    sys.path.insert(0, str(BENCH))
    import bench_refine

    engine = run.figures_engine()
    args = argparse.Namespace(model="figures engine", sam2_large_random=False, device=str(run.device),
                              shape=list(run.scale.refine_shape), propagation=list(run.scale.refine_propagation),
                              repeats=max(run.scale.repeats * 2, 1), out=None)
    report = bench_refine.run(args, engine=engine)
    figures = [Figure(f["name"], f["unit"], [f["median"], f["min"], f["max"]], note=f["note"]) for f in report["figures"]]
    encoder_flops, decoder_flops = click_flops(engine)
    # A click is latency-bound: the limits show how far from the arithmetic it is. Re-propagation has none.
    limits = {"SAM2 prompt encoder + mask decoder": decoder_flops, "click, decode only (features cached)": decoder_flops,
              "first click on a slice (features computed)": (encoder_flops + decoder_flops)
              if encoder_flops and decoder_flops else None}
    for figure in figures:
        if figure.name in limits:
            figure.limit = _ms(run.flop_limit_s(limits[figure.name]))
            figure.note = (figure.note + "; " if figure.note else "") + "limit = counted FLOPs / bf16 rate"
    return {"figures": figures, "details": {"volume_shape": report["volume_shape"], "image_encoder_flops": encoder_flops,
                                            "decoder_flops": decoder_flops}}


def click_flops(engine) -> tuple[int | None, int | None]:
    """Counted FLOPs of SAM2's image encoder on one slice, and of its prompt encoder + mask decoder for one point."""
    from citrusv_backend.model.modeling import SAM2Prompts

    grounding = engine.model.grounding_encoder
    size = grounding.image_size
    pixels = torch.rand(1, 3, size, size)
    encoder = counted_flops(lambda: engine.encode_sam2(pixels))
    features = engine.encode_sam2(pixels)
    coords = torch.tensor([[[size / 2, size / 2]]], device=engine.model.device)
    labels = torch.ones(1, 1, dtype=torch.int32, device=engine.model.device)
    with torch.inference_mode():
        return encoder, counted_flops(lambda: grounding.decode(features, SAM2Prompts(coords, labels)))


# ---------------------------------------------------------------------------------------------- whole volume

def part_volume(run: Run) -> dict:
    """A whole CT-like volume, one target, end to end (key-slice search + propagation, voxels in memory to the
    labelmap); batch volumes/hour; the host's CPU per slice while the device works; peak device memory."""
    from citrusv_backend.volume.options import VolumeOptions
    from citrusv_backend.volume.tasks.pipeline import VolumePipeline

    engine = run.figures_engine()
    pipeline = VolumePipeline(engine)
    segment = lambda volume: pipeline.run(volume, "segment the lesion", "segment", VolumeOptions())  # noqa: E731
    warmup = synthetic_ct(run.scale.warmup_volume)
    phases = segment(warmup).timings["host"]
    sync(run.device)
    # The key-slice search looks at a fixed number of candidates whatever the depth; propagation grows with it.
    search_s = phases.get("key_slice_search", {}).get("wall_s", 0.0)
    propagation = phases.get("propagation", {})
    per_slice_s = propagation.get("wall_s", 0.0) / max(propagation.get("slices", 0), 1)
    depth = run.scale.volume[0]
    budget = run.seconds_left() - 20  # the summary and a margin
    if 1.5 * (search_s + depth * per_slice_s) > budget:
        depth = max(warmup.shape[0], int((budget / 1.5 - search_s) / max(per_slice_s, 1e-3)))
    shape = (depth, *run.scale.volume[1:])
    volume = synthetic_ct(shape)
    sync(run.device)
    started = time.perf_counter()
    result = segment(volume)
    sync(run.device)
    seconds = time.perf_counter() - started
    host = result.timings["host"]
    searched = host.get("key_slice_search", {}).get("slices", 0)
    propagated = host.get("propagation", {}).get("slices", 0)
    limit_s = None
    if run.flops.get("segment_slice") and run.flops.get("propagation_slice"):
        limit_s = run.flop_limit_s(searched * run.flops["segment_slice"] + propagated * run.flops["propagation_slice"])
    label = "x".join(map(str, shape))
    note = "" if depth == run.scale.volume[0] else f" (only {depth} slices: {run.scale.volume[0]} would not fit the time left)"
    figures = [Figure(f"whole volume {label}, one target", "s", [seconds], limit=limit_s,
                      note=f"{searched} slices searched, {propagated} propagated; limit = their counted FLOPs / bf16 rate{note}"),
               Figure("batch throughput, one target", "volumes/hour", [3600 / seconds],
                      limit=None if limit_s is None else 3600 / limit_s, note=f"{label} volumes, one after another")]
    for phase in ("key_slice_search", "propagation"):
        if phase in host and host[phase]["slices"]:
            stats = host[phase]
            wall_ms = 1000 * stats["wall_s"] / stats["slices"]
            figures.append(Figure(f"host CPU per slice while the device works: {phase.replace('_', ' ')}", "ms",
                                  [stats["cpu_ms_per_slice_total"]], limit=wall_ms,
                                  note=f"limit = the phase's wall ms per slice ({stats['slices']} slices): below it the "
                                       f"host keeps up; on the model's path {stats['critical_ms_per_slice_total']} ms"))
    if run.device.type == "cuda":
        total = torch.cuda.get_device_properties(run.device).total_memory
        figures.append(Figure("peak device memory (model + whole volume)", "GB",
                              [torch.cuda.max_memory_allocated(run.device) / 1e9], limit=total / 1e9,
                              note="allocated by torch during this part, the model's weights included; limit = the device's memory"))
    return {"figures": figures, "details": {"shape": list(shape), "warmup_shape": list(warmup.shape),
                                            "timings": result.timings, "problems": result.problems}}


PARTS = {"correctness": part_correctness, "ceilings": part_ceilings, "language": part_language,
         "propagation": part_propagation, "refine": part_refine, "volume": part_volume}


# ---------------------------------------------------------------------------------------------- the report

def git_commit() -> dict:
    try:
        found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if found.returncode == 0:
            return {"commit": found.stdout.strip(), "dirty": bool(dirty.stdout.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    for source, value in (("CITRUSV_COMMIT", os.environ.get("CITRUSV_COMMIT")),
                          (".whl/COMMIT (when the wheels were made)", _read(REPO / ".whl" / "COMMIT"))):
        if value:
            return {"commit": value.strip(), "dirty": None, "source": source}
    return {"commit": None, "dirty": None, "source": "no git here, no CITRUSV_COMMIT, no .whl/COMMIT"}


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def environment(run: Run) -> dict:
    versions = _versions() | {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
                              if torch.backends.cudnn.is_available() else None}
    limits = run.limits
    return {"device": _device_description(run.device), "versions": versions, "git": git_commit(),
            "dry_run": run.dry_run, "scale": asdict(run.scale), "host": platform.node(), "cpu_count": os.cpu_count(),
            "limits": {"memory_bandwidth_gb_s": limits[0], "bf16_tflop_s": limits[1],
                       "source": "data sheet, by device name (citrusv_backend.benchmark.GPU_LIMITS)"} if limits else None}


def part_path(out: Path, part: str) -> Path:
    return out / f"{PART_ORDER.index(part) + 1}-{part}.json"


def run_part(run: Run, part: str) -> dict:
    started = time.perf_counter()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    report = {"part": part, "timestamp": datetime.now(timezone.utc).isoformat(), **environment(run)}
    try:
        produced = PARTS[part](run)
        report["figures"] = [f.to_dict() for f in produced.pop("figures", [])]
        report["error"] = produced.pop("error", None)
        report.update(produced)
    except Exception as error:  # a part that fails says why, and the next part runs
        report["error"] = f"{type(error).__name__}: {error}"
        report["traceback"] = traceback.format_exc(limit=8)
        report.setdefault("figures", [])
    report["wall_s"] = round(time.perf_counter() - started, 2)
    if run.device.type == "cuda":
        report["device_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 1e9, 2)
    path = part_path(run.out, part)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"[{part}] {'FAILED: ' + report['error'] if report['error'] else 'done'} ({report['wall_s']} s) -> {path.name}",
          flush=True)
    return report


def write_missing(run: Run, parts: list[str], reason: str) -> None:
    """Parts whose process ended before writing them (a time limit, a crash, no GPU) get a file that says so."""
    for part in parts:
        path = part_path(run.out, part)
        if not path.exists():
            report = {"part": part, "timestamp": datetime.now(timezone.utc).isoformat(), **environment(run),
                      "error": reason, "figures": []}
            path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def summarise(out: Path) -> Path:
    """Print one table of every part's figures and checks; write gpu-<device>-<date>.json holding them all."""
    parts = {}
    for part in PART_ORDER:
        path = part_path(out, part)
        parts[part] = json.loads(path.read_text()) if path.exists() else {"part": part, "error": "not run", "figures": []}
    known = next((p for p in parts.values() if "device" in p), {})
    rows = [f"{'part':12s} {'figure':62s} {'median':>10s} {'unit':9s} {'limit':>10s} {'x limit':>8s}"]
    for name, report in parts.items():
        if report.get("error"):
            rows.append(f"{name:12s} ERROR: {report['error'][:160]}")
        for check_row in report.get("checks", []):
            rows.append(f"{name:12s} {'check: ' + check_row['check']:62.62s} {check_row['value']:>10.4g} "
                        f"{'ok' if check_row['passed'] else 'FAILED':9s} {check_row['limit']:>10.4g}")
        for f in report.get("figures", []):
            limit = "" if f["limit"] is None else f"{f['limit']:.4g}"
            ratio = "" if f["ratio_to_limit"] is None else f"{f['ratio_to_limit']:.3g}"
            rows.append(f"{name:12s} {f['name'][:62]:62s} {f['median']:>10.4g} {f['unit'][:9]:9s} {limit:>10s} {ratio:>8s}")
    device = known.get("device", {"name": "unknown"})
    versions = known.get("versions", {})
    rows.append(f"device: {device.get('name')}; torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
                f"CUDA {versions.get('cuda')}; commit {known.get('git', {}).get('commit')}")
    print("\n".join(rows), flush=True)
    combined = {"device": device, "versions": versions, "git": known.get("git"), "dry_run": known.get("dry_run"),
                "limits": known.get("limits"), "parts": parts,
                "failed_parts": [name for name, report in parts.items() if report.get("error")]}
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(device.get("name", "unknown")))  # the device tool's file names
    path = out / f"gpu-{name}-{datetime.now(timezone.utc).date().isoformat()}.json"
    path.write_text(json.dumps(combined, indent=1, default=str) + "\n")
    print(f"written: {path}", flush=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", help=f"comma-separated, of: {', '.join(PART_ORDER)}")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, small sizes")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the parts must end")
    parser.add_argument("--summarise", type=Path, metavar="DIR", help="print the table of DIR's parts, write the combined JSON")
    parser.add_argument("--missing", metavar="REASON", help="with --parts: write REASON as the error of parts with no file")
    parser.add_argument("--record-golden", action="store_true")
    args = parser.parse_args()
    if args.record_golden:
        print(f"recorded {record_golden()}")
        return 0
    if args.summarise:
        return 1 if json.loads(summarise(args.summarise).read_text())["failed_parts"] else 0
    parts = [p for p in (args.parts or "").split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        parser.error(f"--parts needs some of {', '.join(PART_ORDER)} (unknown: {', '.join(unknown) or 'none given'})")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if not args.dry_run and torch.cuda.is_available() else "cpu")
    run = Run(args.out, args.dry_run, args.deadline or time.time() + 3600, DRY_RUN_SCALE if args.dry_run else GPU_SCALE,
              device)
    if args.missing:
        write_missing(run, parts, args.missing)
        return 0
    if not args.dry_run and device.type != "cuda":
        reason = f"no CUDA device is visible to torch {torch.__version__}; use --dry-run for the CPU check"
        print(reason, file=sys.stderr)
        write_missing(run, parts, reason)
        return 2
    for part in parts:
        run_part(run, part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
