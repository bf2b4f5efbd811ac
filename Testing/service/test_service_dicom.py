"""The service's DICOM path: a client uploads the voxels of a DICOM series with a reference to that series
(as the Slicer module does for a volume from its DICOM database), the job writes a DICOM SEG and SR that
reference the series' own instances, served beside the result. A reference that does not describe the
uploaded slices (missing or uneven positions, another orientation) is refused at upload."""
from __future__ import annotations

import io

import pydicom
import pytest
from dicom_checks import assert_seg_lies_on_labelmap, dciodvfy
from dicom_series_maker import PATIENT, chest_ct_series
from service_helpers import reassemble, submit, volume_payload, wait

from citrusv_backend.volume.input.io import read_volume

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def series_volume(chest_ct_path, tmp_path_factory):
    series = chest_ct_series(chest_ct_path, tmp_path_factory.mktemp("service-dicom") / "series")
    return series, read_volume(series.folder)


def reference_of(series) -> dict:
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
    return {"study_instance_uid": series.study_uid, "series_instance_uid": series.series_uid,
            "frame_of_reference_uid": series.frame_of_reference_uid, "sop_class_uid": str(datasets[0].SOPClassUID),
            "sop_instance_uids": series.sop_uids, "modality": "CT",
            "positions": [[float(v) for v in ds.ImagePositionPatient] for ds in datasets],
            "identity": {k: PATIENT[k] for k in ("PatientName", "PatientID", "StudyDate", "AccessionNumber")}}


def test_a_series_upload_gets_its_seg_and_sr(client, series_volume):
    series, volume = series_volume
    response = client.post("/v1/volumes", json=volume_payload(volume) | {"dicom": reference_of(series)})
    assert response.status_code == 201, response.text
    assert response.json()["dicom_series_instance_uid"] == series.series_uid
    job = submit(client, response.json()["volume_id"], mode="per-slice", slice_range=[15, 18])
    assert wait(client, job, timeout=300)["status"] == "done"
    result = client.get(f"/v1/jobs/{job}/result").json()
    assert set(result["dicom"]["files"]) == {"seg", "sr"}
    seg_bytes = client.get(result["dicom"]["files"]["seg"])
    assert seg_bytes.status_code == 200 and seg_bytes.headers["content-type"] == "application/dicom"
    seg = pydicom.dcmread(io.BytesIO(seg_bytes.content))
    labels = reassemble(result)
    assert labels.any(), "the tiny model found nothing: the SEG check would prove nothing"
    assert_seg_lies_on_labelmap(seg, series.files, labels, {1: 1})
    assert seg.PatientID == PATIENT["PatientID"] and "PatientBirthDate" not in seg or not seg.PatientBirthDate
    assert seg.SOPInstanceUID == result["dicom"]["seg_sop_instance_uid"]
    sr = pydicom.dcmread(io.BytesIO(client.get(result["dicom"]["files"]["sr"]).content))
    assert sr.StudyInstanceUID == series.study_uid
    path = series.folder.parent / "from-service-seg.dcm"
    path.write_bytes(seg_bytes.content)
    errors, _ = dciodvfy(path)
    assert errors == [], errors
    missing = client.get(f"/v1/jobs/{job}/dicom/nothing")
    assert missing.status_code == 404 and "has seg, sr" in missing.json()["error"]["message"]


def test_a_reference_that_does_not_fit_the_slices_is_refused(client, series_volume):
    series, volume = series_volume
    reference = reference_of(series)
    shifted = [list(p) for p in reference["positions"]]
    shifted[10][2] += 5.0  # a slice that is not where the uploaded volume puts it
    for change, words in (({"positions": shifted}, "from where the uploaded volume puts its slices"),
                          ({"sop_instance_uids": series.sop_uids[:-1]}, "names 33 instance"),
                          ({"sop_instance_uids": ["1.2.3"] * 34}, "same SOP Instance UID")):
        response = client.post("/v1/volumes", json=volume_payload(volume) | {"dicom": reference | change})
        assert 400 <= response.status_code < 500 and words in response.text, response.text
    bad_identity = reference | {"identity": {"PatientAddress": "1 Main Street"}}
    assert client.post("/v1/volumes", json=volume_payload(volume) | {"dicom": bad_identity}).status_code == 422


def test_dicom_out_without_a_reference_is_a_new_study(client, series_volume):
    _, volume = series_volume
    response = client.post("/v1/volumes", json=volume_payload(volume))
    job = submit(client, response.json()["volume_id"], mode="per-slice", slice_range=[16, 17], dicom_out=True)
    assert wait(client, job, timeout=300)["status"] == "done"
    result = client.get(f"/v1/jobs/{job}/result").json()
    assert "image_0034" in result["dicom"]["files"]
    sr = pydicom.dcmread(io.BytesIO(client.get(result["dicom"]["files"]["sr"]).content))
    assert sr.PatientIdentityRemoved == "YES"
    plain = submit(client, response.json()["volume_id"], mode="per-slice", slice_range=[16, 17])
    assert wait(client, plain, timeout=300)["status"] == "done"
    assert "dicom" not in client.get(f"/v1/jobs/{plain}/result").json()
