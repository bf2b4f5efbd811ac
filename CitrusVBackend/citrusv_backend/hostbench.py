"""`citrusv dev bench --host` figures: what the CPU does per slice around the model, and whether the model waits for it.

1. The per-slice host path, step by step, on one slice of a CT-like volume: the plain code (the reference's
   definitions, what the pipeline ran before the fast paths) and the fast one, interleaved in the same run, in
   CPU milliseconds of the calling thread with torch limited to that thread (so "of one core"), median of
   many repetitions (the machine may be shared: the spread and the load average are recorded too).
2. The pipeline as it runs — key-slice search, per-slice mode, propagation — with prefetch workers: host CPU
   ms per slice per stage (preprocess, postprocess), what of it lay on the model thread (the critical path),
   and the share of each phase's wall time the model spent waiting for the host. Propagation is also run
   the plain way (frames prepared inline by the plain code) for contrast.
3. A sampling profile of those runs (a built-in sampler over `sys._current_frames`, per thread role: the
   model thread and the prefetch workers), the functions where host time goes.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

MICRO_QUERY = "Please help segment the lesion in this scan."


@contextmanager
def one_torch_thread():
    """Torch ops on the calling thread only, so that its CPU time is all the work they did."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cpu_ms(fn: Callable[[], object]) -> float:
    started = time.thread_time()
    fn()
    return (time.thread_time() - started) * 1000


def lesion_mask(height: int, width: int) -> np.ndarray:
    """A ring-shaped mask (a lesion with a necrotic core: one hole to fill), ~10 % of the slice."""
    rows, cols = np.mgrid[:height, :width]
    radius = np.hypot(rows - height * 0.45, cols - width * 0.6)
    return (radius < 0.18 * min(height, width)) & (radius > 0.05 * min(height, width))


