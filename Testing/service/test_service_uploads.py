"""Volume files uploaded by a hostile client: headers that name other files as their data, headers padded past
any prefix a checker might read, files that claim far more voxels than they hold, and shapes that overflow.

The server must read an upload only from the bytes it received, refuse every detached or external data
reference in every format it accepts, and refuse a size lie before it allocates anything."""
from __future__ import annotations

import gzip
import json
import threading

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from service_helpers import server_memory, reset_peak_memory, volume_payload

pytestmark = pytest.mark.service

MiB = 2**20
PADDING = b"".join(b"# padding the header past what a prefix check reads %06d\n" % n for n in range(2000))  # ~110 KiB


def _post_file(client, name: str, data: bytes):
    return client.post("/v1/volumes", files={"file": (name, data, "application/octet-stream")})


def _stored(client) -> int:
    return client.get("/v1/info").json()["volumes"]["count"]


def _nrrd(fields: list[str], data: bytes = b"", padding: bytes = b"", newline: bytes = b"\n") -> bytes:
    lines = [b"NRRD0004", *(f.encode() for f in fields)]
    return newline.join(lines[:1]) + newline + padding + newline.join(lines[1:]) + newline + newline + data


def _mha(fields: list[str], data: bytes = b"", padding: bytes = b"") -> bytes:
    return padding + b"".join(f.encode() + b"\n" for f in fields) + data


ONE_VOXEL = ["type: uint8", "dimension: 3", "sizes: 1 1 1", "encoding: raw"]
MHA_ONE_VOXEL = ["ObjectType = Image", "NDims = 3", "DimSize = 1 1 1", "ElementType = MET_UCHAR"]

