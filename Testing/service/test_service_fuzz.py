"""Fuzzing every endpoint with random and mutated payloads (hypothesis): never a 5xx, errors always JSON,
and the service healthy afterwards. Runs against the limits server (16-token answers, 4 MiB bodies), so the
requests that happen to be valid stay cheap; every job a case creates is cancelled at once."""
from __future__ import annotations

import json
import time
from collections import Counter
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service_helpers import png_base64, volume_payload

pytestmark = pytest.mark.service

CASES: Counter = Counter()
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)

NASTY = [None, True, 0, -1, 2**31, 2**63, -2**63, 1e308, -1e-308, "", " ", "a" * 5000, "\x00", "../../etc/passwd",
         "<|image_pad|>", "[SEG]", "data:image/png;base64,", "data:,", "%s%n", "😀" * 50, [], {}, [[]], [1, 2, 3],
         {"a": {"b": None}}, "NaN", "Infinity", 0.5, [0, 0], [-5, 3], [3, -5], [0, 10**9]]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40) | st.sampled_from(NASTY),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=10)


@pytest.fixture(scope="module")
def http(limits_server):
    with httpx.Client(base_url=limits_server.url, headers=limits_server.headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def bases(http):
    """One valid request per endpoint, to be mutated; the volume is re-uploaded when the 4 s TTL nears."""
    rng = np.random.default_rng(0)
    tiny = rng.integers(-1000, 1000, size=(3, 8, 8)).astype(np.int16)
    from citrusv_backend.volume.io import Volume

    volume = Volume.from_ijk_to_ras(tiny, np.diag([1.0, 1.0, 2.0, 1.0]), name="fuzz")
    image = png_base64(rng.integers(0, 255, size=(16, 16, 3)).astype(np.uint8))
    state = {"volume": volume_payload(volume, name="fuzz"), "volume_id": None, "uploaded": 0.0}

    def volume_id() -> str:
        if time.monotonic() - state["uploaded"] > 2.5:
            state["volume_id"] = http.post("/v1/volumes", json=state["volume"]).json()["volume_id"]
            state["uploaded"] = time.monotonic()
        return state["volume_id"]

    return {
        "volume": lambda: json.loads(json.dumps(state["volume"])),
        "job": lambda: {"volume_id": volume_id(), "task": "segment", "prompt": "segment the lung",
                        "options": {"mode": "per-slice", "slice_range": [0, 1], "max_new_tokens": 2}},
        "image": lambda: {"image": image, "prompt": "What is this?", "task": "ask", "max_new_tokens": 2,
                          "min_pixels": 784, "max_pixels": 3136},
        "chat": lambda: {"model": "CitrusV_8B", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": "What is this?"}]}]},
    }


ENDPOINTS = {"volume": "/v1/volumes", "job": "/v1/jobs", "image": "/v1/images/infer", "chat": "/v1/chat/completions"}


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _pick(data, options: list):
    """One of `options` through a draw whose constraints never depend on the payload: hypothesis replays
    examples and refuses strategies that change shape between the recording and the replay."""
    return options[data.draw(st.integers(0, 2**20)) % len(options)]


def _tweak(data, value):
    """A value of the same type: it passes the schema more often, so the cases reach deeper code."""
    if isinstance(value, bool) or value is None:
        return data.draw(st.booleans() | st.none())
    if isinstance(value, int):
        return data.draw(st.integers(-3, 64) | st.integers(-3, 300_000)) % max(3, 2 * value + 4)
    if isinstance(value, float):
        return data.draw(st.floats(allow_nan=False))
    if isinstance(value, str):
        return data.draw(st.text(max_size=60) | st.sampled_from([v for v in NASTY if isinstance(v, str)])
                         | st.just(value[: len(value) // 2]))
    if isinstance(value, list):
        shuffled = list(value)
        data.draw(st.randoms(use_true_random=False)).shuffle(shuffled)
        return shuffled
    return value


def _mutate(data, payload):
    """Tweak, replace, delete or add at 1-3 random places of the payload's tree."""
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(payload) if p]
        if not paths:
            return data.draw(json_values)
        path = _pick(data, paths)
        parent = payload
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["tweak", "tweak", "replace", "delete", "add"]))
        if action == "tweak":
            parent[path[-1]] = _tweak(data, parent[path[-1]])
        elif action == "replace":
            parent[path[-1]] = data.draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(min_size=1, max_size=10))] = data.draw(json_values)
        else:
            parent.append(data.draw(json_values))
    return payload


def _check(response: httpx.Response, http: httpx.Client, kind: str) -> None:
    CASES[kind] += 1
    assert response.status_code < 500, f"{response.request.method} {response.request.url}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["type"] and error["message"]
    elif response.request.url.path == "/v1/jobs" and response.request.method == "POST":
        http.delete(f"/v1/jobs/{response.json()['job_id']}")  # keep the worker free for the next cases


@pytest.mark.parametrize("kind, examples", [("volume", 70), ("job", 70), ("image", 40), ("chat", 40)])
def test_mutated_payloads(http, bases, kind, examples):
    @settings(max_examples=examples, **SETTINGS)
    @given(st.data())
    def run(data):
        payload = _mutate(data, bases[kind]())
        response = http.post(ENDPOINTS[kind], content=json.dumps(payload, allow_nan=True),
                             headers={"content-type": "application/json"})
        _check(response, http, f"mutated {kind}")

    run()


@settings(max_examples=60, **SETTINGS)
@given(endpoint=st.sampled_from(sorted(ENDPOINTS.values())), body=st.binary(max_size=3000) | json_values.map(
    lambda v: json.dumps(v).encode()), content_type=st.sampled_from(
    ["application/json", "multipart/form-data; boundary=xyz", "multipart/form-data", "application/octet-stream",
     "text/plain", "", "application/json; charset=latin-1"]))
def test_random_bodies(http, endpoint, body, content_type):
    _check(http.post(endpoint, content=body, headers={"content-type": content_type}), http, "random body")


@settings(max_examples=40, **SETTINGS)
@given(method=st.sampled_from(["GET", "DELETE"]), template=st.sampled_from(
    ["/v1/volumes/{}", "/v1/jobs/{}", "/v1/jobs/{}/result"]), identifier=st.text(min_size=1, max_size=80))
def test_random_ids(http, method, template, identifier):
    _check(http.request(method, template.format(quote(identifier, safe=""))), http, "random id")


@settings(max_examples=30, **SETTINGS)
@given(value=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80).filter(
    lambda v: v == v.strip()))  # httpx itself refuses header values with outer spaces
def test_random_credentials(limits_server, value):
    response = httpx.get(f"{limits_server.url}/v1/info", headers={"Authorization": value})
    CASES["random credentials"] += 1
    assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized"


def test_the_service_is_healthy_after_the_fuzzing(http, limits_server):
    assert limits_server.process.poll() is None
    assert http.get("/healthz").json() == {"status": "ok", "worker_alive": True}
    assert http.get("/v1/info").status_code == 200
    total = sum(CASES.values())
    print(f"\nfuzz cases tried: {total} ({dict(CASES)})")
    assert total >= 300, CASES
