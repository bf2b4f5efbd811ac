"""`citrusv dev bench`: per-stage and end-to-end timings, with warm-up, repetitions, median and spread.

On a GPU each figure also gets its hardware limit and the ratio to it: decoding is bound by reading the
language model's weights once per token (bytes / memory bandwidth), prefill by its matrix work
(2 x parameters x tokens / peak bf16 FLOP/s). The limits come from the device's name; unknown devices get
no ratio rather than a made-up one. The host side (CPU work per slice around the model, and whether the
model waits for it) is measured by hostbench.py, also alone (`--host`).
"""
from __future__ import annotations

import json
import platform
import resource
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .volume.input.synthetic import synthetic_ct  # noqa: F401  (re-exported for the benches and tests)

# name fragment -> (memory bandwidth GB/s, dense bf16 TFLOP/s), from the vendors' data sheets.
GPU_LIMITS = {"H200": (4800, 989), "H100 NVL": (3900, 835), "H100 PCIe": (2000, 756), "H100": (3350, 989),
              "A100-SXM4-80GB": (2039, 312), "A100 80GB": (1935, 312), "A100": (1555, 312), "L40S": (864, 362),
              "RTX 4090": (1008, 165), "RTX 6000 Ada": (960, 364), "A10G": (600, 70)}


@dataclass
class Figure:
    name: str
    unit: str
    values: list[float]
    limit: float | None = None          # best possible value on this hardware (same unit)
    note: str = ""

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def spread(self) -> tuple[float, float]:
        return float(min(self.values)), float(max(self.values))

    def to_dict(self) -> dict:
        ratio = None if self.limit in (None, 0) else self.median / self.limit
        return {"name": self.name, "unit": self.unit, "median": self.median, "min": self.spread[0],
                "max": self.spread[1], "repeats": len(self.values), "limit": self.limit, "ratio_to_limit": ratio,
                "note": self.note}


