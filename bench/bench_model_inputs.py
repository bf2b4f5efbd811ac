#!/usr/bin/env python3
"""With the released weights: do the training-data conventions pay off, and is the presence rule right?

    .venv/bin/python bench/bench_model_inputs.py --model jdh-algo/Citrus-V-8B-v1.0 [--device cuda] [--out bench/results]

On slicerio's chest CT and its ground truth (left lung, right lung, thoracic vertebral column), every axial slice is
segmented alone (forced answer) twice: with the training normalisation (the default) and with a clinical window
(the lung preset for the lungs, bone for the spine). Per window it records the mean Dice over the slices that show
the target, and, per presence rule ("mask", "object-score"), how often the rule's verdict agrees with the ground
truth (a slice shows the target when at least 0.2 % of its pixels are the target's). It also reports the evidence
figures (mean logit, area, object score) on slices with and without the target, which is what the mask rule's
thresholds should be checked against. Writes bench/results/model-inputs-<hostname>-<date>.json and prints a table.
Needs the real checkpoint (a GPU is advisable: 34 slices x 3 targets x 2 windows); `--model tiny` only checks
that the script runs. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

TARGETS = {"left lung": (6,), "right lung": (5,), "thoracic vertebral column": (3,)}
CLINICAL = {"left lung": "lung", "right lung": "lung", "thoracic vertebral column": "bone"}
PRESENT_FRACTION = 0.002


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="jdh-algo/Citrus-V-8B-v1.0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import slicerio

    from citrusv_backend.cli import open_engine, resolve_model_argument
    from citrusv_backend.volume.input.io import read_volume
    from citrusv_backend.volume.slices.slice_source import SliceSource
    from citrusv_backend.volume.slices.windowing import CT_PRESETS, training_window
    from citrusv_backend.volume.tasks.presence import Evidence, PresenceRule
    from citrusv_backend.volume.tasks.targets import QUERY_TEMPLATE

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    labels = slicerio.read_segmentation(str(data / "Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    engine = open_engine(resolve_model_argument(args.model), args.device, None, None)
    rules = {name: PresenceRule(name) for name in ("mask", "object-score")}
    report = {"model": engine.loaded.describe(), "host": platform.node(), "targets": {}}
    started = time.perf_counter()
    for target, values in TARGETS.items():
        rows = {}
        for window_name, window in (("training", training_window(volume.voxels)), ("clinical", CT_PRESETS[CLINICAL[target]])):
            source = SliceSource(volume, "axial", window)
            truth = [source.orientation.slice(np.isin(labels, values), k) for k in range(source.depth)]
            results = []
            for start in range(0, source.depth, 4):
                indices = list(range(start, min(start + 4, source.depth)))
                results += engine.segment_batch([source.rgb(k) for k in indices], QUERY_TEMPLATE.format(target=target))
            shown = [t.mean() >= PRESENT_FRACTION for t in truth]
            evidence = [Evidence.from_result(r) for r in results]
            dice = [2 * (r.masks[0].mask & t).sum() / max(r.masks[0].mask.sum() + t.sum(), 1)
                    for r, t, s in zip(results, truth, shown) if s and r.masks]
            rows[window_name] = {
                "mean_dice_on_target_slices": float(np.mean(dice)) if dice else None,
                "rule_agreement": {name: float(np.mean([rule.present(e) == s for e, s in zip(evidence, shown)]))
                                   for name, rule in rules.items()},
                "evidence_with_target": summary([e for e, s in zip(evidence, shown) if s and e]),
                "evidence_without_target": summary([e for e, s in zip(evidence, shown) if not s and e]),
            }
        report["targets"][target] = rows
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model-inputs-{platform.node()}-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'target':28s} {'window':9s} {'Dice':>6s} {'mask rule':>10s} {'object rule':>12s}")
    for target, rows in report["targets"].items():
        for window_name, row in rows.items():
            dice = row["mean_dice_on_target_slices"]
            print(f"{target:28s} {window_name:9s} {'-' if dice is None else f'{dice:.3f}':>6s} "
                  f"{row['rule_agreement']['mask']:10.3f} {row['rule_agreement']['object-score']:12.3f}")
    print(f"written to {path}")
    return 0


def summary(evidence: list) -> dict:
    if not evidence:
        return {}
    return {field: {"median": float(np.median([getattr(e, field) for e in evidence])),
                    "min": float(np.min([getattr(e, field) for e in evidence])),
                    "max": float(np.max([getattr(e, field) for e in evidence]))}
            for field in ("mean_logit", "area", "object_score", "iou")} | {"slices": len(evidence)}


if __name__ == "__main__":
    raise SystemExit(main())
