"""Uploaded volumes, kept in memory by id: evicted when idle too long (TTL) or to stay within a memory
budget (least recently used first). Ids that were evicted are remembered, so a request for one says so
(and that the client should upload again) instead of a bare 'not found'.

The budget bounds the memory actually held, not only the volumes a client can still name: an upload reserves
its bytes before it is decoded (`reserve`), and a job holds its volume (`hold`) until it finishes, so a volume
deleted or evicted while a job still uses it counts until that job is done. Volumes in use are never evicted
to make room (that would free nothing); when the rest cannot make room, an upload is told to retry (503)."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..volume.input.io import Volume
from .errors import ApiError
from .logs import log_event

log = logging.getLogger("citrusv.server")

REMEMBERED_EVICTIONS = 10_000


@dataclass
class StoredVolume:
    id: str
    volume: Volume
    nbytes: int
    created: float
    last_used: float
    users: int = 0          # queued or running jobs that hold it
    stored: bool = True     # False once deleted or evicted (it may still be held)

    def describe(self, ttl_s: float, now: float) -> dict:
        volume = self.volume
        return {"volume_id": self.id, "name": volume.name, "modality": volume.modality, "shape": list(volume.shape),
                "dtype": str(volume.voxels.dtype.newbyteorder("=")), "spacing": list(volume.geometry.spacing),
                "origin_lps": list(volume.geometry.origin), "ijk_to_ras": volume.geometry.ijk_to_ras().tolist(),
                "bytes": self.nbytes, "expires_in_s": round(max(0.0, self.last_used + ttl_s - now), 1),
                "dicom_series_instance_uid": volume.dicom.series_instance_uid if volume.dicom else None}


class Reservation:
    """Memory set aside for a volume being decoded; `VolumeStore.add` turns it into the stored volume, and
    leaving the `with` block (or `release`) gives back what was not used."""

    def __init__(self, store: "VolumeStore", nbytes: int):
        self.store, self.nbytes = store, nbytes

    def release(self) -> None:
        self.store._unreserve(self)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class VolumeStore:
    def __init__(self, budget_bytes: int, ttl_s: float, clock=time.monotonic):
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._volumes: OrderedDict[str, StoredVolume] = OrderedDict()  # least recently used first
        self._removed_in_use: dict[str, StoredVolume] = {}             # deleted or evicted, still held by jobs
        self._reserved = 0                                             # uploads being decoded
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.on_evict: list = []   # callbacks (volume_id, reason): what lives with a volume ends with it

    @property
    def used_bytes(self) -> int:  # call with the lock held
        return (sum(v.nbytes for v in self._volumes.values()) + sum(v.nbytes for v in self._removed_in_use.values())
                + self._reserved)

    def check_fits(self, nbytes: int, what: str = "the volume") -> None:
        if nbytes > self.budget_bytes:
            raise ApiError(413, f"{what} needs {nbytes / 2**20:,.1f} MiB, more than the server's volume memory "
                                f"budget of {self.budget_bytes / 2**20:,.1f} MiB (--volume-budget-mb); crop it first")

    def reserve(self, nbytes: int) -> Reservation:
        """Room for `nbytes` within the budget, evicting unused volumes (least recently used first) if needed."""
        self.check_fits(nbytes)
        with self._lock:
            self._expire(self.clock())
            self._make_room(nbytes)
            self._reserved += nbytes
        return Reservation(self, nbytes)

    def add(self, volume: Volume, reservation: Reservation | None = None) -> StoredVolume:
        nbytes = int(volume.voxels.nbytes)
        reservation = reservation or self.reserve(nbytes)
        now = self.clock()
        stored = StoredVolume(uuid.uuid4().hex, volume, nbytes, now, now)
        with self._lock:
            self._reserved -= reservation.nbytes
            reserved, reservation.nbytes = reservation.nbytes, 0
            if nbytes > reserved:
                self._make_room(nbytes - reserved)
            self._volumes[stored.id] = stored
            used = self.used_bytes
        log_event(log, "volume stored", volume_id=stored.id, shape=list(volume.shape), bytes=nbytes, used_bytes=used)
        return stored

    def hold(self, stored: StoredVolume) -> Callable[[], None]:
        """Mark `stored` as used by a job; the returned function (idempotent) lets it go."""
        with self._lock:
            stored.users += 1
            if not stored.stored:
                self._removed_in_use[stored.id] = stored
        released = []

        def release() -> None:
            with self._lock:
                if released:
                    return
                released.append(True)
                stored.users -= 1
                if stored.users == 0:
                    self._removed_in_use.pop(stored.id, None)
        return release

    def get(self, volume_id: str) -> StoredVolume:
        now = self.clock()
        with self._lock:
            self._expire(now)
            stored = self._volumes.get(volume_id)
            if stored is None:
                raise self._missing(volume_id)
            stored.last_used = now
            self._volumes.move_to_end(volume_id)
            return stored

    def delete(self, volume_id: str) -> None:
        with self._lock:
            if volume_id not in self._volumes:
                raise self._missing(volume_id)
            self._evict(volume_id, "deleted by a client")

    def stats(self) -> dict:
        with self._lock:
            self._expire(self.clock())
            return {"count": len(self._volumes), "used_bytes": self.used_bytes, "budget_bytes": self.budget_bytes,
                    "ttl_s": self.ttl_s, "in_use": sum(v.users > 0 for v in self._volumes.values()),
                    "removed_in_use_bytes": sum(v.nbytes for v in self._removed_in_use.values()),
                    "reserved_bytes": self._reserved}

    def _unreserve(self, reservation: Reservation) -> None:
        with self._lock:
            self._reserved -= reservation.nbytes
            reservation.nbytes = 0

    def _make_room(self, nbytes: int) -> None:  # call with the lock held
        """Evict unused volumes, least recently used first, until `nbytes` more fit; refuse (evicting nothing)
        when even all of them would not make room."""
        excess = self.used_bytes + nbytes - self.budget_bytes
        unused = [(i, v.nbytes) for i, v in self._volumes.items() if v.users == 0]
        if excess > sum(size for _, size in unused):
            raise ApiError(503, f"the volume memory budget ({self.budget_bytes / 2**20:,.1f} MiB, --volume-budget-mb) "
                                f"is held by volumes that queued or running jobs still use and by uploads in progress "
                                f"({self.used_bytes / 2**20:,.1f} MiB); retry when they have finished",
                           type="busy", headers={"Retry-After": "5"})
        for volume_id, size in unused:
            if excess <= 0:
                break
            self._evict(volume_id, "to make room for newer uploads (memory budget)")
            excess -= size

    def _expire(self, now: float) -> None:
        for volume_id in [i for i, v in self._volumes.items() if now - v.last_used > self.ttl_s]:
            self._evict(volume_id, f"unused for more than {self.ttl_s:g} s (--volume-ttl)")

    def _evict(self, volume_id: str, reason: str) -> None:
        stored = self._volumes.pop(volume_id)
        stored.stored = False
        if stored.users:
            self._removed_in_use[volume_id] = stored  # its memory is still held until its jobs finish
        self._evicted[volume_id] = reason
        while len(self._evicted) > REMEMBERED_EVICTIONS:
            self._evicted.popitem(last=False)
        log_event(log, "volume evicted", volume_id=volume_id, reason=reason, bytes=stored.nbytes)
        for callback in self.on_evict:
            callback(volume_id, reason)

    def _missing(self, volume_id: str) -> ApiError:
        reason = self._evicted.get(volume_id)
        if reason is not None:
            return ApiError(404, f"volume {volume_id} was evicted ({reason}); upload it again", type="volume_evicted")
        return ApiError(404, f"no volume {volume_id!r}; upload it with POST /v1/volumes", type="volume_not_found")
