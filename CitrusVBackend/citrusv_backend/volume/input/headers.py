"""Volume file headers read from the file's own bytes: what a file claims (format, voxel type, shape, where
its voxels are) before anything is allocated, and a self-contained copy of it for the image reader.

NRRD, MetaImage and NIfTI can name other files as their voxels: NRRD's `data file:` (a name, a pattern or
`LIST`), MetaImage's `ElementDataFile = name | LIST | pattern`, NIfTI's `ni1`/`ni2` magic (a .hdr/.img pair)
and Analyze headers (always a pair). A reader given such a header reads whatever file it names. So for a
file that must stand alone (an upload), `read_header` parses the *whole* header — NRRD up to its first blank
line, MetaImage up to its ElementDataFile line — with the line ends NRRD readers accept (LF, CRLF and CR),
and refuses any external data reference; `write_self_contained` then writes a header of our own making
(the geometry and encoding fields only, never a data-file field) followed by the file's own data bytes.
What the reader sees was written here, so no header, however crafted, can point it at another file.
"""
from __future__ import annotations

import bz2
import gzip
import io
import math
import re
import shutil
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

Source = Union[Path, BinaryIO]  # a file, or the open file of an upload

from ...errors import InputError

MAX_HEADER_BYTES = 8 * 2**20  # far more than any real header; a "header" without an end is refused
CHUNK = 1 << 20

NRRD_MAGIC = re.compile(rb"^NRRD000[1-6]$")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# teem's field names (and the spellings it accepts for them) -> the name written in our copy.
NRRD_FIELDS = {
    "type": "type", "dimension": "dimension", "space": "space", "spacedimension": "space dimension",
    "sizes": "sizes", "spacedirections": "space directions", "spacings": "spacings", "thicknesses": "thicknesses", "axismins": "axis mins",
    "axismaxs": "axis maxs", "centers": "centers", "centerings": "centers", "labels": "labels", "units": "units",
    "min": "min", "max": "max", "oldmin": "old min", "oldmax": "old max", "endian": "endian",
    "encoding": "encoding", "lineskip": "line skip", "byteskip": "byte skip", "sampleunits": "sample units",
    "spaceunits": "space units", "spaceorigin": "space origin", "measurementframe": "measurement frame",
    "kinds": "kinds", "content": "content", "number": "number", "blocksize": "block size",
}
NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
NRRD_ITEMSIZE = {name: size for size, names in NRRD_TYPES.items() for name in names}
NRRD_ENCODINGS = {"raw": "raw", "txt": "text", "text": "text", "ascii": "text", "hex": "hex", "gz": "gzip",
                  "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2"}

# MetaImage fields an image reader needs, in their canonical spelling; everything else is left out of the copy.
METAIMAGE_FIELDS = {name.lower(): name for name in (
    "ObjectType", "ObjectSubType", "NDims", "DimSize", "ElementType", "ElementNumberOfChannels", "ElementSpacing",
    "ElementSize", "BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData",
    "CompressedDataSize", "Offset", "Position", "Origin", "TransformMatrix", "Rotation", "Orientation",
    "CenterOfRotation", "AnatomicalOrientation", "Modality", "DistanceUnits")}
METAIMAGE_IGNORED = {"comment", "name", "id", "parentid", "color", "elementmin", "elementmax", "acquisitiondate",
                     "formtypename"}
METAIMAGE_ITEMSIZE = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                      "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                      "MET_DOUBLE": 8}

DETACHED_SUFFIXES = (".nhdr", ".mhd", ".hdr", ".img", ".img.gz", ".raw", ".raw.gz")


