"""Refinement over HTTP with the real server: a session from a segmentation job, clicks that come back as crops a
client pastes, undo / redo, stale versions refused, sessions ending with their volume, and several clients
refining and segmenting at once without any result landing on the wrong segment or volume."""
from __future__ import annotations

import base64
import threading
import zlib

import numpy as np
import pytest

from citrusv_backend.volume.input.io import Volume
from service_helpers import reassemble, submit, upload, wait

pytestmark = pytest.mark.service

RANGE = [14, 20]
NO_PROPAGATION = {"propagate": False}


def crop_of(mask: np.ndarray) -> dict:
    """A whole-volume mask as a client sends it (its bounding box would do as well)."""
    return {"offset": [0, 0, 0], "shape": list(mask.shape),
            "data": base64.b64encode(zlib.compress(mask.astype(np.uint8).tobytes())).decode()}


def paste(mask: np.ndarray, answer: dict) -> None:
    """What a client does with a step's answer: replace every voxel of the changed box."""
    change = answer["change"]
    if change is None:
        return
    voxels = np.frombuffer(zlib.decompress(base64.b64decode(change["data"])), np.uint8).reshape(change["shape"])
    mask[tuple(slice(o, o + n) for o, n in zip(change["offset"], change["shape"]))] = voxels > 0


def server_mask(client, volume_id: str, segment: str, shape) -> np.ndarray:
    info = client.get(f"/v1/volumes/{volume_id}/segments/{segment}")
    assert info.status_code == 200, info.text
    mask = np.zeros(shape, bool)
    paste(mask, {"change": info.json()["mask"]})
    return mask


def click(slice_index: int, row: int, col: int, positive: bool = True) -> dict:
    """A point at voxel (k, j, i) = (slice_index, row, col) of the array: ijk is its reverse."""
    return {"ijk": [col, row, slice_index], "positive": positive}


@pytest.fixture(scope="module")
def segmented(server, chest):
    import httpx

    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as http:
        volume_id = upload(http, chest)
        job_id = submit(http, volume_id, "segment", "segment the left lung", slice_range=RANGE, key_candidates=2)
        assert wait(http, job_id, timeout=600)["status"] == "done"
        result = http.get(f"/v1/jobs/{job_id}/result").json()
    return volume_id, job_id, result


def test_the_jobs_slice_features_serve_the_first_click(client, segmented):
    """The segmentation job encoded its key slice; a click there decodes on those features, with no encoding."""
    volume_id, job_id, result = segmented
    key = result["segments"][0]["key_slice"]
    assert client.put(f"/v1/volumes/{volume_id}/segments/reuse", json={"job_id": job_id}).status_code == 201
    answer = client.post(f"/v1/volumes/{volume_id}/segments/reuse/refine",
                         json={"points": [click(key, 60, 70)], **NO_PROPAGATION})
    assert answer.status_code == 200, answer.text
    assert answer.json()["timings"]["encoded_slices"] == 0
    assert client.delete(f"/v1/volumes/{volume_id}/segments/reuse").status_code == 200


