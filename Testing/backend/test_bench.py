"""The benchmark harness in its quick mode (CPU, tiny model): a well-formed result, nothing about speed."""
from __future__ import annotations

import json
import math

import pytest
import torch

from citrusv_backend.benchmark import BenchSettings, format_table, run_benchmarks, synthetic_ct, write_report

pytestmark = pytest.mark.model


def test_quick_benchmark_produces_a_well_formed_report(tiny_engine, tmp_path):
    report = run_benchmarks(tiny_engine, BenchSettings(), say=lambda message: None)
    names = [figure["name"] for figure in report["figures"]]
    for expected in ("model load", "preprocess one slice", "prefill one slice (time to first token)",
                     "decode per token, batch 1", "decode per token, batch 2", "SAM2 image encoding per slice",
                     "mask decoding per [SEG]", "forced-answer segmentation per slice", "propagation",
                     "batch throughput (single target)",
                     "host per slice: SAM2 input (plain)", "host per slice: SAM2 input (fast)",
                     "host per slice: whole per-slice host path, plain / fast",
                     "host per-slice mode: model waiting share", "host propagation: model waiting share",
                     "host propagation: critical path per slice", "host key-slice search: preprocess CPU per slice"):
        assert expected in names
    for figure in report["figures"]:
        assert math.isfinite(figure["median"]) and figure["median"] >= 0 and figure["min"] <= figure["max"]
        assert figure["limit"] is None and figure["ratio_to_limit"] is None  # no hardware limits on a CPU
    assert report["device"]["type"] == "cpu" and report["memory"]["host_peak_mb"] > 0
    from citrusv_backend import __version__

    assert report["versions"]["citrusv"] == __version__ and report["versions"]["torch"].startswith(torch.__version__[:4])
    assert report["model"]["random_weights"] is True
    host = report["host_side"]
    assert set(host["pipeline"]["phases"]) == {"per-slice mode", "key-slice search", "propagation"}
    assert host["pipeline"]["profile"]["model thread"]["samples"] > 0
    assert host["micro"]["totals_ms"]["SAM2 input (fast)"] > 0 and host["conditions"]["cpu_count"] >= 1
    path = write_report(report, tmp_path)
    assert json.loads(path.read_text())["figures"] == report["figures"]
    assert "propagation" in format_table(report)


def test_synthetic_ct_looks_like_a_ct():
    volume = synthetic_ct((8, 64, 64))
    assert volume.shape == (8, 64, 64) and volume.voxels.dtype.name == "int16"
    assert volume.voxels.min() < -900 and volume.voxels.max() > 500  # air and bone


def test_full_size_architecture_has_8_5_billion_parameters():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from citrusv_backend.model.config import CitrusVConfig
    from citrusv_backend.model.random_model import full_size_config_dict

    config = CitrusVConfig.from_dict(full_size_config_dict())
    assert config.sam2_config_name == "sam2_hiera_l.yaml"
    with torch.device("meta"):
        mllm = Qwen2_5_VLForConditionalGeneration(config.qwen_config())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    language = count(mllm.model.language_model) + count(mllm.lm_head)
    assert language == 7_615_616_512 and count(mllm.model.visual) == 676_550_144
    assert 3584 * 3584 + 3584 + 3584 * 256 + 256 == 13_766_400  # docs/reference-model.md, "The [SEG] projector"
