"""Issue 21's case, as a user meets it: two targets on an oblique DICOM series (written by dicom_series_maker,
not by our writer), whose masks the tiny model makes identical. Every output must deliver each target's
voxels: labels.json, the NIfTI files it names, the .seg.nrrd (slicerio), the DICOM SEG as dcmjs and dcmqi read
it, the SR's volumes (highdicom) and the service's job result for the same series and options.

Run with `-s` to see the table of voxel counts."""
from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_checks import dcmjs_segments, dcmqi_segments
from dicom_series_maker import chest_ct_series, rotation
from service_helpers import submit, volume_payload, wait
from test_service_dicom import reference_of
from test_service_dicom_export import mask_of

from citrusv_backend.volume.input.io import read_volume

pytestmark = [pytest.mark.service, pytest.mark.slow]
PROMPT = "segment the left lung and the heart"
TARGETS = ("left lung", "heart")
OPTIONS = {"mode": "per-slice", "slice_range": [14, 19]}


def run_cli(*args: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "citrusv_backend.cli", *args], capture_output=True, encoding="utf-8",
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_each_target_has_the_same_voxels_in_every_output(tiny_checkpoint, server, chest_ct_path, tmp_path):
    import httpx
    import slicerio

    series = chest_ct_series(chest_ct_path, tmp_path / "oblique", direction=rotation(20.0, -15.0, 30.0))
    volume = read_volume(series.folder)
    out = tmp_path / "out"
    run = run_cli("segment", str(series.folder), "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--out", str(out),
                  "--mode", OPTIONS["mode"], "--slice-range", "{}:{}".format(*OPTIONS["slice_range"]))
    assert run.returncode == 0, run.stderr
    counts: dict[str, dict[str, float]] = {name: {} for name in TARGETS}
    table = json.loads((out / "oblique_labels.json").read_text())
    for row in table["labels"]:
        counts[row["name"]]["labels.json"] = row["voxel_count"]
        nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["file"])))
        counts[row["name"]]["NIfTI " + row["file"]] = int((nifti == (1 if table["per_segment_files"] else row["label"])).sum())
    segmentation = slicerio.read_segmentation(str(out / "oblique_seg.seg.nrrd"))
    for segment in segmentation["segments"]:
        counts[segment["name"]][".seg.nrrd (slicerio)"] = int(slicerio.segment_mask(segmentation, segment).sum())
    for segment in dcmjs_segments(out / "oblique_seg.dcm")["segments"]:
        counts[segment["label"]]["SEG (dcmjs)"] = segment["voxels"]
    grid = volume.to_sitk(np.zeros(volume.shape, np.uint8))
    for name, mask in dcmqi_segments(out / "oblique_seg.dcm", tmp_path / "dcmqi", grid).items():
        counts[name]["SEG (dcmqi)"] = int(mask.sum())
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    sr = hd.sr.srread(out / "oblique_sr.dcm")
    for group in sr.content.get_volumetric_roi_measurement_groups():
        name = group.tracking_identifier.split(" ", 2)[2]          # "CitrusV <label> <name>"
        volume_ml = next(m.value for m in group.get_measurements() if m.name.meaning == "Volume")
        counts[name]["SR volume / voxel volume"] = round(float(volume_ml) / voxel_ml, 3)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300.0) as client:
        response = client.post("/v1/volumes", json=volume_payload(volume) | {"dicom": reference_of(series)})
        assert response.status_code == 201, response.text
        job = submit(client, response.json()["volume_id"], prompt=PROMPT, **OPTIONS)
        assert wait(client, job, timeout=300)["status"] == "done"
        result = client.get(f"/v1/jobs/{job}/result").json()
    masks = [mask_of(segment, volume.shape) for segment in result["segments"]]
    for segment, mask in zip(result["segments"], masks):
        counts[segment["name"]]["service job result (crop)"] = int(mask.sum())
    shared = int((masks[0] & masks[1]).sum())
    print(f"\nvoxels both targets share: {shared}")
    print("\nvoxels per target, per output:")
    for name, by_output in counts.items():
        print(f"  {name}:", ", ".join(f"{k}={v:g}" for k, v in by_output.items()))
    first = counts[TARGETS[0]]["labels.json"]
    assert first > 0 and shared > 0, "the tiny model's masks do not overlap: the comparison would prove little"
    for name in TARGETS:
        assert len(counts[name]) == 7, counts[name]
        assert set(counts[name].values()) == {counts[name]["labels.json"]}, (name, counts[name])
