"""Prefetching, host-time accounting and the SAM2 feature cache, on their own (no model)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from citrusv_backend.inference.hostwork import HostStats, Prefetcher, worker_pool
from citrusv_backend.model.feature_cache import SAM2Backbone, SAM2FeatureCache, split_backbone, stack_backbones

pytestmark = pytest.mark.model


class Recorder:
    """A `prepare` function that records which thread prepared what, and how many items were held at once."""

    def __init__(self, delay: float = 0.0, fail_on=None):
        self.delay = delay
        self.fail_on = fail_on
        self.threads: dict[int, str] = {}
        self.lock = threading.Lock()

    def __call__(self, key):
        if key == self.fail_on:
            raise ValueError(f"cannot prepare {key}")
        time.sleep(self.delay)
        with self.lock:
            self.threads[key] = threading.current_thread().name
        return key * 10


def test_prefetcher_prepares_ahead_on_workers_in_order_and_bounded():
    recorder = Recorder(delay=0.01)
    held = []
    with worker_pool(2) as pool:
        prefetcher = Prefetcher(recorder, pool, depth=3)
        original_fill = prefetcher._fill

        def fill():
            original_fill()
            held.append(len(prefetcher._held))

        prefetcher._fill = fill
        prefetcher.schedule(range(10))
        time.sleep(0.2)  # the model is busy: the workers fill up to `depth`, no further
        assert len(prefetcher._held) == 3 and sorted(recorder.threads) == [0, 1, 2]
        assert [prefetcher.get(k) for k in range(10)] == [k * 10 for k in range(10)]
    assert max(held) <= 3 and sorted(recorder.threads) == list(range(10))
    # Prepared ahead by the workers; what had not started when asked for, the caller took over (never twice).
    assert all(recorder.threads[k].startswith("citrusv-prefetch") for k in (0, 1, 2))


def test_prefetcher_without_a_pool_prepares_inline_and_counts_it_as_critical():
    stats = HostStats()
    recorder = Recorder()
    prefetcher = Prefetcher(recorder, None, depth=2, stats=stats)
    prefetcher.schedule([1, 2])
    with stats.phase("test"):
        assert prefetcher.get(2) == 20 and prefetcher.get(7) == 70  # 7 was never scheduled
    assert set(recorder.threads.values()) == {threading.current_thread().name}
    assert stats.cpu[("test", "preprocess")] >= 0 and stats.critical[("test", "preprocess")] > 0


def test_prefetcher_cancel_drops_work_and_errors_reach_the_caller():
    recorder = Recorder(delay=0.05, fail_on=3)
    with worker_pool(1) as pool:
        prefetcher = Prefetcher(recorder, pool, depth=4)
        prefetcher.schedule(range(8))
        prefetcher.cancel()
        assert not prefetcher._held and not prefetcher._queue
        time.sleep(0.15)
        assert len(recorder.threads) <= 1  # at most the one already running when cancelled
        prefetcher.schedule([3])
        with pytest.raises(ValueError, match="cannot prepare 3"):
            prefetcher.get(3)


def test_the_model_thread_waits_only_for_items_already_being_prepared():
    stats = HostStats()
    recorder = Recorder(delay=0.1)
    with worker_pool(1) as pool:
        prefetcher = Prefetcher(recorder, pool, depth=2, stats=stats)
        with stats.phase("test"):
            prefetcher.schedule([0, 1])
            time.sleep(0.02)
            assert prefetcher.get(1) == 10  # not started yet (the worker is busy with 0): taken over by the caller
            assert prefetcher.get(0) == 0   # running on the worker: waited for
    assert recorder.threads[1] == threading.current_thread().name
    assert recorder.threads[0].startswith("citrusv-prefetch")
    assert 0.05 < stats.critical[("test", "preprocess")] < 5


def test_host_stats_phases_exclude_nested_phases_and_give_waiting_shares():
    stats = HostStats()
    with stats.phase("outer"):
        time.sleep(0.05)
        with stats.phase("inner"):
            stats.count(4)
            with stats.work("postprocess", critical=True):
                time.sleep(0.04)
            with stats.work("preprocess", critical=False):
                sum(range(10000))
            time.sleep(0.04)
    summary = stats.summary()
    inner, outer = summary["inner"], summary["outer"]
    assert inner["slices"] == 4 and 0.07 < inner["wall_s"] < 1
    assert 0.04 < outer["wall_s"] < 0.5  # without the inner phase's time
    assert 0.3 < inner["model_waiting_share"] < 0.7
    assert inner["critical_ms_per_slice"]["postprocess"] >= 10 and inner["critical_ms_per_slice"]["preprocess"] == 0
    assert inner["cpu_ms_per_slice_total"] >= inner["cpu_ms_per_slice"]["preprocess"]


# ---------------------------------------------------------------------------------------------- feature cache


def fake_backbone(batch: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    fpn = [torch.randn(batch, 4, 16, 16, generator=generator), torch.randn(batch, 8, 8, 8, generator=generator),
           torch.randn(batch, 32, 4, 4, generator=generator)]
    pos = [torch.randn(1, 32, s, s, generator=generator).expand(batch, -1, -1, -1) for s in (16, 8, 4)]
    return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}


def test_split_and_stack_are_exact_inverses():
    backbone = fake_backbone(3)
    entries = split_backbone(backbone)
    assert len(entries) == 3 and entries[1].fpn[0].shape == (1, 4, 16, 16)
    stacked = stack_backbones(entries)
    for key in ("backbone_fpn", "vision_pos_enc"):
        assert all(torch.equal(a, b) for a, b in zip(stacked[key], backbone[key]))
    assert torch.equal(stacked["vision_features"], backbone["vision_features"])
    one = stack_backbones([entries[2]])
    assert torch.equal(one["backbone_fpn"][1][0], backbone["backbone_fpn"][1][2])


def test_cache_is_least_recently_used_by_bytes():
    entries = split_backbone(fake_backbone(4))
    size = entries[0].nbytes
    cache = SAM2FeatureCache(max_bytes=int(2.5 * size))
    cache.put("a", entries[0])
    cache.put("b", entries[1])
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", entries[2])
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert cache.nbytes == 2 * size
    assert cache.describe()["hits"] == 1
    assert cache.get("b") is None and cache.misses == 1
    cache.put("too big", SAM2Backbone([torch.zeros(int(3 * size // 4))], []))
    assert "too big" not in cache
    # Position encodings are stored once for all entries of the same shapes.
    assert cache.get("a").pos[0] is cache.get("c").pos[0]
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