ATTACKS = {
    # The attack as reported: a header padded past 64 KiB, then a data file the server can read.
    "nrrd data file past 64 KiB": ("x.nrrd", _nrrd(ONE_VOXEL + ["byte skip: 2", "data file: /etc/hostname"],
                                                   padding=PADDING)),
    "nrrd datafile, CR line ends": ("x.nrrd", _nrrd(ONE_VOXEL + ["datafile: /etc/passwd"], padding=PADDING.replace(
        b"\n", b"\r"), newline=b"\r")),
    "nrrd data file LIST": ("x.nrrd", _nrrd(ONE_VOXEL + ["data file: LIST"], data=b"/etc/hostname\n")),
    "nrrd data file, odd case": ("x.nrrd", _nrrd(ONE_VOXEL + ["Data File: /etc/hostname"], padding=PADDING)),
    "nrrd header only (no blank line)": ("x.nrrd", b"NRRD0004\n" + "\n".join(ONE_VOXEL).encode() + b"\n"),
    "mha ElementDataFile past 64 KiB": ("x.mha", _mha(MHA_ONE_VOXEL + ["ElementDataFile = /etc/hostname"],
                                                      padding=b"Comment = " + PADDING.replace(b"\n", b" ") + b"\n")),
    "mha lower-case key": ("x.mha", _mha(MHA_ONE_VOXEL + ["elementdatafile = /etc/passwd"])),
    "mha file list": ("x.mha", _mha(MHA_ONE_VOXEL + ["ElementDataFile = LIST"], data=b"/etc/hostname\n")),
    "nrrd content named .nii": ("x.nii", _nrrd(ONE_VOXEL + ["data file: /etc/hostname"])),
    "mha content named .nrrd": ("x.nrrd", _mha(MHA_ONE_VOXEL + ["ElementDataFile = /etc/hostname"])),
    "detached nrrd header": ("x.nhdr", _nrrd(ONE_VOXEL + ["data file: x.raw"])),
    "detached metaimage header": ("x.mhd", _mha(MHA_ONE_VOXEL + ["ElementDataFile = x.raw"])),
    "analyze / nifti pair header": ("x.hdr", b"\x00" * 348),
    "analyze / nifti pair data": ("x.img", b"\x00" * 64),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_an_upload_never_reads_another_file(client, name):
    filename, data = ATTACKS[name]
    before = _stored(client)
    response = _post_file(client, filename, data)
    assert response.status_code == 400, f"{name}: {response.status_code} {response.text[:300]}"
    message = response.json()["error"]["message"]
    assert "data file" in message or "single-file" in message or "not a" in message, message
    assert _stored(client) == before


def _nifti_pair_header(magic: bytes) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape((2, 2, 2))
    header.set_data_dtype(np.int16)
    raw = bytearray(header.binaryblock)
    raw[344:348] = magic
    return bytes(raw) + b"\x00" * 4 + b"\x00" * 16


def test_a_nifti_pair_header_named_nii_is_refused(client):
    """magic 'ni1' means the voxels are in a .img beside the header: a file the server would go and open."""
    response = _post_file(client, "pair.nii", _nifti_pair_header(b"ni1\x00"))
    assert response.status_code == 400 and "data file" in response.json()["error"]["message"]
    response = _post_file(client, "pair.nii.gz", gzip.compress(_nifti_pair_header(b"ni1\x00")))
    assert response.status_code == 400 and "data file" in response.json()["error"]["message"]


def test_long_headers_with_their_own_voxels_are_read_exactly(client):
    """Parsing the whole header must not refuse honest files: a NRRD padded past 64 KiB with comments, CRLF
    line ends and key/value pairs, and a MetaImage with a long comment, both holding their voxels."""
    voxels = np.arange(24, dtype=np.int16).reshape(2, 3, 4)  # (k, j, i)
    fields = ["type: short", "dimension: 3", "space: left-posterior-superior", "sizes: 4 3 2",
              "space directions: (2,0,0) (0,3,0) (0,0,5)", "space origin: (10,20,30)", "endian: little",
              "encoding: raw", "my key:=my value"]
    nrrd = _nrrd(fields, voxels.astype("<i2").tobytes(), padding=PADDING.replace(b"\n", b"\r\n"), newline=b"\r\n")
    mha = _mha(["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
                "Comment = " + "x" * 100_000, "Offset = 10 20 30", "ElementSpacing = 2 3 5", "DimSize = 4 3 2",
                "ElementType = MET_SHORT", "ElementDataFile = LOCAL"], voxels.astype("<i2").tobytes())
    for name, data in (("long.nrrd", nrrd), ("long.mha", mha)):
        response = _post_file(client, name, data)
        assert response.status_code == 201, f"{name}: {response.text}"
        info = response.json()
        assert info["shape"] == [2, 3, 4] and info["spacing"] == [2.0, 3.0, 5.0], info
        assert info["origin_lps"] == [10.0, 20.0, 30.0]
        client.delete(f"/v1/volumes/{info['volume_id']}")


def test_compressed_nrrd_and_metaimage_uploads_keep_their_voxels(client, chest_ct_path, tmp_path):
    image = sitk.ReadImage(str(chest_ct_path))
    for name in ("chest.nrrd", "chest.mha", "chest.nii.gz", "chest.nii"):
        path = tmp_path / name
        sitk.WriteImage(image, str(path), useCompression=not name.endswith(".nii"))
        response = client.post("/v1/volumes", files={"file": (name, path.read_bytes(), "application/octet-stream")})
        assert response.status_code == 201, f"{name}: {response.text}"
        info = response.json()
        assert info["shape"] == list(reversed(image.GetSize()))
        assert info["dtype"] == str(sitk.GetArrayViewFromImage(image).dtype)
        np.testing.assert_allclose(info["spacing"], image.GetSpacing(), atol=1e-6)
        client.delete(f"/v1/volumes/{info['volume_id']}")


# ---------------------------------------------------------------------------------------------- size lies

def _lying_nifti(shape=(320, 320, 320), dtype=np.float64, gz: bool = False) -> bytes:
    """A valid NIfTI-1 header claiming `shape` x `dtype`, followed by only 1 KiB of voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    data = header.binaryblock + b"\x00" * 4 + b"\x00" * 1024
    return gzip.compress(data) if gz else data


@pytest.mark.parametrize("name, data", [pytest.param(name, data, id=name) for name, data in [
    ("liar.nii", _lying_nifti()),
    ("liar.nii.gz", _lying_nifti(gz=True)),
    ("liar.nrrd", _nrrd(["type: double", "dimension: 3", "sizes: 320 320 320", "encoding: raw"], b"\x00" * 1024)),
    ("liar-gz.nrrd", _nrrd(["type: double", "dimension: 3", "sizes: 320 320 320", "encoding: gzip"],
                           gzip.compress(b"\x00" * 1024))),
    ("liar.mha", _mha(["ObjectType = Image", "NDims = 3", "DimSize = 320 320 320", "ElementType = MET_DOUBLE",
                       "ElementDataFile = LOCAL"], b"\x00" * 1024)),
]])
def test_a_file_claiming_more_voxels_than_it_holds_allocates_nothing(client, server, name, data):
    """262 MB claimed (float64 320^3) by a 1 KiB file: refused as truncated, without the server's peak memory
    growing by anything like the claim (three at once, as an attacker would send them)."""
    reset_peak_memory(server)
    before = server_memory(server)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(_post_file(client, name, data))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = server_memory(server)["peak"] - before["rss"]
    for response in answers:
        assert response.status_code == 400, response.text
        assert "truncated" in response.json()["error"]["message"], response.text
    assert peak < 100 * MiB, f"the server's peak memory grew by {peak / MiB:.0f} MiB for a {len(data)}-byte file"


@pytest.mark.parametrize("shape", [[2**63, 1, 1], [2**32, 2**32, 1], [2**62, 4, 1], [10**30, 1, 1], [65537, 1, 1]])
def test_overflowing_shapes_are_422_not_500(client, chest, shape):
    payload = volume_payload(chest)
    payload["shape"] = shape
    response = client.post("/v1/volumes", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "shape" in json.dumps(response.json()["error"])


def test_an_image_header_claiming_an_absurd_size_is_a_clear_400(client):
    """NIfTI dims are int16: 32767^7 voxels overflows 64-bit arithmetic."""
    header = nib.Nifti1Header()
    header.set_data_shape((32767, 32767, 32767, 32767, 32767, 32767, 32767))
    header.set_data_dtype(np.float64)
    response = _post_file(client, "huge.nii", header.binaryblock + b"\x00" * 4)
    assert response.status_code in (400, 413), response.text
    assert response.json()["error"]["message"]