@dataclass
class BenchSettings:
    """Defaults are the quick mode (seconds on a CPU with the tiny model: checks the harness, not speed)."""

    quick: bool = True
    repeats: int = 2
    warmup: int = 1
    decode_tokens: int = 4
    decode_batch: int = 2
    volume_shape: tuple[int, int, int] = (6, 64, 64)   # (slices, rows, cols) of the synthetic CT
    propagation_slices: int = 3
    chest_ct: bool = False
    host_shape: tuple[int, int, int] = (3, 64, 64)     # volume of the host-side figures (hostbench.py)
    host_repeats: int = 2
    host_contrast: bool = False                         # also propagate with the plain, inline frames
    host_only: bool = False

    @classmethod
    def full(cls) -> "BenchSettings":
        return cls(quick=False, repeats=5, warmup=2, decode_tokens=64, decode_batch=8, volume_shape=(200, 512, 512),
                   propagation_slices=60, chest_ct=True, host_shape=(24, 512, 512), host_repeats=30, host_contrast=True)

    @classmethod
    def host(cls) -> "BenchSettings":
        """Only the host-side figures, at full size (minutes on a CPU with the tiny model)."""
        return cls(quick=False, host_shape=(24, 512, 512), host_repeats=30, host_contrast=True, host_only=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def gpu_limits(device: torch.device) -> tuple[float, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, limits in GPU_LIMITS.items():
        if fragment in name:
            return limits
    return None


def run_benchmarks(engine, settings: BenchSettings, say: Callable[[str], None] = print) -> dict:
    loaded = engine.loaded
    device = loaded.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    figures: list[Figure] = [Figure("model load", "s", [loaded.load_seconds])]
    report = {"timestamp": datetime.now(timezone.utc).isoformat(), "host": socket.gethostname(),
              "device": _device_description(device), "model": loaded.describe(), "versions": _versions(),
              "settings": asdict(settings), "limits": None, "figures": figures}
    if not settings.host_only:
        report["limits"] = _model_figures(engine, settings, figures, say)
    from .hostbench import host_section

    host_figures, report["host_side"] = host_section(engine, settings, Figure, say)
    figures += host_figures
    host_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["memory"] = {"host_peak_mb": round(host_peak_mb, 1)}
    if device.type == "cuda":
        report["memory"]["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        report["memory"]["gpu_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    report["figures"] = [f.to_dict() for f in figures]
    return report


def _model_figures(engine, settings: BenchSettings, figures: list[Figure], say) -> dict | None:
    """The model's stages and whole volumes; returns the device's hardware limits (None when unknown)."""
    from .model.processor import TASK_PIXEL_BUDGETS
    from .volume.options import VolumeOptions
    from .volume.slices.slice_source import SliceSource
    from .volume.slices.windowing import CT_PRESETS
    from .volume.tasks.pipeline import VolumePipeline
    from .volume.tasks.propagation import SliceFrames, propagate

    loaded = engine.loaded
    device = loaded.device
    volume = synthetic_ct(settings.volume_shape)
    source = SliceSource(volume, "axial", CT_PRESETS["soft_tissue"])
    slice_rgb = source.rgb(volume.shape[0] // 2)
    query = "Please help segment the lesion in this scan."
    budget = TASK_PIXEL_BUDGETS["segment"]
    run = lambda fn: measure(fn, device, settings.repeats, settings.warmup)  # noqa: E731

    say("preprocessing ...")
    from PIL import Image

    figures.append(Figure("preprocess one slice", "s", run(lambda: engine.processor(Image.fromarray(slice_rgb), query, budget))))
    inputs = engine.processor(Image.fromarray(slice_rgb), query, budget)
    prompt_tokens = int(inputs.input_ids.shape[1])

    say("prefill and decoding ...")
    limits = gpu_limits(device)
    text_params = text_parameter_count(loaded)
    weight_bytes = decode_weight_bytes(loaded)
    prefill = run(lambda: engine.language_pass(inputs, forced=True, max_new_tokens=1))
    figures.append(Figure("prefill one slice (time to first token)", "s", prefill,
                          limit=(2 * text_params * prompt_tokens / (limits[1] * 1e12)) if limits else None,
                          note=f"{prompt_tokens} tokens"))
    figures.append(decode_figure(engine, inputs, 1, settings, run, limits, weight_bytes))
    figures.append(decode_figure(engine, inputs, settings.decode_batch, settings, run, limits, weight_bytes))

    say("SAM2 ...")
    sam2_input = inputs.sam2_pixel_values
    figures.append(Figure("SAM2 image encoding per slice", "s", run(lambda: engine.encode_sam2(sam2_input))))
    features = engine.encode_sam2(sam2_input)
    prompt_embedding = torch.zeros(1, 1, loaded.model.grounding_encoder.hidden_dim, device=device, dtype=loaded.dtype)
    decode_masks = lambda: loaded.model.grounding_encoder.decode_masks(features, prompt_embedding)  # noqa: E731
    figures.append(Figure("mask decoding per [SEG]", "s", run(lambda: torch.inference_mode()(decode_masks)())))
    figures.append(Figure("forced-answer segmentation per slice", "s", run(lambda: engine.segment(slice_rgb, query))))
    batch = [source.rgb(i) for i in range(min(settings.decode_batch, volume.shape[0]))]
    batched = run(lambda: engine.segment_batch(batch, query))
    figures.append(Figure(f"forced-answer segmentation per slice, batch {len(batch)}", "s", [t / len(batch) for t in batched]))

    say("propagation ...")
    pipeline = VolumePipeline(engine)
    predictor = engine.video_predictor()
    size = loaded.model.grounding_encoder.image_size
    count = min(settings.propagation_slices, volume.shape[0])
    frames = SliceFrames(source.rgb, 0, count, budget, size)
    key = np.zeros((size, size), bool)
    key[size // 3: size // 2, size // 2: 2 * size // 3] = True
    autocast = loaded.model.grounding_encoder._autocast(device)
    seconds = run(lambda: propagate(predictor, frames, source.height, source.width, {0: key},
                                    stop_after_empty=count + 1, autocast=autocast))
    figures.append(Figure("propagation", "slices/s", [count / t for t in seconds], note=f"{count} slices from slice 0"))

    say("whole volumes ...")
    options = VolumeOptions()
    whole = measure(lambda: pipeline.run(volume, "segment the lesion", "segment", options), device, max(1, settings.repeats - 1), 0)
    figures.append(Figure(f"whole volume {'x'.join(map(str, settings.volume_shape))}, one target", "s", whole,
                          note="key-slice search + bidirectional propagation, voxels in memory to labelmap"))
    figures.append(Figure("batch throughput (single target)", "volumes/hour", [3600.0 / t for t in whole]))
    if settings.chest_ct:
        from .demo import sample_ct_path
        from .volume.input.io import read_volume

        chest = read_volume(sample_ct_path())
        figures.append(Figure("whole volume: real chest CT 128x128x34, one target", "s",
                              measure(lambda: pipeline.run(chest, "segment the left lung", "segment", options), device, 1, 0)))

    return {"memory_bandwidth_gb_s": limits[0], "bf16_tflop_s": limits[1]} if limits else None


def text_parameter_count(loaded) -> int:
    """Parameters of the language model and its output head (the vision encoder and SAM2 not counted)."""
    language_model = loaded.model.mllm.model.language_model
    return sum(p.numel() for p in language_model.parameters()) + sum(p.numel() for p in loaded.model.mllm.lm_head.parameters())


def decode_weight_bytes(loaded) -> int:
    """Bytes a decoding step must read: every language-model weight once, except the input embedding table
    (one row per token)."""
    read = text_parameter_count(loaded) - loaded.model.mllm.model.language_model.embed_tokens.weight.numel()
    return read * torch.finfo(loaded.dtype).bits // 8


def decode_figure(engine, inputs, batch: int, settings: BenchSettings, run, limits, weight_bytes) -> Figure:
    """ms per decoding step: (generate N tokens - generate 1 token) / (N - 1), EOS suppressed."""
    from transformers import GenerationConfig

    model = engine.model.mllm
    kwargs = inputs.qwen_kwargs(engine.model.device, engine.model.dtype)
    if batch > 1:
        kwargs = {k: torch.cat([v] * batch) for k, v in kwargs.items()}

    def generate(tokens: int):
        config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  eos_token_id=engine.stop_ids, pad_token_id=engine.stop_ids[-1])
        with torch.inference_mode():
            model.generate(**kwargs, generation_config=config)

    one = min(run(lambda: generate(1)))  # the fastest prefill-only run: least disturbed by other load
    many = run(lambda: generate(settings.decode_tokens))
    per_token = [max(m - one, 0.0) / (settings.decode_tokens - 1) * 1000 for m in many]
    limit = weight_bytes / (limits[0] * 1e9) * 1000 if limits else None
    return Figure(f"decode per token, batch {batch}", "ms", per_token, limit=limit,
                  note=f"{settings.decode_tokens} tokens; limit = weight bytes / memory bandwidth")


def _device_description(device: torch.device) -> dict:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": properties.name, "memory_gb": round(properties.total_memory / 2**30, 1)}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _versions() -> dict:
    import importlib.metadata

    from . import __version__

    found = {"citrusv": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "sam2", "flash-attn"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def format_table(report: dict) -> str:
    rows = [f"{'figure':58s} {'median':>12s} {'min':>10s} {'max':>10s} {'limit':>10s} {'x limit':>8s}"]
    for f in report["figures"]:
        limit = "" if f["limit"] is None else f"{f['limit']:.4g}"
        ratio = "" if f["ratio_to_limit"] is None else f"{f['ratio_to_limit']:.2f}"
        rows.append(f"{f['name'][:58]:58s} {f['median']:>9.4g} {f['unit'][:3]:3s}"
                    f"{f['min']:>10.4g} {f['max']:>10.4g} {limit:>10s} {ratio:>8s}")
    memory = ", ".join(f"{k} {v}" for k, v in report["memory"].items())
    return "\n".join(rows + [f"memory: {memory}", f"device: {report['device']}"])


def write_report(report: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    device = report["device"]["name"].replace(" ", "_").replace("/", "_")
    kind = "bench-host" if report["settings"].get("host_only") else "bench"
    path = directory / f"{kind}-{report['device']['type']}-{device}-{report['timestamp'][:10]}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
