#!/usr/bin/env python3
"""`citrusv batch` throughput with the local engine: cases per hour for 0, 1 and 2 I/O worker processes, and the
fraction of its time the model waited for the next volume.

    .venv/bin/python bench/bench_batch.py [--model tiny|FOLDER] [--cases 6] [--scale 4] [--workers 0 1 2]

Inputs: copies of the real chest CT that slicerio ships (128x128x34), resampled in-plane by --scale (4: a
512x512x34 CT, as clinical scans are) and written as .nii.gz, so reading costs what it costs on real data
(gzip inflation, checksum, the NIfTI completeness check). Each case: per-slice segmentation of 3 slices.
Throughput counts from when the model is ready (the model load is reported apart). 0 workers = read in the
model's process, the baseline without read-ahead. Writes bench/results/batch-<hostname>-<date>.json and prints
a table. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from citrusv_backend import __version__
from citrusv_backend.batch.runner import run_batch
from citrusv_backend.cli import build_parser, resolve_model_argument

RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(folder: Path, cases: int, scale: int) -> dict:
    import SimpleITK as sitk
    import slicerio

    ct = sitk.ReadImage(str(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"))
    if scale > 1:
        size = [ct.GetSize()[0] * scale, ct.GetSize()[1] * scale, ct.GetSize()[2]]
        spacing = [ct.GetSpacing()[0] / scale, ct.GetSpacing()[1] / scale, ct.GetSpacing()[2]]
        ct = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(),
                           -1024, ct.GetPixelID())
    folder.mkdir(parents=True)
    first = folder / "ct000.nii.gz"
    sitk.WriteImage(ct, str(first), useCompression=True)
    for number in range(1, cases):
        shutil.copyfile(first, folder / f"ct{number:03d}.nii.gz")
    return {"shape_ijk": list(ct.GetSize()), "file_mb": round(first.stat().st_size / 1e6, 2), "cases": cases}


def run_config(inputs: Path, out: Path, model: str, workers: int) -> dict:
    args = build_parser().parse_args(["batch", str(inputs), "--out", str(out), "--model", model, "--device", "cpu",
                                      "--prompt", "segment the left lung", "--mode", "per-slice",
                                      "--slice-range", "15:18", "--workers", str(workers)])
    figures: dict = {}
    code = run_batch(args, figures)
    if code != 0:
        raise SystemExit(f"batch with {workers} worker(s) exited with {code}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--scale", type=int, default=4, help="in-plane upsampling of the 128x128 chest CT")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    options = parser.parse_args()
    load_at_start = os.getloadavg()  # other work on the machine skews the figures: recorded with them
    model = resolve_model_argument(options.model)
    with tempfile.TemporaryDirectory(prefix="citrusv-bench-batch-") as scratch:
        inputs = make_inputs(Path(scratch) / "in", options.cases, options.scale)
        rows = {}
        for workers in options.workers:
            rows[f"{workers} I/O worker{'s' if workers != 1 else ''}"] = run_config(
                Path(scratch) / "in", Path(scratch) / f"out-{workers}", model, workers)
    record = {"benchmark": "batch", "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "citrusv": __version__, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average_at_start": load_at_start, "model": model, "device": "cpu",
              "case": "per-slice segmentation of 3 slices", "inputs": inputs, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"batch-{platform.node()}-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'config':<14} {'cases/h':>9} {'model waited':>13} {'wait s':>8} {'busy s':>8} {'wall s':>8}")
    for name, row in rows.items():
        print(f"{name:<14} {row['cases_per_hour']:>9.0f} {100 * row['model_wait_fraction']:>12.1f}% "
              f"{row['model_wait_s']:>8.2f} {row['model_busy_s']:>8.2f} {row['wall_s']:>8.1f}")
    shape = "x".join(map(str, inputs["shape_ijk"]))
    print(f"\ninputs: {inputs['cases']} x {shape} CT, {inputs['file_mb']} MB .nii.gz each; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
