"""Uploaded volumes, kept in memory by id: evicted when idle too long (TTL) or to stay within a memory
budget (least recently used first). Ids that were evicted are remembered, so a request for one says so
(and that the client should upload again) instead of a bare 'not found'."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from ..volume.io import Volume
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

    def describe(self, ttl_s: float, now: float) -> dict:
        volume = self.volume
        return {"volume_id": self.id, "name": volume.name, "modality": volume.modality, "shape": list(volume.shape),
                "dtype": str(volume.voxels.dtype.newbyteorder("=")), "spacing": list(volume.geometry.spacing),
                "origin_lps": list(volume.geometry.origin), "ijk_to_ras": volume.geometry.ijk_to_ras().tolist(),
                "bytes": self.nbytes, "expires_in_s": round(max(0.0, self.last_used + ttl_s - now), 1),
                "dicom_series_instance_uid": volume.dicom.series_instance_uid if volume.dicom else None}


class VolumeStore:
    def __init__(self, budget_bytes: int, ttl_s: float, clock=time.monotonic):
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._volumes: OrderedDict[str, StoredVolume] = OrderedDict()  # least recently used first
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:  # call with the lock held
        return sum(v.nbytes for v in self._volumes.values())

    def check_fits(self, nbytes: int) -> None:
        if nbytes > self.budget_bytes:
            raise ApiError(413, f"the volume needs {nbytes / 2**20:,.1f} MiB, more than the server's volume memory "
                                f"budget of {self.budget_bytes / 2**20:,.1f} MiB (--volume-budget-mb); crop it first")

    def add(self, volume: Volume) -> StoredVolume:
        nbytes = int(volume.voxels.nbytes)
        self.check_fits(nbytes)
        now = self.clock()
        stored = StoredVolume(uuid.uuid4().hex, volume, nbytes, now, now)
        with self._lock:
            self._expire(now)
            while self._volumes and self.used_bytes + nbytes > self.budget_bytes:
                oldest = next(iter(self._volumes))
                self._evict(oldest, "to make room for newer uploads (memory budget)")
            self._volumes[stored.id] = stored
            used = self.used_bytes
        log_event(log, "volume stored", volume_id=stored.id, shape=list(volume.shape), bytes=nbytes, used_bytes=used)
        return stored

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
                    "ttl_s": self.ttl_s}

    def _expire(self, now: float) -> None:
        for volume_id in [i for i, v in self._volumes.items() if now - v.last_used > self.ttl_s]:
            self._evict(volume_id, f"unused for more than {self.ttl_s:g} s (--volume-ttl)")

    def _evict(self, volume_id: str, reason: str) -> None:
        stored = self._volumes.pop(volume_id)
        self._evicted[volume_id] = reason
        while len(self._evicted) > REMEMBERED_EVICTIONS:
            self._evicted.popitem(last=False)
        log_event(log, "volume evicted", volume_id=volume_id, reason=reason, bytes=stored.nbytes)

    def _missing(self, volume_id: str) -> ApiError:
        reason = self._evicted.get(volume_id)
        if reason is not None:
            return ApiError(404, f"volume {volume_id} was evicted ({reason}); upload it again", type="volume_evicted")
        return ApiError(404, f"no volume {volume_id!r}; upload it with POST /v1/volumes", type="volume_not_found")
