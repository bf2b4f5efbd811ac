"""POST /v1/volumes with the voxels as raw bytes (`Content-Type: application/octet-stream`): the Slicer module's form.

The geometry travels in one request header, `X-CitrusV-Volume`, a JSON object {dtype, shape [k, j, i], ijk_to_ras,
name, modality}; the body is the little-endian voxel bytes in C order, optionally compressed (`Content-Encoding:
gzip` or `deflate`, for uploads over a network). The body streams straight into the volume's own array: no base64,
no JSON text, no second copy, so the upload's transient memory is one network chunk.

A client on this machine can skip the network copy altogether. The server announces a private handover folder in
its ready line (`handover_dir`: mode 0700, so only this user can put files there); the client writes the voxel
bytes into a file there, sends the same header with `"handover": "<file name>"` and an empty body, and the server
maps the file into memory and unlinks it (on Windows, where a mapped file cannot be deleted, it reads it and
deletes it). Only plain files directly inside that folder are taken, never a path the client chooses.
"""
from __future__ import annotations

import json
import mmap
import os
import stat
import zlib
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import Request
from pydantic import Field, ValidationError

from ..volume.input.io import Volume
from .codec import VOXEL_DTYPES
from .errors import ApiError
from .schemas import Dimension, Strict
from .uploads import admit
from .volumes import Reservation

VOLUME_HEADER = "x-citrusv-volume"
HANDOVER_FOLDER = "handover"
_ENCODINGS = {"identity": None, "gzip": 31, "deflate": 15}  # zlib wbits: gzip container / zlib stream


class RawVolumeHeader(Strict):
    """The `X-CitrusV-Volume` header: what the bytes of the body (or of the handover file) are."""

    dtype: Literal[VOXEL_DTYPES]
    shape: tuple[Dimension, Dimension, Dimension]
    ijk_to_ras: Annotated[list[Annotated[list[float], Field(min_length=4, max_length=4)]], Field(min_length=4, max_length=4)]
    name: Annotated[str, Field(min_length=1, max_length=200)] = "volume"
    modality: Literal["CT", "MR", "PET"] = "CT"
    handover: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")] | None = Field(
        None, description="name of a file in the server's handover folder holding the voxel bytes (local clients)")


def handover_dir(state) -> Path:
    """The service's private handover folder (inside its 0700 temporary folder), created on first use."""
    folder = Path(state.tmp_dir) / HANDOVER_FOLDER
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def ready_fields(state) -> dict:
    """What the ready line adds for local clients."""
    return {"handover_dir": str(handover_dir(state))}


async def from_raw(request: Request, state) -> tuple[Volume, Reservation]:
    header = _parse_header(request.headers.get(VOLUME_HEADER))
    kind = np.dtype(header.dtype).newbyteorder("<")
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in _ENCODINGS:
        raise ApiError(415, f"Content-Encoding {encoding!r}: send the voxels uncompressed, gzip or deflate")
    try:
        if header.handover is not None and request.headers.get("content-length", "0").strip() not in ("", "0"):
            raise ApiError(400, "send the voxels either in the body or as a handover file, not both")
        reservation = admit(state, header.shape, kind.itemsize)  # --max-voxels and the budget, before allocating
    except ApiError:
        if header.handover is not None:  # a refused handover is consumed too: no volume-sized file left behind
            discard_handover(handover_dir(state), header.handover)
        raise
    try:
        nbytes = header.shape[0] * header.shape[1] * header.shape[2] * kind.itemsize  # Python integers
        if header.handover is not None:
            raw = take_handover(handover_dir(state), header.handover, nbytes)
        else:
            raw = await _stream_into_array(request, nbytes, _ENCODINGS[encoding])
        voxels = raw.view(kind).reshape(header.shape)
        volume = Volume.from_ijk_to_ras(voxels, np.array(header.ijk_to_ras, dtype=float), name=header.name,
                                        modality=header.modality)
    except BaseException:
        reservation.release()
        raise
    return volume, reservation


def _parse_header(text: str | None) -> RawVolumeHeader:
    if not text:
        raise ApiError(400, "an application/octet-stream upload needs the X-CitrusV-Volume header: a JSON object with "
                            "dtype, shape [k, j, i] and ijk_to_ras (and optionally name, modality)")
    try:
        return RawVolumeHeader.model_validate(json.loads(text))
    except ValueError as error:  # json.JSONDecodeError and pydantic's ValidationError are both ValueErrors
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors(include_input=False)) \
            if isinstance(error, ValidationError) else str(error)
        raise ApiError(400, f"the X-CitrusV-Volume header is not valid: {detail}") from None


async def _stream_into_array(request: Request, nbytes: int, wbits: int | None) -> np.ndarray:
    """The request body, inflated if compressed, written into one preallocated array of exactly `nbytes`."""
    buffer = np.empty(nbytes, np.uint8)
    view = memoryview(buffer)
    filled = 0
    inflater = zlib.decompressobj(wbits=wbits) if wbits is not None else None

    def put(data) -> None:
        nonlocal filled
        if filled + len(data) > nbytes:
            raise ApiError(400, f"the body holds more than the {nbytes:,} bytes that shape x dtype need; send shape "
                                f"as [k, j, i] and the raw little-endian bytes of exactly that array")
        view[filled:filled + len(data)] = data
        filled += len(data)

    try:
        async for chunk in request.stream():
            if inflater is None:
                put(chunk)
                continue
            data = inflater.decompress(chunk, nbytes - filled + 1)  # bounded: no decompression bomb
            put(data)
            while inflater.unconsumed_tail:
                put(inflater.decompress(inflater.unconsumed_tail, nbytes - filled + 1))
    except zlib.error as error:
        raise ApiError(400, f"the compressed body is not valid ({error})") from None
    if inflater is not None and not inflater.eof and filled:
        raise ApiError(400, "the compressed body is truncated (it ends before its end marker)")
    if filled != nbytes:
        raise ApiError(400, f"the body holds {filled:,} bytes, but shape x dtype need {nbytes:,}")
    buffer.flags.writeable = False  # like every stored volume: never written
    return buffer


def discard_handover(folder: Path, name: str) -> None:
    """Remove `folder/name` (a name the header's pattern admits: never a path), if it is there."""
    try:
        (folder / name).unlink()
    except OSError:
        pass


def take_handover(folder: Path, name: str, nbytes: int) -> np.ndarray:
    """The bytes of `folder/name` as a read-only array, the file removed from the folder."""
    path = folder / name
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ApiError(400, f"no handover file {name!r} in the server's handover folder (it is taken once)") from None
    except OSError as error:
        raise ApiError(400, f"the handover file {name!r} cannot be opened ({error.strerror})") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ApiError(400, f"the handover {name!r} is not a plain file")
        if info.st_size != nbytes:
            raise ApiError(400, f"the handover file holds {info.st_size:,} bytes, but shape x dtype need {nbytes:,}")
        if os.name == "nt":  # a mapped file cannot be deleted on Windows: read it instead
            with os.fdopen(descriptor, "rb", closefd=False) as handle:
                buffer = np.fromfile(handle, dtype=np.uint8, count=nbytes)
            buffer.flags.writeable = False
        else:
            # The page cache already holds the bytes the client wrote: mapping them costs no copy. The mapping
            # outlives the file name, which is removed below.
            buffer = np.frombuffer(mmap.mmap(descriptor, nbytes, access=mmap.ACCESS_READ), dtype=np.uint8)
    finally:
        os.close(descriptor)
        discard_handover(folder, name)
    return buffer
