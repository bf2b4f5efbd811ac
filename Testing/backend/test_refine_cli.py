"""`citrusv refine` as a user runs it: prompts from Slicer markups files or a JSON of steps, a labelmap or a text
prompt to start from, the refined labelmap in the input's geometry, the record and the before / after preview."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from test_cli import citrusv

LEFT_LUNG = 6


def lps_of(path: Path, ijk) -> list[float]:
    image = sitk.ReadImage(str(path))
    return list(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk]))


@pytest.mark.model
def test_refine_a_labelmap_with_markups_files(tiny_checkpoint, chest_ct_path, chest_ct_segmentation_path, work_dir):
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(chest_ct_segmentation_path)))
    k, j, i = 17, *[int(v) for v in np.argwhere(truth[17] == LEFT_LUNG).mean(axis=0).round()]
    assert truth[k, j, i] == LEFT_LUNG
    lps = lps_of(chest_ct_path, (i, j, k))
    exclude = work_dir / "exclude.mrk.json"  # as Slicer writes a point list: RAS positions
    exclude.write_text(json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                                              "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
                                   "markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
                                       {"id": "1", "position": [-lps[0], -lps[1], lps[2]], "positionStatus": "defined"}]}]}))
    out = work_dir / "refined"
    run = citrusv("refine", str(chest_ct_path), "--model", str(tiny_checkpoint), "--labelmap",
                  str(chest_ct_segmentation_path), "--label", str(LEFT_LUNG), "--exclude", str(exclude),
                  "--no-propagate", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "step 1: slices [17] refined, 0 re-propagated" in run.stderr
    refined_path = out / "CTChest4_refined_seg.nii.gz"
    refined_image = sitk.ReadImage(str(refined_path))
    reference = sitk.ReadImage(str(chest_ct_path))
    assert np.allclose(refined_image.GetDirection(), reference.GetDirection())
    assert np.allclose(refined_image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    refined = sitk.GetArrayFromImage(refined_image)
    assert refined[k, j, i] == 0, "the excluded voxel left the segment"
    others = [s for s in range(truth.shape[0]) if s != k]
    assert np.array_equal(refined[others], truth[others]), "only the clicked slice changed"
    others_there = (truth[k] != LEFT_LUNG) & (truth[k] != 0)
    assert np.array_equal(refined[k][others_there], truth[k][others_there]), "other segments keep their voxels"
    record = json.loads((out / "CTChest4_refine.json").read_text())
    assert record["label"] == LEFT_LUNG and record["random_weights"] is True
    assert record["steps"][0]["refined_slices"] == [17] and record["voxels_before"] == int((truth == LEFT_LUNG).sum())
    preview = Image.open(out / "CTChest4_refine_preview.png")
    assert preview.width == 512 and preview.height > 256


@pytest.mark.model
def test_refine_after_a_text_prompt_with_json_steps(tiny_checkpoint, chest_ct_path, work_dir):
    steps = work_dir / "steps.json"
    steps.write_text(json.dumps([{"points": [{"ijk": [40, 60, 16], "positive": True}]},
                                 {"box": {"ijk_min": [20, 30, 17], "ijk_max": [70, 90, 17]}}]))
    out = work_dir / "text"
    run = citrusv("refine", str(chest_ct_path), "--model", str(tiny_checkpoint), "--prompt", "segment the left lung",
                  "--slice-range", "16:18", "--steps", str(steps), "--max-propagation-slices", "1", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "step 1: slices [16] refined" in run.stderr and "step 2: slices [17] refined" in run.stderr
    refined = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "CTChest4_refined_seg.nii.gz")))
    rows, cols = np.nonzero(refined[17] == 1)
    assert rows.size == 0 or (rows.min() >= 30 and rows.max() <= 90 and cols.min() >= 20 and cols.max() <= 70)
    assert not refined[:16].any() and not refined[18:].any()


@pytest.mark.model
def test_refine_refuses_bad_prompts_before_loading_the_model(tiny_checkpoint, chest_ct_path, work_dir):
    bad = work_dir / "bad.json"
    bad.write_text(json.dumps({"points": [{"where": [1, 2, 3]}]}))
    for extra, message in ((["--steps", str(bad)], "give 'ijk'"), (["--box", str(bad)], "not a Slicer markups")):
        run = citrusv("refine", str(chest_ct_path), "--model", str(tiny_checkpoint), "--prompt", "segment the liver",
                      "--out", str(work_dir / "x"), *extra)
        assert run.returncode == 2 and message in run.stderr and "loading model" not in run.stderr, run.stderr
