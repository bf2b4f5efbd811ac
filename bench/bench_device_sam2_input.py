#!/usr/bin/env python3
"""The SAM2 input made on the GPU (`model/device_stretch.py`): bit for bit PIL's, and what it costs the host.

    .venv/bin/python bench/bench_device_sam2_input.py [--device cuda] [--repeats 50]

On real slices (slicerio's chest CT, resampled in-plane to 512x512 as clinical scans are; every plane, three
windows) and random ones, at every task's pixel budget: (1) the device path's tensor equals the host path's
(PIL LANCZOS + the float64-derived table) exactly; (2) per slice, the host CPU ms of one thread for the host
path and for the device path (the Qwen resize included in both: it is the SAM2 input's first step), and the
device path's wall ms. A GPU-only check: on a CPU it runs only with --device cpu (the integer arithmetic is the
same; its timing means nothing there). Writes bench/results/device-sam2-input-<hostname>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from citrusv_backend.model.image_prep import FastImagePrep, resample
from citrusv_backend.model.processor import TASK_PIXEL_BUDGETS, smart_resize
from citrusv_backend.volume.io import read_volume
from citrusv_backend.volume.pipeline import SliceSource
from citrusv_backend.volume.windowing import CT_PRESETS, percentile_window

RESULTS = Path(__file__).resolve().parent / "results"
SAM2_SIZE = 1024


def chest_slices(scale: int = 4) -> list[np.ndarray]:
    import slicerio

    volume = read_volume(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd")
    slices = []
    for window in (CT_PRESETS["lung"], CT_PRESETS["soft_tissue"], percentile_window(volume.voxels)):
        for plane in ("axial", "coronal", "sagittal"):
            source = SliceSource(volume, plane, window)
            gray = source.gray(source.depth // 2)
            slices.append(resample(gray, gray.shape[0] * scale, gray.shape[1] * scale))
    return slices


def host_ms(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        fn()
        times.append((time.thread_time() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    prep = FastImagePrep(None, SAM2_SIZE)
    if not prep.use_device(device, force=True):
        raise SystemExit(f"the device path was refused on {device} (see the warning above)")
    rng = np.random.default_rng(0)
    images = chest_slices() + [rng.integers(0, 256, (512, 512), dtype=np.uint8), rng.integers(0, 256, (77, 203), dtype=np.uint8)]
    compared = on_device = 0
    for budget in TASK_PIXEL_BUDGETS.values():
        for image in images:
            height, width = smart_resize(*image.shape, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
            resized = resample(image, height, width)
            made = prep.sam2_pixel_values(resized)
            on_device += made.device.type == device.type
            if not torch.equal(made.cpu(), prep.host_sam2_pixel_values(resized)):
                raise SystemExit(f"MISMATCH: slice {image.shape} at {height}x{width}")
            compared += 1
    slice_512 = images[0]
    budget = TASK_PIXEL_BUDGETS["segment"]
    height, width = smart_resize(*slice_512.shape, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)

    def host_path():
        return prep.host_sam2_pixel_values(resample(slice_512, height, width))

    def device_path():
        return prep.sam2_pixel_values(resample(slice_512, height, width))

    def device_wall():
        started = time.perf_counter()
        device_path()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) * 1000

    host_times, device_times = host_ms(host_path, args.repeats), host_ms(device_path, args.repeats)
    walls = [device_wall() for _ in range(args.repeats)]
    report = {
        "date": date.today().isoformat(), "host": platform.node(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "load_average": os.getloadavg(),
        "bit_identical": {"compared": compared, "made_on_device": on_device, "mismatches": 0},
        "slice": list(slice_512.shape), "qwen_size": [height, width],
        "host_cpu_ms_host_path": round(statistics.median(host_times), 3),
        "host_cpu_ms_device_path": round(statistics.median(device_times), 3),
        "wall_ms_device_path": round(statistics.median(walls), 3),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"device-sam2-input-{platform.node()}-{report['date']}.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