def test_clicks_undo_and_redo_over_http(client, chest, segmented):
    volume_id, job_id, result = segmented
    original = reassemble(result) == 1
    started = client.put(f"/v1/volumes/{volume_id}/segments/lung", json={"job_id": job_id})
    assert started.status_code == 201, started.text
    info = started.json()
    assert info["version"] == 0 and info["voxels"] == int(original.sum()) and info["query"] == result["segments"][0]["query"]
    assert info["anchors"] == [result["segments"][0]["key_slice"]] and info["slice_range"] == RANGE
    assert np.array_equal(server_mask(client, volume_id, "lung", chest.shape), original)

    mine = original.copy()
    answer = client.post(f"/v1/volumes/{volume_id}/segments/lung/refine",
                         json={"points": [click(16, 60, 70, False)], **NO_PROPAGATION, "expected_version": 0})
    assert answer.status_code == 200, answer.text
    step = answer.json()
    assert (step["volume_id"], step["segment"], step["kind"], step["version"]) == (volume_id, "lung", "refine", 1)
    assert step["refined_slices"] == [16] and set(step["changed_slices"]) <= {16} and step["can_undo"]
    assert "language_model_s" not in step["timings"]
    paste(mine, step)
    assert not mine[16, 60, 70], "the excluded voxel left the segment"
    assert np.array_equal(server_mask(client, volume_id, "lung", chest.shape), mine)
    assert step["voxels"] == int(mine.sum())

    stale = client.post(f"/v1/volumes/{volume_id}/segments/lung/refine",
                        json={"points": [click(15, 50, 50)], "expected_version": 0})
    assert stale.status_code == 409 and stale.json()["error"]["type"] == "version_conflict"

    undone = client.post(f"/v1/volumes/{volume_id}/segments/lung/undo", json={"expected_version": 1}).json()
    paste(mine, undone)
    assert undone["kind"] == "undo" and undone["version"] == 2 and np.array_equal(mine, original)
    redone = client.post(f"/v1/volumes/{volume_id}/segments/lung/redo").json()
    paste(mine, redone)
    assert np.array_equal(mine, server_mask(client, volume_id, "lung", chest.shape)) and not mine[16, 60, 70]
    nothing = client.post(f"/v1/volumes/{volume_id}/segments/lung/redo")
    assert nothing.status_code == 409 and nothing.json()["error"]["type"] == "nothing_to_redo"

    listed = client.get(f"/v1/volumes/{volume_id}/segments").json()["segments"]
    assert [s["segment"] for s in listed] == ["lung"] and 16 in listed[0]["cached_feature_slices"]
    assert client.get("/v1/info").json()["refine"]["sessions"] >= 1


def test_bad_refinement_requests_are_clear(client, chest, segmented):
    volume_id, job_id, _ = segmented
    base = f"/v1/volumes/{volume_id}/segments"
    assert client.put(f"{base}/bad", json={"job_id": job_id}).status_code == 201
    outside = client.post(f"{base}/bad/refine", json={"points": [{"ijk": [500, 5, 16]}]})
    assert outside.status_code == 400 and "outside the volume" in outside.json()["error"]["message"]
    off_range = client.post(f"{base}/bad/refine", json={"points": [click(3, 50, 50)]})
    assert off_range.status_code == 400 and "outside the segmented slices" in off_range.json()["error"]["message"]
    assert client.post(f"{base}/bad/refine", json={"points": []}).status_code == 422
    missing = client.post(f"{base}/nobody/refine", json={"points": [click(16, 50, 50)]})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "session_not_found"
    assert client.put(f"{base}/has space", json={"job_id": job_id}).status_code in (404, 422)
    crop = crop_of(np.zeros((2, 2, 2), bool)) | {"offset": [40, 0, 0]}
    assert client.put(f"{base}/crop", json={"mask": crop}).status_code == 400
    assert client.put(f"{base}/crop", json={"mask": crop_of(np.zeros((2, 2, 2), bool)) | {"data": "@@"}}).status_code == 400
    assert client.put(f"{base}/neither", json={}).status_code == 422
    other = upload(client, chest, name="other")
    wrong = client.put(f"/v1/volumes/{other}/segments/lung", json={"job_id": job_id})
    assert wrong.status_code == 409 and wrong.json()["error"]["type"] == "wrong_volume"
    # A session ends with its volume, and says so.
    assert client.put(f"/v1/volumes/{other}/segments/gone", json={"mask": crop_of(np.zeros(chest.shape, bool))}).status_code == 201
    assert client.delete(f"/v1/volumes/{other}").status_code == 200
    assert client.get(f"/v1/volumes/{other}/segments/gone").status_code == 404
    assert client.delete(f"{base}/bad").json()["deleted"] is True
    ended = client.post(f"{base}/bad/undo")
    assert ended.status_code == 404 and "deleted by a client" in ended.json()["error"]["message"]


def test_a_jobs_slice_features_go_with_its_volume(client, chest):
    """Jobs fill the refinement cache; deleting the volume frees what its jobs left there."""
    def cached() -> int:
        return client.get("/v1/info").json()["refine"]["features"]["entries"]

    before = cached()
    volume_id = upload(client, chest, name="features")
    job_id = submit(client, volume_id, "segment", "segment the left lung", slice_range=[16, 18], key_candidates=1)
    assert wait(client, job_id, timeout=600)["status"] == "done"
    assert cached() > before
    assert client.delete(f"/v1/volumes/{volume_id}").status_code == 200
    assert cached() == before


