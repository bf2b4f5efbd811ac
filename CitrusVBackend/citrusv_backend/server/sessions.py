"""Refinement sessions of the service: one per uploaded volume and segment name.

A session keeps what makes the next click fast: the segment's mask, its corrected slices and logits, its
undo / redo history, and — shared by every session on the same slices (volume, plane, window, pixel budget) —
the SAM2 features of recently used slices, within one memory budget for the whole server. Segmentation jobs
fill the same cache (`features_for`), so the first click on a slice a job touched needs no encoding. Sessions end when a
client deletes them, with their volume (eviction or deletion), after being idle for the volume TTL, or as the
least recently used beyond `max_sessions`; a request for an ended session says why.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..model.feature_cache import SAM2FeatureCache
from ..refine.volume_features import SliceFeatureStore
from ..refine.volume_session import RefinementSession
from ..volume.slices.slice_source import volume_token
from .errors import ApiError
from .logs import log_event

log = logging.getLogger("citrusv.server")

REMEMBERED_ENDINGS = 10_000


@dataclass
class SessionEntry:
    volume_id: str
    segment: str
    session: RefinementSession
    store_key: tuple
    created: float
    last_used: float

    def describe(self) -> dict:
        return {"volume_id": self.volume_id, "segment": self.segment} | self.session.describe()


class RefineSessions:
    def __init__(self, engine, feature_budget_bytes: int, max_sessions: int = 64, ttl_s: float = 3600.0,
                 clock=time.monotonic):
        self.engine = engine
        self.memory = SAM2FeatureCache(feature_budget_bytes)  # the SAM2 features of every session's slices
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: OrderedDict[tuple[str, str], SessionEntry] = OrderedDict()
        self._stores: dict[tuple, SliceFeatureStore] = {}
        self._ended: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._tokens: dict[str, object] = {}   # volume id -> its identity in the cache keys
        self._lock = threading.Lock()

    def features_for(self, volume_id: str, volume) -> SAM2FeatureCache:
        """The cache a segmentation job on this volume fills (its slices' features serve later clicks)."""
        with self._lock:
            self._tokens[volume_id] = volume_token(volume)
        return self.memory

    def open(self, volume_id: str, segment: str, source, budget, build) -> SessionEntry:
        """Start (or restart) the session: `build(store)` makes it on the shared feature store of its slices."""
        window = source.window
        store_key = (volume_id, source.orientation, window.center, window.width, budget.min_pixels, budget.max_pixels)
        now = self.clock()
        with self._lock:
            self._expire(now)
            self._tokens[volume_id] = volume_token(source.volume)
            store = self._stores.get(store_key)
            if store is None:
                store = self._stores[store_key] = SliceFeatureStore(self.engine, source, budget, self.memory)
            session: RefinementSession = build(store)
            replaced = self._sessions.pop((volume_id, segment), None)
            if replaced is not None:
                replaced.session.close()
            entry = SessionEntry(volume_id, segment, session, store_key, now, now)
            self._sessions[(volume_id, segment)] = entry
            self._ended.pop((volume_id, segment), None)
            while len(self._sessions) > self.max_sessions:
                self._end(next(iter(self._sessions)), f"the server keeps at most {self.max_sessions} refinement sessions")
            self._release_unused_stores()
        log_event(log, "refine session opened", volume_id=volume_id, segment=segment, replaced=replaced is not None,
                  voxels=int(session.mask.sum()))
        return entry

    def get(self, volume_id: str, segment: str) -> SessionEntry:
        now = self.clock()
        with self._lock:
            self._expire(now)
            entry = self._sessions.get((volume_id, segment))
            if entry is None:
                reason = self._ended.get((volume_id, segment))
                if reason is not None:
                    raise ApiError(404, f"the refinement session of segment {segment!r} on volume {volume_id} ended "
                                        f"({reason}); start it again with PUT", type="session_ended")
                raise ApiError(404, f"no refinement session for segment {segment!r} on volume {volume_id}; start one "
                                    f"with PUT /v1/volumes/{volume_id}/segments/{segment}", type="session_not_found")
            entry.last_used = now
            self._sessions.move_to_end((volume_id, segment))
            return entry

    def list(self, volume_id: str) -> list[dict]:
        with self._lock:
            entries = [e for (v, _), e in self._sessions.items() if v == volume_id]
        return [entry.describe() for entry in entries]

    def close(self, volume_id: str, segment: str) -> None:
        with self._lock:
            if (volume_id, segment) not in self._sessions:
                raise ApiError(404, f"no refinement session for segment {segment!r} on volume {volume_id}",
                               type="session_not_found")
            self._end((volume_id, segment), "deleted by a client")
            self._release_unused_stores()

    def drop_volume(self, volume_id: str, reason: str) -> None:
        """The volume is gone: so are its sessions and features."""
        with self._lock:
            for key in [k for k in self._sessions if k[0] == volume_id]:
                self._end(key, f"its volume was evicted or deleted: {reason}")
            self._release_unused_stores()
            token = self._tokens.pop(volume_id, None)
        if token is not None:  # what its jobs left in the cache (keys: ((token, plane, window), slice, budget))
            self.memory.discard_where(lambda key: isinstance(key[0], tuple) and key[0][0] is token)

    def stats(self) -> dict:
        with self._lock:
            return {"sessions": len(self._sessions), "max_sessions": self.max_sessions, "ttl_s": self.ttl_s,
                    "features": self.memory.describe(),
                    "session_bytes": sum(e.session.nbytes for e in self._sessions.values())}

    # ------------------------------------------------------------------------------------------ internals

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self._sessions.items() if now - e.last_used > self.ttl_s]:
            self._end(key, f"unused for more than {self.ttl_s:g} s")
        self._release_unused_stores()

    def _end(self, key: tuple[str, str], reason: str) -> None:
        entry = self._sessions.pop(key)
        entry.session.close()
        self._ended[key] = reason
        while len(self._ended) > REMEMBERED_ENDINGS:
            self._ended.popitem(last=False)
        log_event(log, "refine session ended", volume_id=key[0], segment=key[1], reason=reason)

    def _release_unused_stores(self) -> None:
        used = {entry.store_key for entry in self._sessions.values()}
        for key in [k for k in self._stores if k not in used]:
            self._stores.pop(key).close()