def slice_steps(engine, source, index: int, budget) -> dict[str, tuple[Callable, Callable]]:
    """step name -> (plain, fast) callables for one slice's host work, plain = the code before the fast paths."""
    from PIL import Image
    from scipy import ndimage

    from .inference.engine import FORCED_SEGMENT_ANSWER, upsample_mask
    from .model.image_prep import resample
    from .model.processor import resize_for_qwen, sam2_pixel_values, smart_resize
    from .volume.slices.window_lookup import WindowLookup
    from .volume.tasks.mask_cleanup import fill_holes

    processor, fast = engine.processor, engine.processor.fast
    voxels, orientation, window = source.volume.voxels, source.orientation, source.window
    lookup = WindowLookup.for_volume(window, voxels)
    gray = lookup(orientation.slice(voxels, index))
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    height, width = smart_resize(*gray.shape, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    resized_pil = resize_for_qwen(Image.fromarray(rgb), budget)
    resized = resample(gray, height, width)
    stretched = fast.stretch_for_sam2(resized)
    tokens = int(height * width) // (14 * 14 * 4)
    logits = torch.from_numpy(np.where(lesion_mask(256, 256), 4.0, -4.0).astype(np.float32))[None]
    logits += torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    mask = lesion_mask(*gray.shape)
    volume_mask = np.zeros(voxels.shape, bool)

    def plain_tokens():
        ids = processor.prompt_pieces(MICRO_QUERY, tokens) + processor.answer_ids(FORCED_SEGMENT_ANSWER)
        return torch.tensor([ids])

    def fast_tokens():
        return torch.tensor([processor.prompt_ids(MICRO_QUERY, tokens) + processor.answer_ids(FORCED_SEGMENT_ANSWER)])

    def back(masks):
        found = masks[0].numpy()
        float(found.mean())
        orientation.put_slice(volume_mask, index, found)

    return {
        "window to uint8": (lambda: np.repeat(window.apply(orientation.slice(voxels, index))[:, :, None], 3, axis=2),
                            lambda: lookup(orientation.slice(voxels, index))),
        "Qwen resize (bicubic)": (lambda: resize_for_qwen(Image.fromarray(rgb), budget),
                                  lambda: resample(gray, height, width)),
        "Qwen pixel values": (lambda: processor.image_processor(images=[resized_pil], do_resize=False, return_tensors="pt"),
                              lambda: fast.qwen_pixel_values(resized)),
        # On a CUDA model the fast path hands the uint8 slice to the device (its host part: the upload and
        # the kernel launches, not synchronised); elsewhere it is PIL's stretch and the table on the host.
        "SAM2 stretch (LANCZOS) + normalisation": (lambda: sam2_pixel_values(resized_pil, fast.sam2_size),
                                                   lambda: fast.sam2_pixel_values(resized)),
        "  of which the normalisation": (None, lambda: fast.normalise_for_sam2(stretched)),
        "prompt tokens": (plain_tokens, fast_tokens),
        "mask upsampling + back into the volume": (lambda: back(upsample_mask(logits, gray.shape, "bilinear")),
                                                   lambda: back(upsample_mask(logits, gray.shape, "bilinear"))),
        "hole filling": (lambda: ndimage.binary_fill_holes(mask), lambda: fill_holes(mask)),
    }


SAM2_INPUT_STEPS = ("Qwen resize (bicubic)", "SAM2 stretch (LANCZOS) + normalisation")


def micro_figures(engine, source, index: int, budget, repeats: int, figure_type, rounds: int = 3) -> tuple[list, dict]:
    """Per-step CPU ms of one slice, plain and fast; totals and ratios.

    Each path is timed in a block of repetitions after one untimed call, in alternating rounds: interleaving
    single calls would charge the fast path with the page faults of the plain path's large temporaries
    (glibc returns them to the system), which a pipeline running only the fast path does not have."""
    steps = slice_steps(engine, source, index, budget)
    samples: dict[tuple[str, str], list[float]] = {}
    per_round = max(1, repeats // rounds)
    with one_torch_thread():
        for _ in range(rounds):
            for name, pair in steps.items():
                for kind, fn in zip(("plain", "fast"), pair):
                    if fn is None:
                        continue
                    fn()
                    samples.setdefault((name, kind), []).extend(cpu_ms(fn) for _ in range(per_round))
    repeats = per_round * rounds
    medians = {key: statistics.median(values) for key, values in samples.items()}
    figures = []
    for (name, kind), values in samples.items():
        figures.append(figure_type(f"host per slice: {name.strip()} ({kind})", "ms", values,
                                   note="CPU ms of one thread, 512x512 slice" if source.height == 512 else "CPU ms of one thread"))
    totals = {}
    for label, names in (("SAM2 input", SAM2_INPUT_STEPS), ("whole per-slice host path", tuple(n for n in steps if not n.startswith(" ")))):
        for kind in ("plain", "fast"):
            per_repeat = [sum(samples[(n, kind)][r] for n in names) for r in range(repeats)]
            totals[(label, kind)] = per_repeat
            figures.append(figure_type(f"host per slice: {label} ({kind})", "ms", per_repeat,
                                       note=" + ".join(names)))
        ratio = statistics.median(totals[(label, "plain")]) / max(statistics.median(totals[(label, "fast")]), 1e-9)
        figures.append(figure_type(f"host per slice: {label}, plain / fast", "x", [ratio],
                                   note="today's code over the fast path, same run"))
    summary = {"steps_ms": {f"{name} ({kind})": round(value, 3) for (name, kind), value in medians.items()},
               "totals_ms": {f"{label} ({kind})": round(statistics.median(v), 3) for (label, kind), v in totals.items()},
               "slice_shape": [source.height, source.width], "repeats": repeats,
               "sam2_input_made_on": "model device" if engine.processor.fast.on_device is not None else "host"}
    return figures, summary


class Sampler:
    """Samples every thread's Python stack every `interval` s; counts leaf functions per thread role.

    Shares are of the role's busy samples (a worker waiting for work is idle, not counted); a leaf that is a
    C call (PIL, numpy, torch) shows as the Python function that made it."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.leaf: dict[str, Counter] = {}
        self.ours: dict[str, Counter] = {}
        self.samples: Counter = Counter()
        self.idle: Counter = Counter()
        self.recording = True  # False: keep sampling (the same overhead for a contrast run) but count nothing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="citrusv-sampler", daemon=True)
        self._main = threading.main_thread().ident

    def _role(self, ident: int, names: dict[int, str]) -> str | None:
        if ident == self._main:
            return "model thread"
        name = names.get(ident, "")
        if name.startswith("citrusv-prefetch"):
            return "prefetch workers"
        return None

    def _run(self) -> None:
        own = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                role = self._role(ident, names) if ident != own and self.recording else None
                if role is None:
                    continue
                code = frame.f_code
                if role == "prefetch workers" and code.co_name == "_worker":
                    self.idle[role] += 1  # waiting for work in the pool's queue
                    continue
                self.samples[role] += 1
                self.leaf.setdefault(role, Counter())[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
                while frame is not None and "citrusv_backend" not in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is not None:
                    self.ours.setdefault(role, Counter())[f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}"] += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self, top: int = 12) -> dict:
        out = {}
        for role, total in self.samples.items():
            out[role] = {"samples": total, "idle_samples": self.idle.get(role, 0), "interval_ms": self.interval * 1000,
                         "leaf_functions": [[name, round(count / total, 4)] for name, count in self.leaf[role].most_common(top)],
                         "citrusv_functions": [[name, round(count / total, 4)]
                                               for name, count in self.ours.get(role, Counter()).most_common(top)]}
        return out


def pipeline_figures(engine, volume, budget, figure_type, say, contrast: bool = True) -> tuple[list, dict]:
    """Per-slice and propagate runs with prefetch; propagation plain and fast; host stats and profile."""
    from .inference.hostwork import default_workers
    from .volume.options import VolumeOptions
    from .volume.tasks.pipeline import VolumePipeline

    depth = volume.shape[0]
    phases: dict[str, dict] = {}
    with Sampler() as sampler:
        say(f"host: per-slice mode over {depth} slices ...")
        result = VolumePipeline(engine).run(volume, "segment the lesion", "segment", VolumeOptions(mode="per-slice"))
        phases["per-slice mode"] = result.timings["host"]["per_slice"]
        say("host: key-slice search ...")
        result = VolumePipeline(engine).run(volume, "segment the lesion", "segment", VolumeOptions())
        phases["key-slice search"] = result.timings["host"]["key_slice_search"]
        say(f"host: propagation over {depth} slices ...")
        phases["propagation"] = _propagation_phase(engine, volume, budget, plain=False)
        if contrast:  # under the same sampling overhead, not counted in the profile
            say("host: propagation, plain frames prepared inline (for contrast) ...")
            sampler.recording = False
            phases["propagation, plain inline frames (before)"] = _propagation_phase(engine, volume, budget, plain=True)
    figures = []
    for name, phase in phases.items():
        for stage, value in phase["cpu_ms_per_slice"].items():
            figures.append(figure_type(f"host {name}: {stage} CPU per slice", "ms", [value]))
        figures.append(figure_type(f"host {name}: critical path per slice", "ms", [phase["critical_ms_per_slice_total"]],
                                   note="model-thread wall time spent on host work or waiting for it"))
        figures.append(figure_type(f"host {name}: total CPU per slice", "ms", [phase["cpu_ms_per_slice_total"]]))
        figures.append(figure_type(f"host {name}: model waiting share", "%", [100 * phase.get("model_waiting_share", 0.0)],
                                   note=f"{phase['slices']} slices, {phase['wall_s']} s wall"))
    return figures, {"phases": phases, "profile": sampler.report(), "workers": default_workers()}


def _propagation_phase(engine, volume, budget, plain: bool) -> dict:
    from .inference.hostwork import HostStats, default_workers, worker_pool
    from .model.feature_cache import SAM2FeatureCache
    from .model.image_prep import FastImagePrep
    from .volume.slices.slice_source import SliceSource
    from .volume.slices.windowing import CT_PRESETS
    from .volume.tasks.propagation import SliceFrames, propagate

    source = SliceSource(volume, "axial", CT_PRESETS["soft_tissue"])
    grounding = engine.model.grounding_encoder
    size = grounding.image_size
    host = HostStats()
    key = np.zeros((size, size), bool)
    key[size // 3: size // 2, size // 2: 2 * size // 3] = True
    predictor = engine.video_predictor()
    if plain:  # the frames as they were made before: plain definitions, inline, no feature reuse
        prep, pixels, workers, features = FastImagePrep(None, size, plain=True), source.rgb, 0, None
    else:
        prep, pixels, workers, features = engine.processor.fast, source.gray, default_workers(), SAM2FeatureCache()
    with worker_pool(workers) as pool:
        frames = SliceFrames(pixels, 0, source.depth, budget, size, prep=prep, pool=pool, depth=4, host=host,
                             features=features, feature_key=lambda index: source.feature_key(index, budget))
        with host.phase("propagation"):
            propagate(predictor, frames, source.height, source.width, {source.depth // 2: key},
                      stop_after_empty=source.depth + 1, autocast=grounding._autocast(engine.loaded.device))
    return host.summary()["propagation"]


def host_section(engine, settings, figure_type, say) -> tuple[list, dict]:
    """Everything above for `settings.host_shape`; returns figures and the details for the report."""
    from .model.processor import TASK_PIXEL_BUDGETS
    from .volume.input.synthetic import synthetic_ct
    from .volume.slices.slice_source import SliceSource
    from .volume.slices.windowing import CT_PRESETS

    volume = synthetic_ct(settings.host_shape)
    budget = TASK_PIXEL_BUDGETS["segment"]
    source = SliceSource(volume, "axial", CT_PRESETS["soft_tissue"])
    say(f"host: one {source.height}x{source.width} slice, plain and fast, {settings.host_repeats} repeats ...")
    load_before = os.getloadavg()
    figures, micro = micro_figures(engine, source, volume.shape[0] // 2, budget, settings.host_repeats, figure_type)
    more, pipeline = pipeline_figures(engine, volume, budget, figure_type, say, settings.host_contrast)
    conditions = {"cpu_count": os.cpu_count(), "load_average_before": [round(v, 2) for v in load_before],
                  "load_average_after": [round(v, 2) for v in os.getloadavg()], "torch_threads": torch.get_num_threads(),
                  "volume": list(settings.host_shape)}
    return figures + more, {"micro": micro, "pipeline": pipeline, "conditions": conditions}