def test_several_clients_refine_and_segment_at_once(server, chest, segmented):
    """Two volumes (one mirrored), two segments each, four clients clicking on their own slices with version checks,
    while other clients run segmentation jobs: every client's pasted mask equals the server's, and each segment
    changed on its own client's slices only."""
    import httpx

    volume_a, job_id, result = segmented
    mirrored = Volume(np.ascontiguousarray(chest.voxels[:, :, ::-1]), chest.geometry, "mirrored")
    lung = reassemble(result) == 1
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as http:
        volume_b = upload(http, mirrored, name="mirrored")
        box = np.zeros(chest.shape, bool)
        box[14:20, 40:90, 30:80] = True
        starts = {(volume_a, "job"): {"job_id": job_id}, (volume_a, "hand"): {"mask": crop_of(box)},
                  (volume_b, "job"): {"mask": crop_of(lung[:, :, ::-1])}, (volume_b, "hand"): {"mask": crop_of(box)}}
        initial = {(volume_a, "job"): lung, (volume_a, "hand"): box, (volume_b, "job"): lung[:, :, ::-1], (volume_b, "hand"): box}
        for (volume_id, segment), body in starts.items():
            assert http.put(f"/v1/volumes/{volume_id}/segments/{segment}", json=body).status_code == 201

    plans = {(volume_a, "job"): [14, 15], (volume_a, "hand"): [16, 17], (volume_b, "job"): [18, 19],
             (volume_b, "hand"): [15, 18]}
    failures: list[str] = []
    finals: dict = {}

    def clicker(key):
        volume_id, segment = key
        mine, version = initial[key].copy(), 0
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as http:
            url = f"/v1/volumes/{volume_id}/segments/{segment}"
            for number, index in enumerate(plans[key]):
                body = {"points": [click(index, 55 + number, 60, number % 2 == 0)], "expected_version": version,
                        "propagate": False}
                answer = http.post(f"{url}/refine", json=body)
                if answer.status_code != 200:
                    failures.append(f"{key}: {answer.text}")
                    return
                step = answer.json()
                if (step["volume_id"], step["segment"]) != key or step["version"] != version + 1:
                    failures.append(f"{key} got {step['volume_id']}/{step['segment']} v{step['version']}")
                    return
                paste(mine, step)
                version = step["version"]
            undone = http.post(f"{url}/undo", json={"expected_version": version}).json()
            paste(mine, undone)
            finals[key] = mine

    def segmenter(volume_id, results):
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as http:
            job = submit(http, volume_id, "segment", "segment the heart", slice_range=[16, 18], key_candidates=1)
            status = wait(http, job, timeout=600)
            results.append((volume_id, status["status"], http.get(f"/v1/jobs/{job}/result").json().get("volume_id")))

    jobs: list = []
    threads = [threading.Thread(target=clicker, args=(key,)) for key in plans]
    threads += [threading.Thread(target=segmenter, args=(v, jobs)) for v in (volume_a, volume_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(900)
    assert not failures, failures
    assert sorted(jobs) == sorted([(volume_a, "done", volume_a), (volume_b, "done", volume_b)])
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as http:
        for key, mine in finals.items():
            volume_id, segment = key
            on_server = server_mask(http, volume_id, segment, chest.shape)
            assert np.array_equal(mine, on_server), key
            changed = sorted(set(np.nonzero((on_server != initial[key]).any(axis=(1, 2)))[0].tolist()))
            assert set(changed) <= set(plans[key][:1]), (key, changed)  # the second click was undone
    assert len(finals) == len(plans)


def test_the_readme_example_runs(server, chest_ct_path):
    """CitrusVBackend/examples/refine_over_http.py, as the README shows it, against the real server."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "CitrusVBackend" / "examples" / "refine_over_http.py"
    spec = importlib.util.spec_from_file_location("refine_over_http", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    mask = example.main(server.url, server.token, str(chest_ct_path))
    assert mask.shape == (34, 128, 128) and mask.any()
