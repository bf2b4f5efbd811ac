"""The main job over HTTP: upload the chest CT, segment, poll progress, fetch the result, rebuild the labelmap
at the right voxels — equal to running the volume pipeline in-process on the same volume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from citrusv_backend.volume.options import VolumeOptions
from citrusv_backend.volume.tasks.pipeline import VolumePipeline
from service_helpers import reassemble, submit, upload, volume_payload, wait

pytestmark = pytest.mark.service

PROMPT = "segment the left lung"
RANGE = [15, 18]


def test_upload_segment_poll_and_rebuild_the_labelmap(client, chest, tiny_engine):
    volume_id = upload(client, chest)
    info = client.get(f"/v1/volumes/{volume_id}").json()
    assert info["shape"] == list(chest.shape) and info["dtype"] == str(chest.voxels.dtype)
    np.testing.assert_allclose(info["ijk_to_ras"], chest.geometry.ijk_to_ras(), atol=1e-9)

    job_id = submit(client, volume_id, "segment", PROMPT, slice_range=RANGE)
    early = client.get(f"/v1/jobs/{job_id}/result")
    assert early.status_code == 409 and early.json()["error"]["type"] == "not_ready"
    seen: list[dict] = []
    status = wait(client, job_id, seen=seen)
    assert status["status"] == "done", status
    running = [s for s in seen if s["status"] == "running" and s["progress"]["stage"] not in ("", "starting")]
    assert running, f"never saw a running stage: {[s['progress'] for s in seen]}"
    assert any("key slice" in s["progress"]["stage"] or "propagation" in s["progress"]["stage"] for s in running)

    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["labelmap"]["shape"] == list(chest.shape) and result["random_weights"] is True
    labels = reassemble(result)
    expected = VolumePipeline(tiny_engine).run(chest, PROMPT, "segment", VolumeOptions(slice_range=tuple(RANGE)))
    assert labels.any(), "the tiny model found nothing: the comparison would prove little"
    np.testing.assert_array_equal(labels, expected.labels)
    segment = result["segments"][0]
    assert segment["name"] == "left lung" and segment["label"] == 1 and len(segment["color"]) == 3
    assert segment["measurements"]["voxel_count"] == int((expected.labels == 1).sum())
    assert result["findings"][0]["finding"] == "left lung" and result["findings"][0]["volume_ml"] > 0
    mask = segment["mask"]
    assert mask["offset"][0] >= RANGE[0] and mask["offset"][0] + mask["shape"][0] <= RANGE[1]

    # The result stays available (idempotent GET) until it expires or is deleted.
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 200
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    gone = client.get(f"/v1/jobs/{job_id}")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "job_expired"


@pytest.mark.parametrize("task, options, check", [
    ("ask", {"slice": 16, "max_new_tokens": 4}, lambda r: r["answer"]["slice"] == 16 and r["answer"]["text"]),
    ("detect", {"detect_slices": 2, "max_new_tokens": 4}, lambda r: isinstance(r["boxes"], list)),
    ("report", {"report_slices": 1, "max_new_tokens": 4},
     lambda r: set(r["report"]) == {"findings", "impression", "experimental"} and "EXPERIMENTAL" in r["experimental"]),
])
def test_the_other_volume_tasks(client, chest, task, options, check):
    volume_id = upload(client, chest)
    job_id = submit(client, volume_id, task, "Is there a nodule?", **options)
    assert wait(client, job_id)["status"] == "done"
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["task"] == task and result["segments"] == [] and check(result)


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_other_compressions_give_the_same_volume(client, chest, compression):
    volume_id = upload(client, chest, compression=compression)
    assert client.get(f"/v1/volumes/{volume_id}").json()["shape"] == list(chest.shape)


def test_a_nifti_file_upload_keeps_its_geometry(client, chest, chest_ct_path, tmp_path):
    path = tmp_path / "chest.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(chest_ct_path)), str(path))
    with path.open("rb") as handle:
        response = client.post("/v1/volumes", files={"file": ("chest.nii.gz", handle, "application/octet-stream")},
                               data={"modality": "CT"})
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["name"] == "chest" and info["shape"] == list(chest.shape)
    np.testing.assert_allclose(info["ijk_to_ras"], chest.geometry.ijk_to_ras(), atol=1e-4)
    wrong = client.post("/v1/volumes", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert wrong.status_code == 400 and "NIfTI" in wrong.json()["error"]["message"]
    broken = client.post("/v1/volumes", files={"file": ("broken.nrrd", b"NRRD0004\nnonsense", "application/octet-stream")})
    assert broken.status_code == 400 and "not a readable volume" in broken.json()["error"]["message"]
    # A header naming another file as its data would make the server read its own files as voxels.
    detached = (b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 1\nencoding: raw\ndata file: /etc/hostname\n\n")
    sneaky = client.post("/v1/volumes", files={"file": ("sneaky.nrrd", detached, "application/octet-stream")})
    assert sneaky.status_code == 400 and "separate data file" in sneaky.json()["error"]["message"]


def test_volume_delete_and_unknown_ids(client, chest):
    volume_id = upload(client, chest)
    assert client.delete(f"/v1/volumes/{volume_id}").json() == {"volume_id": volume_id, "deleted": True}
    again = client.get(f"/v1/volumes/{volume_id}")
    assert again.status_code == 404 and "upload it again" in again.json()["error"]["message"]
    unknown = client.get("/v1/volumes/0123")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "volume_not_found"
    assert client.get("/v1/jobs/0123").json()["error"]["type"] == "job_not_found"


@pytest.mark.parametrize("change, status, words", [
    (lambda p: p.update(dtype="complex64"), 422, "dtype"),
    (lambda p: p.update(dtype="int16"), 400, "bytes"),                        # the byte count no longer matches
    (lambda p: p.update(shape=[34, 128, 64]), 400, "bytes"),
    (lambda p: p.update(shape=[34, 128]), 422, "shape"),
    (lambda p: p.update(voxels="not base64!"), 400, "base64"),
    (lambda p: p.update(voxels="aGVsbG8="), 400, "zlib"),
    (lambda p: p.update(compression="gzip"), 400, "gzip"),
    (lambda p: p["ijk_to_ras"][0].__setitem__(0, 0.0), 400, "zero-length"),   # singular
    (lambda p: p["ijk_to_ras"][1].__setitem__(0, 3.0), 400, "orthonormal"),   # sheared
    (lambda p: p["ijk_to_ras"][3].__setitem__(0, 1.0), 400, "last row"),
    (lambda p: p["ijk_to_ras"][0].__setitem__(3, float("nan")), 400, "finite"),
    (lambda p: p.update(shape=[2000, 2000, 2000]), 413, "voxels"),
    (lambda p: p.update(extra_field=1), 422, "extra_field"),
])
def test_bad_uploads_are_4xx_with_a_reason(client, chest, change, status, words):
    payload = volume_payload(chest)
    change(payload)
    # json.dumps, not httpx's json=: it refuses NaN, which a sloppy client may well send
    response = client.post("/v1/volumes", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in (error["message"] + str(error.get("details"))), error


@pytest.mark.parametrize("body, status, words", [
    ({"task": "segment", "prompt": "segment the lung", "options": {"slice_range": [30, 40]}}, 400, "slice range"),
    ({"task": "segment", "prompt": "  "}, 400, "prompt is empty"),
    ({"task": "segment", "prompt": "segment the [SEG] lung"}, 400, "special token"),
    ({"task": "segment", "prompt": "x", "options": {"window": "wide"}}, 400, "window"),
    ({"task": "segment", "prompt": "x", "options": {"mode": "magic"}}, 422, "mode"),
    ({"task": "segment", "prompt": "x", "options": {"axis": "oblique"}}, 422, "axis"),
    ({"task": "segment", "prompt": "x", "options": {"max_new_tokens": 10**6}}, 400, "max_new_tokens"),
    ({"task": "segment", "prompt": "x", "options": {"sliceRange": [1, 2]}}, 422, "sliceRange"),
    ({"task": "classify", "prompt": "x"}, 422, "task"),
    ({"task": "ask", "prompt": "x", "options": {"slice": 99}}, 400, "outside"),
])
def test_bad_jobs_are_4xx_with_a_reason(client, chest, body, status, words):
    volume_id = upload(client, chest)
    response = client.post("/v1/jobs", json={"volume_id": volume_id} | body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] + str(error.get("details")), error
