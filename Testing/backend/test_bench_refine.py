"""bench/bench_refine.py in a tiny configuration (CPU, tiny model): the harness gives every figure, nothing about speed."""
from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_refine.py"


def test_refine_benchmark_reports_every_figure(tiny_engine):
    spec = importlib.util.spec_from_file_location("bench_refine", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(model="tiny", sam2_large_random=False, device="cpu", shape=[5, 64, 64], propagation=[1],
                              repeats=1, out=None)
    report = bench.run(args, engine=tiny_engine)
    names = [figure["name"] for figure in report["figures"]]
    assert names == ["first click on a slice (features computed)", "SAM2 prompt encoder + mask decoder",
                     "click, decode only (features cached)", "click + re-propagation over 1 slices each way (warm)",
                     "click + re-propagation over 1 slices each way (cold)"]
    for figure in report["figures"]:
        assert figure["unit"] == "ms" and math.isfinite(figure["median"]) and figure["median"] > 0
    assert report["volume_shape"] == [5, 64, 64] and report["device"]["type"] == "cpu"
