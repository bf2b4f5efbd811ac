#!/usr/bin/env python3
"""Milliseconds per refinement click: decode only, and with re-propagation over N slices.

    .venv/bin/python bench/bench_refine.py [--model tiny|FOLDER] [--device cpu|cuda] [--propagation 2 4 8]
    .venv/bin/python bench/bench_refine.py --sam2-large-random --device cuda     # the GPU figure (bench/gpu.sh runs it)

A click is `RefinementSession.refine` as the service runs it: prompts mapped from IJK to the slice, SAM2's
prompt encoder + mask decoder on the slice's cached features, the mask upsampled to the slice, the prompt rules,
the crop diff for undo. Figures: the decoder alone (prompt encoder + mask decoder), a click on a slice whose
features are cached (the goal: <= 50 ms on a GPU), the first click on a slice (its features computed once), and a
click re-propagated N slices each way with the neighbours' features cached (warm) and not (cold). The volume is a
synthetic CT-like 512x512 one (`--shape`), the start mask a lung of it. `--sam2-large-random`: the released SAM2
(Hiera-L, 1024 input) with random weights and the tiny language model (a click never runs the language model),
built in memory — timings of the real SAM2 without the 17 GB download. Writes
bench/results/refine-<device>-<date>.json and prints a table. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from citrusv_backend.benchmark import Figure, _device_description, _versions, format_table, measure, synthetic_ct
from citrusv_backend.model.modeling import SAM2Prompts
from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS
from citrusv_backend.refine.volume_features import SliceFeatureStore
from citrusv_backend.refine.volume_prompts import PointPrompt, RefinePrompts, SlicePrompt
from citrusv_backend.refine.volume_session import RefinementSession
from citrusv_backend.volume.options import RefineOptions
from citrusv_backend.volume.slices.slice_source import SliceSource
from citrusv_backend.volume.slices.windowing import CT_PRESETS

RESULTS = Path(__file__).resolve().parent / "results"


def load(args):
    from citrusv_backend.cli import open_engine, resolve_model_argument
    from citrusv_backend.inference.engine import CitrusVEngine
    from citrusv_backend.model.loader import choose_device, choose_dtype
    from citrusv_backend.model.random_model import build_random, sam2_large_config_dict

    if args.sam2_large_random:
        device = choose_device(args.device)
        dtype = choose_dtype(device, None)
        engine = CitrusVEngine(build_random(sam2_large_config_dict(), device, dtype))
        return engine, "tiny language model + SAM2 Hiera-L (random weights)"
    return open_engine(resolve_model_argument(args.model), args.device, None, None), str(args.model)


def lung_mask(volume) -> np.ndarray:
    """The synthetic CT's right lung (the ellipse its builder draws), all slices."""
    depth, rows, cols = volume.shape
    _, j, i = np.meshgrid(np.arange(depth), np.arange(rows), np.arange(cols), indexing="ij")
    y, x = (j - rows / 2) / (rows / 2), (i - cols / 2) / (cols / 2)
    return ((x + 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1


def clicks(volume, index: int, count: int) -> list[RefinePrompts]:
    """Alternating include / exclude points inside and around the lung on slice `index`."""
    depth, rows, cols = volume.shape
    rng = np.random.default_rng(index)
    return [RefinePrompts([PointPrompt((float(cols * (0.3 + 0.1 * rng.random())), float(rows * (0.35 + 0.3 * rng.random())),
                                        float(index)), n % 2 == 0)]) for n in range(count)]


def run(args, engine=None) -> dict:
    """The figures for `args` (the command line's), with `engine` if given (else the one `args` names)."""
    engine, model_name = (engine, "given engine") if engine is not None else load(args)
    load_before = os.getloadavg()[0]  # a shared machine's other work slows every figure: recorded with them
    device = engine.model.device
    volume = synthetic_ct(tuple(args.shape))
    source = SliceSource(volume, "axial", CT_PRESETS["lung"])
    budget = TASK_PIXEL_BUDGETS["segment"]
    store = SliceFeatureStore(engine, source, budget)
    session = RefinementSession(engine, source, lung_mask(volume), features=store, budget=budget)
    middle = volume.shape[0] // 2
    repeats, warmup = args.repeats, 1
    figures: list[Figure] = []
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    # The first click on a slice: its features are computed once.
    firsts = []
    for index in (middle - 1, middle, middle + 1):
        sync()
        started = time.perf_counter()
        session.refine(clicks(volume, index, 1)[0], RefineOptions(propagate=False))
        sync()
        firsts.append(time.perf_counter() - started)
    figures.append(Figure("first click on a slice (features computed)", "ms", [t * 1000 for t in firsts]))

    grounding = engine.model.grounding_encoder
    features = store.features(middle)
    prompt = SlicePrompt(middle, points=[(200.0, 250.0, 1)])
    coords, labels = prompt.sam2_points(source.height, source.width, grounding.image_size)
    decode = lambda: grounding.decode(features, SAM2Prompts(coords, labels))  # noqa: E731
    with torch.inference_mode():
        figures.append(Figure("SAM2 prompt encoder + mask decoder", "ms",
                              [t * 1000 for t in measure(decode, device, repeats, warmup)]))

    steps = iter(clicks(volume, middle, 10 * (repeats + warmup)))
    click = lambda: session.refine(next(steps), RefineOptions(propagate=False))  # noqa: E731
    figures.append(Figure("click, decode only (features cached)", "ms",
                          [t * 1000 for t in measure(click, device, repeats, warmup)],
                          note="goal on a GPU: <= 50 ms"))

    for slices in args.propagation:
        # more empty slices than it may visit: the figure is for exactly `slices` slices each way
        options = RefineOptions(propagate=True, max_propagation_slices=slices, stop_after_empty=slices + 1)
        index = middle
        session.anchors.clear()
        cold_store = SliceFeatureStore(engine, source, budget)
        cold = RefinementSession(engine, source, session.mask, features=cold_store, budget=budget)
        cold_times = measure(lambda: cold.refine(clicks(volume, index, 1)[0], options), device, 1, 0)
        warm_steps = iter(clicks(volume, index, 10 * (repeats + warmup)))

        def warm_click():
            session.anchors.clear()
            return session.refine(next(warm_steps), options)

        warm = measure(warm_click, device, repeats, warmup)
        figures.append(Figure(f"click + re-propagation over {slices} slices each way (warm)", "ms",
                              [t * 1000 for t in warm], note=f"{2 * slices} slices re-propagated"))
        figures.append(Figure(f"click + re-propagation over {slices} slices each way (cold)", "ms",
                              [t * 1000 for t in cold_times], note="neighbours' features computed on the way"))
        cold_store.close()

    memory = {"host_peak_rss_mb": _peak_rss_mb()}
    if device.type == "cuda":
        memory["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return {"benchmark": "refine", "model": model_name, "timestamp": datetime.now(timezone.utc).isoformat(),
            "host": platform.node(), "device": _device_description(device), "versions": _versions(),
            "volume_shape": list(volume.shape), "repeats": repeats,
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()},
            "figures": [f.to_dict() for f in figures], "memory": memory}


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="checkpoint folder, hub id or 'tiny' (default)")
    parser.add_argument("--sam2-large-random", action="store_true", help="SAM2 Hiera-L with random weights (GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shape", type=int, nargs=3, default=[24, 512, 512], help="synthetic CT (slices rows cols)")
    parser.add_argument("--propagation", type=int, nargs="*", default=[2, 4, 8], help="slices each way")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = report["device"]
    name = device["name"].replace(" ", "_").replace("/", "_")
    path = out / f"refine-{device['type']}-{name}-{report['timestamp'][:10]}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
