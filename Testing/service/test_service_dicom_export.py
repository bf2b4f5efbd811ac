"""Per-segment masks in the service's result and the DICOM export of the segments a client holds.

The tiny random model gives every target of a prompt the same mask (its [SEG] state does not depend on the
target much): two targets are the "identical masks" overlap case. Each segment's crop must carry all of its
voxels (the old shared labelmap gave the second target none), and an export of edited masks must write a SEG
whose frames hold exactly those voxels and an SR whose volumes are the exported ones."""
from __future__ import annotations

import base64
import io
import zlib

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_series_maker import chest_ct_series
from service_helpers import submit, volume_payload, wait
from test_service_dicom import reference_of

from citrusv_backend.server.codec import decode_crop
from citrusv_backend.volume.input.io import read_volume

pytestmark = pytest.mark.service


def crop_of(mask: np.ndarray, label: int) -> dict:
    """A client's encoding of a mask (bounding box, zlib + base64), written here from the protocol's words."""
    where = np.nonzero(mask)
    low = [int(a.min()) for a in where]
    high = [int(a.max()) + 1 for a in where]
    box = mask[tuple(slice(a, b) for a, b in zip(low, high))].astype(np.uint8) * label
    return {"offset": low, "shape": [b - a for a, b in zip(low, high)], "dtype": "uint8", "encoding": "zlib+base64",
            "data": base64.b64encode(zlib.compress(box.tobytes())).decode()}


def mask_of(segment: dict, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    crop = segment["mask"]
    mask[tuple(slice(o, o + n) for o, n in zip(crop["offset"], crop["shape"]))] = decode_crop(crop) > 0
    return mask


@pytest.fixture(scope="module")
def two_targets(client_module, chest_ct_path, tmp_path_factory):
    """A series upload with its DICOM reference and a finished two-target job on it."""
    client = client_module
    series = chest_ct_series(chest_ct_path, tmp_path_factory.mktemp("service-export") / "series")
    volume = read_volume(series.folder)
    response = client.post("/v1/volumes", json=volume_payload(volume) | {"dicom": reference_of(series)})
    assert response.status_code == 201, response.text
    volume_id = response.json()["volume_id"]
    job = submit(client, volume_id, prompt="segment the left lung and the heart", mode="per-slice",
                 slice_range=[15, 18], dicom_out=False)
    assert wait(client, job, timeout=300)["status"] == "done"
    return {"series": series, "volume": volume, "volume_id": volume_id, "job": job,
            "result": client.get(f"/v1/jobs/{job}/result").json()}


@pytest.fixture(scope="module")
def client_module(server):
    import httpx

    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300.0) as http:
        yield http


def test_each_segment_carries_its_own_voxels_when_masks_overlap(two_targets):
    result, shape = two_targets["result"], two_targets["volume"].shape
    lung, heart = result["segments"]
    masks = [mask_of(s, shape) for s in (lung, heart)]
    assert masks[0].any() and (masks[0] & masks[1]).any(), "the tiny model's masks do not overlap: nothing tested"
    for segment, mask in zip((lung, heart), masks):
        assert segment["found"] is True and segment["reason"] is None
        assert int(mask.sum()) == segment["measurements"]["voxel_count"]
        assert set(np.unique(decode_crop(segment["mask"]))) <= {0, segment["label"]}
        assert {"answer", "key_slice", "score"} <= set(segment)


