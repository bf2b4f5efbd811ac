"""Volume headers parsed from a file's own bytes (volume/input/headers.py): formats told apart by content, every
external data reference found however the header is written, claimed sizes, and self-contained copies that
SimpleITK reads to exactly the voxels and geometry of the original."""
from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from citrusv_backend.errors import InputError
from citrusv_backend.volume.input.headers import read_header, require_voxel_bytes, write_self_contained
from citrusv_backend.volume.input.io import read_volume

pytestmark = pytest.mark.unit


def _image() -> sitk.Image:
    voxels = (np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7) - 100)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))  # a rotated, but orthonormal, frame
    return image


@pytest.mark.parametrize("name, compress, fmt, encoding", [
    ("v.nrrd", False, "nrrd", "raw"), ("v.nrrd", True, "nrrd", "gzip"), ("v.mha", False, "metaimage", "raw"),
    ("v.mha", True, "metaimage", "zlib"), ("v.nii", False, "nifti", "raw"), ("v.nii.gz", True, "nifti", "raw")])
def test_self_contained_copies_read_back_identically(tmp_path, name, compress, fmt, encoding):
    original = tmp_path / name
    sitk.WriteImage(_image(), str(original), useCompression=compress)
    header = read_header(original, name)
    assert (header.format, header.encoding, header.shape, header.itemsize) == (fmt, encoding, (7, 6, 5), 2)
    assert header.external is None and header.gzipped == name.endswith(".gz")
    require_voxel_bytes(header, original, name)
    copy = tmp_path / "copy" / f"copy{header.suffix}"
    copy.parent.mkdir()
    write_self_contained(header, original, copy)
    expected, got = read_volume(original), read_volume(copy, image_io=header.image_io)
    np.testing.assert_array_equal(got.voxels, expected.voxels)
    np.testing.assert_allclose(got.geometry.ijk_to_lps(), expected.geometry.ijk_to_lps(), atol=1e-6)


def test_the_copy_never_names_a_data_file_and_drops_what_no_reader_needs(tmp_path):
    source = io.BytesIO(b"NRRD0005\r\n# a comment\r\ntype: uint8\r\ndimension: 3\r\nsizes: 2 1 1\r\nencoding: raw\r\n"
                        b"mykey:=data file: /etc/passwd\r\n\r\n\x07\x09")
    header = read_header(source, "x.nrrd")
    assert header.external is None and header.data_offset == source.getvalue().index(b"\x07")
    write_self_contained(header, source, tmp_path / "x.nrrd")
    written = (tmp_path / "x.nrrd").read_bytes()
    assert written == b"NRRD0005\ntype: uint8\ndimension: 3\nsizes: 2 1 1\nencoding: raw\n\n\x07\x09"
    assert read_volume(tmp_path / "x.nrrd", image_io="NrrdImageIO").voxels.ravel().tolist() == [7, 9]


@pytest.mark.parametrize("data, external", [
    (b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1 1 1\nencoding: raw\ndata file: /etc/hostname\n\n", "/etc/hostname"),
    (b"NRRD0004\rtype: uint8\rdimension: 3\rsizes: 1 1 1\rencoding: raw\rDATA_FILE: x.raw\r\r", "x.raw"),
    (b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1 1 1\nencoding: raw\ndatafile: LIST\n\na.raw\n", "LIST"),
    (b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1 1 1\nencoding: raw\n", "detached .nhdr"),
    (b"NDims = 3\nDimSize = 1 1 1\nElementType = MET_UCHAR\nElementDataFile = /etc/hostname\n", "/etc/hostname"),
    (b"ObjectType = Image\nNDims = 3\nDimSize = 1 1 1\nElementType = MET_UCHAR\nelementdatafile = slice%03d.raw 1 3 1\n",
     "slice%03d.raw 1 3 1"),
])
def test_every_spelling_of_an_external_data_file_is_found(data, external):
    header = read_header(io.BytesIO(b"Comment = " + b"x" * 70_000 + b"\n" + data) if data.startswith(b"NDims") else
                         io.BytesIO(data), "x")
    assert header.external is not None and external in header.external


@pytest.mark.parametrize("magic, external", [(b"n+1\x00", False), (b"ni1\x00", True), (b"\x00\x00\x00\x00", True)])
def test_nifti_pairs_and_analyze_headers_name_an_external_file(magic, external):
    header = nib.Nifti1Header()
    header.set_data_shape((2, 2, 2))
    raw = bytearray(header.binaryblock)
    raw[344:348] = magic
    for data in (bytes(raw) + b"\x00" * 20, gzip.compress(bytes(raw) + b"\x00" * 20)):
        assert (read_header(io.BytesIO(data), "x").external is not None) == external


def test_claimed_sizes_are_checked_without_expanding_them():
    header = read_header(io.BytesIO(b"NRRD0004\ntype: double\ndimension: 3\nsizes: 4096 4096 4096\nencoding: gzip\n\n"
                                    + gzip.compress(b"\x00" * 4096)), "liar.nrrd")
    assert header.data_bytes == 8 * 4096**3
    with pytest.raises(InputError, match="truncated"):
        require_voxel_bytes(header, io.BytesIO(b"NRRD0004\ntype: double\ndimension: 3\nsizes: 4096 4096 4096\n"
                                               b"encoding: gzip\n\n" + gzip.compress(b"\x00" * 4096)), "liar.nrrd")


@pytest.mark.parametrize("data, words", [
    (b"hello world", "none of NIfTI, NRRD or MetaImage"),
    (b"NRRD0004\ntype: block\ndimension: 1\nsizes: 1\nencoding: raw\n\n", "type"),
    (b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1 1\nencoding: raw\n\n", "dimension"),
    (b"NRRD0004\ntype: uint8\nsizes: -1 1 1\nencoding: raw\n\n", "non-negative"),
    (b"NRRD0004\nfrobnicate: yes\n\n", "unknown NRRD header field"),
    (b"NDims = 3\nDimSize = 1 1 1\nElementType = MET_STRING\nElementDataFile = LOCAL\n", "ElementType"),
    (b"NDims = 3\nHeaderSize = -1\nElementDataFile = LOCAL\n", "HeaderSize"),
])
def test_headers_that_cannot_be_read_say_why(data, words):
    with pytest.raises(InputError, match="not a readable volume") as caught:
        read_header(io.BytesIO(data), "x")
    assert words in str(caught.value)