@dataclass
class FileHeader:
    """What a volume file says about itself. `shape` is in the file's own (fastest-first) order."""

    format: str                      # "nrrd", "metaimage" or "nifti"
    shape: tuple[int, ...]
    itemsize: int                    # bytes per component on disk
    components: int = 1
    encoding: str = "raw"            # raw, gzip, bzip2, zlib, text, hex
    data_offset: int = 0             # where the voxel bytes start (in the decompressed stream for .nii.gz)
    gzipped: bool = False            # the whole file is gzip-compressed (.nii.gz)
    external: str | None = None      # the data file a header names instead of holding its voxels
    lines: list[bytes] = field(default_factory=list)   # NRRD/MetaImage: the header we write for the reader

    @property
    def voxel_count(self) -> int:
        return math.prod(self.shape) * self.components

    @property
    def data_bytes(self) -> int:
        return self.voxel_count * self.itemsize

    @property
    def suffix(self) -> str:
        return {"nrrd": ".nrrd", "metaimage": ".mha"}.get(self.format, ".nii.gz" if self.gzipped else ".nii")

    @property
    def image_io(self) -> str:
        return {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO", "nifti": "NiftiImageIO"}[self.format]


# ---------------------------------------------------------------------------------------------- sniffing

@contextmanager
def _opened(source: Source):
    if hasattr(source, "read"):
        source.seek(0)
        yield source
    else:
        with open(source, "rb") as handle:
            yield handle


def read_header(source: Source, what: str) -> FileHeader:
    """The header of a NRRD, MetaImage or NIfTI file, recognised by its content (not its name)."""
    with _opened(source) as handle:
        start = handle.read(4096)
        handle.seek(0)
        if start[:2] == b"\x1f\x8b":
            return _nifti(_gunzip_prefix(handle, 540, what), what, gzipped=True)
        if NRRD_MAGIC.match(start.split(b"\n", 1)[0].split(b"\r", 1)[0]):
            return _nrrd(handle, what)
        if _nifti_size(start) is not None:
            return _nifti(start[:540], what, gzipped=False)
        if _looks_like_metaimage(start):
            return _metaimage(handle, what)
    raise _unreadable(what, "its content is none of NIfTI, NRRD or MetaImage")


def _unreadable(what: str, reason: str) -> InputError:
    return InputError(f"{what}: not a readable volume: {reason}")


def refuse_external(header: FileHeader, what: str) -> None:
    """An upload must hold its own voxels."""
    if header.external is not None:
        raise InputError(f"{what}: the header refers to a separate data file ({header.external[:80]!r}); upload a "
                         f"single-file volume that holds its own voxels (.nrrd, .mha, .nii, .nii.gz)")


def _gunzip_prefix(handle, size: int, what: str) -> bytes:
    try:
        with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
            return stream.read(size)
    except (OSError, EOFError, zlib.error):
        raise _unreadable(what, "the gzip data is damaged or truncated") from None


def _header_lines(handle, what: str, end_of_header) -> tuple[list[bytes], int]:
    """Lines (without their line ends) up to and including the one `end_of_header` accepts, and the offset of
    the byte after it (-1: the file ended first). Line ends are LF, CRLF or a lone CR, as teem takes them."""
    buffer = bytearray()
    lines, start = [], 0
    while True:
        found = _LINE_END.search(buffer, start)
        # A CR as the last byte read may be the first half of a CRLF: read on before deciding.
        if found is None or (found.group() == b"\r" and found.end() == len(buffer)):
            if len(buffer) > MAX_HEADER_BYTES:
                raise _unreadable(what, f"the header is longer than {MAX_HEADER_BYTES // 2**20} MiB")
            chunk = handle.read(64 * 1024)
            if chunk:
                buffer += chunk
                continue
            if found is None:
                if start < len(buffer):
                    lines.append(bytes(buffer[start:]))
                return lines, -1
        line = bytes(buffer[start:found.start()])
        start = found.end()
        lines.append(line)
        if end_of_header(line):
            return lines, start


# ---------------------------------------------------------------------------------------------- NRRD

def _nrrd(handle, what: str) -> FileHeader:
    lines, data_offset = _header_lines(handle, what, lambda line: line == b"")
    fields: dict[str, str] = {}
    kept = [lines[0]]
    external = None
    for raw in lines[1:]:
        if not raw or raw.startswith(b"#") or b":=" in raw:
            continue  # the blank end line, comments and key/value pairs (metadata no reader needs)
        key, colon, value = raw.decode("latin-1").partition(":")
        name = re.sub(r"[\s_]", "", key).lower()
        if not colon:
            raise _unreadable(what, f"the NRRD header line {raw[:60]!r} is not 'field: value'")
        if name == "datafile":
            external = value.strip() or "?"
            continue
        if name not in NRRD_FIELDS:
            raise _unreadable(what, f"unknown NRRD header field {key.strip()[:40]!r}")
        canonical = NRRD_FIELDS[name]
        fields[canonical] = value.strip()
        kept.append(f"{canonical}: {value.strip()}".encode("latin-1"))
    if external is None and data_offset < 0:
        external = "(the header has no blank line after it: a detached .nhdr header)"
    kind = fields.get("type", "").lower()
    if kind not in NRRD_ITEMSIZE:
        raise _unreadable(what, f"NRRD type {kind or '(none)'!r} is not a scalar voxel type")
    encoding = NRRD_ENCODINGS.get(fields.get("encoding", "").lower())
    if encoding is None:
        raise _unreadable(what, f"NRRD encoding {fields.get('encoding', '(none)')!r} is not supported")
    shape = _integers(fields.get("sizes", ""), what, "NRRD sizes")
    if str(len(shape)) != fields.get("dimension", "").strip():
        raise _unreadable(what, "the NRRD dimension does not match its sizes")
    return FileHeader("nrrd", shape, NRRD_ITEMSIZE[kind], encoding=encoding, data_offset=max(data_offset, 0),
                      external=external, lines=kept)


# ---------------------------------------------------------------------------------------------- MetaImage

def _looks_like_metaimage(start: bytes) -> bool:
    first = next((line for line in start.splitlines() if line.strip()), b"")
    key = first.split(b"=", 1)[0].strip().decode("latin-1", "replace").lower()
    return b"=" in first and (key in METAIMAGE_FIELDS or key in METAIMAGE_IGNORED or key == "elementdatafile")


def _metaimage(handle, what: str) -> FileHeader:
    def is_last(line: bytes) -> bool:
        return line.split(b"=", 1)[0].strip().lower() == b"elementdatafile"

    lines, data_offset = _header_lines(handle, what, is_last)
    fields: dict[str, str] = {}
    kept = []
    external = None
    for raw in lines:
        if not raw.strip():
            continue
        key, equals, value = raw.decode("latin-1").partition("=")
        name, value = key.strip().lower(), value.strip()
        if not equals:
            raise _unreadable(what, f"the MetaImage header line {raw[:60]!r} is not 'Key = Value'")
        if name == "elementdatafile":
            if value.upper() != "LOCAL":
                external = value or "?"
            continue
        if name == "headersize" and value not in ("0", ""):
            raise _unreadable(what, "a MetaImage HeaderSize is not supported here; write the file without it")
        if name in METAIMAGE_FIELDS:  # the rest (comments, names, user fields) is metadata no reader needs
            fields[METAIMAGE_FIELDS[name]] = value
            kept.append(f"{METAIMAGE_FIELDS[name]} = {value}".encode("latin-1"))
    if data_offset < 0 and external is None:
        raise _unreadable(what, "the MetaImage header has no ElementDataFile line")
    kind = fields.get("ElementType", "").upper()
    if kind not in METAIMAGE_ITEMSIZE:
        raise _unreadable(what, f"MetaImage ElementType {kind or '(none)'!r} is not a scalar voxel type")
    shape = _integers(fields.get("DimSize", ""), what, "MetaImage DimSize")
    components = _integers(fields.get("ElementNumberOfChannels", "1"), what, "ElementNumberOfChannels")[0]
    compressed = fields.get("CompressedData", "false").lower() == "true"
    binary = fields.get("BinaryData", "true").lower() != "false"
    encoding = "zlib" if compressed else "raw" if binary else "text"
    kept.append(b"ElementDataFile = LOCAL")
    return FileHeader("metaimage", shape, METAIMAGE_ITEMSIZE[kind], components=components, encoding=encoding,
                      data_offset=max(data_offset, 0), external=external, lines=kept)


# ---------------------------------------------------------------------------------------------- NIfTI

def _nifti_size(start: bytes) -> int | None:
    if len(start) < 348:
        return None
    for order in ("little", "big"):
        size = int.from_bytes(start[:4], order, signed=True)
        if size in (348, 540):
            return size
    return None


def _nifti(start: bytes, what: str, gzipped: bool) -> FileHeader:
    import nibabel

    size = _nifti_size(start)
    if size is None:
        raise _unreadable(what, "the (decompressed) file is not a NIfTI image")
    kind = nibabel.Nifti2Header if size == 540 else nibabel.Nifti1Header
    try:
        header = kind.from_fileobj(io.BytesIO(start[:size]), check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception as error:  # nibabel raises several types for damaged headers
        raise _unreadable(what, f"a damaged NIfTI header ({error})") from None
    magic = bytes(header["magic"]).rstrip(b"\x00")
    external = None
    if magic not in (b"n+1", b"n+2"):
        external = "a .img file beside this header (NIfTI pair)" if magic in (b"ni1", b"ni2") else \
            "a .img file beside this header (Analyze 7.5)"
    if any(n < 0 for n in shape):
        raise _unreadable(what, f"the NIfTI header has negative dimensions {shape}")
    return FileHeader("nifti", shape, itemsize, data_offset=offset, gzipped=gzipped, external=external)


def _integers(text: str, what: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split())
    except ValueError:
        values = ()
    if not values or any(v < 0 for v in values):
        raise _unreadable(what, f"{name} {text[:60]!r} is not a list of non-negative integers")
    return values


# ---------------------------------------------------------------------------------------------- voxel bytes

def require_voxel_bytes(header: FileHeader, source: Source, what: str) -> None:
    """Refuse a file that holds fewer voxel bytes than its header claims, counting compressed data without
    keeping it (nothing of the claimed size is ever allocated)."""
    needed = header.data_bytes
    with _opened(source) as handle:
        available = _available_bytes(header, handle, needed, what)
    if available < needed:
        raise InputError(f"{what}: truncated: the header claims {needed:,} bytes of voxels "
                         f"({' x '.join(map(str, header.shape))}), the file holds {max(available, 0):,}")


def _available_bytes(header: FileHeader, handle, needed: int, what: str) -> int:
    size = handle.seek(0, io.SEEK_END)
    if header.format == "nifti":
        if not header.gzipped:
            return size - header.data_offset
        handle.seek(0)
        stream = gzip.GzipFile(fileobj=handle, mode="rb")
        return _count_decompressed(stream, header.data_offset + needed) - header.data_offset
    stored = size - header.data_offset
    if header.encoding == "raw":
        return stored
    if header.encoding == "hex":
        return stored // 2
    if header.encoding == "text":  # at least one digit and one separator per value
        return (stored + 1) // 2 * header.itemsize
    handle.seek(header.data_offset)
    if header.encoding == "gzip":
        return _count_decompressed(gzip.GzipFile(fileobj=handle, mode="rb"), needed)
    if header.encoding == "bzip2":
        return _count_decompressed(bz2.BZ2File(handle, mode="rb"), needed)
    return _count_zlib(handle, needed)


def _count_decompressed(stream, limit: int) -> int:
    """Bytes a compressed stream expands to, reading at most `limit` of them, holding one chunk at a time."""
    total = 0
    try:
        while total < limit and (chunk := stream.read(min(CHUNK, limit - total))):
            total += len(chunk)
    except (OSError, EOFError, zlib.error, ValueError):
        pass  # damaged or cut short: what came out before is what the file holds
    return total


def _count_zlib(handle, limit: int) -> int:
    inflater, total = zlib.decompressobj(), 0
    try:
        while total < limit and (chunk := handle.read(CHUNK)):
            total += len(inflater.decompress(chunk, CHUNK))
            while inflater.unconsumed_tail and total < limit:
                total += len(inflater.decompress(inflater.unconsumed_tail, CHUNK))
    except zlib.error:
        pass
    return total


def write_self_contained(header: FileHeader, source: Source, target: Path) -> None:
    """`target`: a header written here (for NRRD and MetaImage) and the source's own data bytes."""
    with _opened(source) as inp, open(target, "wb") as out:
        if header.format in ("nrrd", "metaimage"):
            out.write(b"\n".join(header.lines) + (b"\n\n" if header.format == "nrrd" else b"\n"))
            inp.seek(header.data_offset)
        shutil.copyfileobj(inp, out, CHUNK)