def test_export_writes_the_edited_segments(client_module, two_targets):
    client, shape = client_module, two_targets["volume"].shape
    lung, heart = (mask_of(s, shape) for s in two_targets["result"]["segments"])
    edited_heart = heart.copy()
    edited_heart[: int(np.nonzero(heart)[0].max())] = False          # the user kept only its last slice
    body = {"segments": [{"name": "left lung", "label": 1, "color": [10, 200, 30], "mask": crop_of(lung, 1)},
                         {"name": "heart", "label": 2, "color": [200, 10, 30], "mask": crop_of(edited_heart, 2)}],
            "job_id": two_targets["job"], "edited": True}
    response = client.post(f"/v1/volumes/{two_targets['volume_id']}/dicom-export", json=body)
    assert response.status_code == 200, response.text
    exported = response.json()
    assert [s["voxel_count"] for s in exported["segments"]] == [int(lung.sum()), int(edited_heart.sum())]
    seg_response = client.get(exported["files"]["seg"])
    assert seg_response.headers["content-type"] == "application/dicom"
    seg = pydicom.dcmread(io.BytesIO(seg_response.content))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left lung", "heart"]
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"SEMIAUTOMATIC"}
    frames_of = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                 for f in seg.PerFrameFunctionalGroupsSequence]
    pixels = seg.pixel_array.reshape(len(frames_of), *shape[1:])
    for number, mask in ((1, lung), (2, edited_heart)):
        assert int(pixels[np.array(frames_of) == number].sum()) == int(mask.sum())
        assert frames_of.count(number) == int(mask.any(axis=(1, 2)).sum())   # one frame per slice it touches
    sr = hd.sr.srread(io.BytesIO(client.get(exported["files"]["sr"]).content))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.referenced_segment.referenced_segment_numbers for g in groups] == [[1], [2]]
    assert {g.referenced_segment.referenced_sop_instance_uid for g in groups} == {seg.SOPInstanceUID}
    assert [g.tracking_uid for g in groups] == [s.TrackingUID for s in seg.SegmentSequence]
    volumes = [next(m.value for m in g.get_measurements() if m.name.meaning == "Volume") for g in groups]
    assert volumes == pytest.approx([s["volume_ml"] for s in exported["segments"]], abs=1e-6)
    assert any("edited by the user" in text for text in sr_texts(sr))


def sr_texts(dataset) -> list[str]:
    """Every TEXT item's value anywhere in an SR's content tree."""
    texts = [str(dataset.TextValue)] if "TextValue" in dataset else []
    for item in dataset.get("ContentSequence", []):
        texts += sr_texts(item)
    return texts


@pytest.mark.parametrize("change, status, words", [
    ({"segments": []}, 400, "at least one segment"),
    ({"segments": [{"name": "x", "label": 1, "mask": {"offset": [0, 0, 0], "shape": [1, 1, 1], "data": "!!"}}]},
     400, "base64"),
    ({"segments": [{"name": "x", "label": 1, "mask": None}]}, 400, "every segment is empty"),
    ({"segments": [{"name": "x", "label": 1, "mask": {"offset": [0, 0, 0], "shape": [999, 1, 1],
                                                      "data": base64.b64encode(zlib.compress(b"\1" * 999)).decode()}}]},
     400, "does not fit"),
    ({"segments": [{"name": "x", "label": 1, "mask": None}, {"name": "y", "label": 1, "mask": None}]},
     400, "labels must be distinct"),
    ({"segments": [{"name": "x", "label": 0, "mask": None}]}, 422, "label"),
    ({"segments": [{"name": f"s{n}", "label": 1, "mask": None} for n in range(300)]}, 422, "segments"),
    ({"segments": "all of them"}, 422, "segments"),
])
def test_a_bad_export_is_refused_with_its_reason(client_module, two_targets, change, status, words):
    response = client_module.post(f"/v1/volumes/{two_targets['volume_id']}/dicom-export", json=change)
    assert response.status_code == status and words in response.json()["error"]["message"], response.text


def test_an_export_needs_the_volumes_dicom_reference(client_module, two_targets):
    plain = client_module.post("/v1/volumes", json=volume_payload(two_targets["volume"])).json()["volume_id"]
    lung = mask_of(two_targets["result"]["segments"][0], two_targets["volume"].shape)
    response = client_module.post(f"/v1/volumes/{plain}/dicom-export",
                                  json={"segments": [{"name": "left lung", "label": 1, "mask": crop_of(lung, 1)}]})
    assert response.status_code == 409 and "no DICOM reference" in response.json()["error"]["message"]
    assert client_module.get("/v1/exports/nothing/seg").status_code == 404
