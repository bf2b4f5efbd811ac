"""bench/gpu.sh, the one GPU run: its dry run (every part on the CPU with the tiny model) writes every part's JSON
with its figures, so the script works on the rare day a GPU machine is lent; a part that fails says why and the
others still run. Nothing here is about speed."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED_FIGURES = {
    "correctness": ["SAM2 input, host CPU per slice (host path)", "SAM2 input, host CPU per slice (device path)"],
    "ceilings": ["device-to-device copy bandwidth", "bf16 matrix product rate"],
    "language": ["prefill, forced-answer segmentation of one 64² slice", "decode per token, batch 1",
                 "forced-answer segmentation of one 64² slice, whole"],
    "propagation": ["SAM2 propagation at 1024²"],
    "refine": ["first click on a slice (features computed)", "SAM2 prompt encoder + mask decoder",
               "click, decode only (features cached)"],
    "volume": ["whole volume 4x64x64, one target", "batch throughput, one target",
               "host CPU per slice while the device works: key slice search",
               "host CPU per slice while the device works: propagation"],
}


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.model
@pytest.mark.slow
def test_dry_run_writes_every_part_with_its_figures_and_checks(tiny_checkpoint, tmp_path):
    out = tmp_path / "gpu"
    env = os.environ | {"CITRUSV_TINY_CHECKPOINT": str(tiny_checkpoint), "GPU_BENCH_PYTHON": sys.executable}
    env.pop("OUT", None)
    completed = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    written = sorted(path.name for path in out.iterdir())
    assert len(written) <= 8, written  # the device tool brings back at most 8 files
    gpu_bench = load_gpu_bench()
    for part, names in EXPECTED_FIGURES.items():
        report = json.loads(gpu_bench.part_path(out, part).read_text())
        assert report["error"] is None, (part, report.get("error"), report.get("traceback"))
        assert report["dry_run"] is True and report["device"]["type"] == "cpu"
        assert report["versions"]["torch"] and report["versions"]["transformers"] and "cuda" in report["versions"]
        assert report["git"]["commit"], report["git"]
        figures = {figure["name"]: figure for figure in report["figures"]}
        assert set(names) <= set(figures), (part, sorted(figures))
        for figure in report["figures"]:
            assert math.isfinite(figure["median"]) and figure["median"] >= 0, (part, figure)
            assert figure["limit"] is None or part == "volume"  # no data-sheet limits on a CPU
    correctness = json.loads(gpu_bench.part_path(out, "correctness").read_text())
    assert correctness["passed"] and len(correctness["checks"]) >= 9
    assert correctness["sam2_input"]["mismatches"] == 0 and correctness["sam2_input"]["compared"] >= 3
    language = json.loads(gpu_bench.part_path(out, "language").read_text())
    assert language["details"]["counted_flops"]["prefill"] > 0  # the FLOP counter the limits come from works
    combined = json.loads(next(out.glob("gpu-*.json")).read_text())
    assert combined["failed_parts"] == [] and set(combined["parts"]) == set(EXPECTED_FIGURES)
    assert "whole volume 4x64x64, one target" in completed.stdout and (out / "gpu-log.txt").is_file()


def test_a_failing_part_writes_its_error_and_the_next_part_runs(tmp_path, monkeypatch):
    gpu_bench = load_gpu_bench()
    import torch

    def broken(run):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_bench.PARTS, "language", broken)
    run = gpu_bench.Run(tmp_path, True, 0.0, gpu_bench.DRY_RUN_SCALE, torch.device("cpu"))
    for part in ("language", "ceilings"):
        gpu_bench.run_part(run, part)
    failed = json.loads(gpu_bench.part_path(tmp_path, "language").read_text())
    assert failed["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "broken" in failed["traceback"] and failed["figures"] == []
    ceilings = json.loads(gpu_bench.part_path(tmp_path, "ceilings").read_text())
    assert ceilings["error"] is None and len(ceilings["figures"]) == 2
    # A group stopped at its time limit: its parts without a file say so; the summary names every failed part.
    gpu_bench.write_missing(run, ["language", "volume"], "stopped at its group's time limit (330 s)")
    assert json.loads(gpu_bench.part_path(tmp_path, "language").read_text())["error"].startswith("RuntimeError")
    combined = json.loads(gpu_bench.summarise(tmp_path).read_text())
    assert combined["parts"]["volume"]["error"] == "stopped at its group's time limit (330 s)"
    assert combined["parts"]["volume"]["versions"]["torch"] == torch.__version__  # which versions, even for a failure
    assert set(combined["failed_parts"]) == {"correctness", "language", "propagation", "refine", "volume"}


def test_without_a_visible_gpu_the_run_says_so_in_every_part_it_was_given(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    env = os.environ | {"PYTHONPATH": str(REPO / "CitrusVBackend")}
    completed = subprocess.run([sys.executable, "bench/gpu_bench.py", "--parts", "correctness,ceilings", "--out",
                                str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and "no CUDA device is visible to torch" in completed.stderr
    gpu_bench = load_gpu_bench()
    for part in ("correctness", "ceilings"):
        report = json.loads(gpu_bench.part_path(tmp_path, part).read_text())
        assert report["error"].startswith("no CUDA device is visible") and report["versions"]["torch"]
