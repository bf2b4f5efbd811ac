"""Fuzzing every endpoint with random and mutated requests (see fuzzing.py): more than 3,000 seeded requests
per run, never a 5xx, errors always JSON, and the service healthy afterwards. Runs against the limits server
(16-token answers, 4 MiB bodies), so the requests that happen to be valid stay cheap. CITRUSV_FUZZ_SEED picks
other examples (default: the same every run); bench/bench_fuzz.py sends 10,000."""
from __future__ import annotations

import os

import httpx
import pytest
from fuzzing import FuzzRecord, make_bases, run_fuzz

pytestmark = pytest.mark.service

COUNTS = {"volume": 600, "job": 500, "image": 200, "chat": 200, "file": 600, "random body": 500, "random id": 300,
          "random credentials": 200}
SEED = int(os.environ.get("CITRUSV_FUZZ_SEED", "2026"))


@pytest.fixture(scope="module")
def http(limits_server):
    with httpx.Client(base_url=limits_server.url, headers=limits_server.headers, timeout=60) as client:
        yield client


def test_thousands_of_fuzzed_requests_get_no_5xx(http, limits_server):
    record = run_fuzz(http, make_bases(http), COUNTS, FuzzRecord(strict=True), SEED)
    print(f"\nfuzz: {record.total} requests (seed {SEED}): {dict(record.kinds)}; statuses {dict(record.statuses)}")
    assert record.total >= 3000, record.kinds
    assert not record.server_errors
    assert limits_server.process.poll() is None
    assert http.get("/healthz").json() == {"status": "ok", "worker_alive": True}
    assert http.get("/v1/info").status_code == 200
