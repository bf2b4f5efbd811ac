"""Fuzzing the service's endpoints with random and mutated requests (hypothesis), seeded, for the fuzz test
(a few thousand requests per CI run) and the 10,000-request benchmark (bench/bench_fuzz.py).

Every request must be answered below 500, with a JSON error for every 4xx. The payloads start from one valid
request per endpoint — a volume upload, a job, a 2D image, a chat completion, a volume *file* (NRRD, MetaImage,
NIfTI headers in bytes) — and are mutated at one to three places, so that most of them pass the schema and
reach deeper code; plus random bodies, content types, ids and credentials. Jobs a case creates are cancelled
at once. Run against a server with small limits (16-token answers, 4 MiB bodies) so valid requests stay cheap.
"""
from __future__ import annotations

import copy
import gzip
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from service_helpers import png_base64, volume_payload

NASTY = [None, True, 0, -1, 2**31, 2**63, -2**63, 2**64 + 1, 1e308, -1e-308, "", " ", "a" * 5000, "\x00",
         "../../etc/passwd", "<|image_pad|>", "[SEG]", "data:image/png;base64,", "data:,", "%s%n", "😀" * 50, [], {},
         [[]], [1, 2, 3], [2**63, 1, 1], [2**32, 2**32, 1], {"a": {"b": None}}, "NaN", "Infinity", 0.5, [0, 0],
         [-5, 3], [3, -5], [0, 10**9], "nan,nan", "inf,1", "40,0"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40) | st.sampled_from(NASTY).map(copy.deepcopy),  # a copy: mutations append to lists
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=6)

ENDPOINTS = {"volume": "/v1/volumes", "job": "/v1/jobs", "image": "/v1/images/infer", "chat": "/v1/chat/completions"}
# Header lines a hostile volume file might carry (external data files above all: they must all be refused).
HEADER_LINES = [b"data file: /etc/hostname", b"datafile: LIST", b"data file: x.raw", b"byte skip: -1",
                b"line skip: 3", b"encoding: gzip", b"encoding: bzip2", b"encoding: hex", b"encoding: ascii",
                b"type: double", b"type: block", b"sizes: 4096 4096 4096", b"sizes: -1 2 3", b"dimension: 7",
                b"ElementDataFile = /etc/passwd", b"ElementDataFile = LIST", b"ElementDataFile = x%03d.raw 1 9 1",
                b"HeaderSize = -1", b"CompressedData = True", b"DimSize = 640 640 640", b"ElementType = MET_DOUBLE",
                b"# " + b"x" * 70_000, b"", b"\r", b"key:=value", b"Comment = " + b"y" * 1000]


@dataclass
class FuzzRecord:
    """What the requests got: counts per case kind and status, server-side errors, latencies."""

    strict: bool = True                        # a 5xx fails at once (tests); else it is counted (benchmarks)
    kinds: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    server_errors: list = field(default_factory=list)
    latencies_ms: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.kinds.values())


def make_bases(http: httpx.Client) -> dict:
    """One valid request per endpoint, to be mutated; the volume is re-uploaded when the 4 s TTL nears."""
    from citrusv_backend.volume.input.io import Volume

    rng = np.random.default_rng(0)
    tiny = rng.integers(-1000, 1000, size=(3, 8, 8)).astype(np.int16)
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
        "files": volume_files(tiny),
    }


def volume_files(voxels: np.ndarray) -> dict[str, bytes]:
    """The same small volume as NRRD, MetaImage and NIfTI (plain and gzip) bytes."""
    import nibabel as nib

    raw = voxels.astype("<i2").tobytes()
    k, j, i = voxels.shape
    nrrd = (f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {i} {j} {k}\n"
            f"space directions: (1,0,0) (0,1,0) (0,0,2)\nendian: little\nencoding: raw\n"
            f"space origin: (0,0,0)\n\n").encode() + raw
    mha = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
           f"ElementSpacing = 1 1 2\nDimSize = {i} {j} {k}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
           ).encode() + raw
    header = nib.Nifti1Header()
    header.set_data_shape((i, j, k))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    nifti = header.binaryblock + b"\x00" * 4 + voxels.transpose(2, 1, 0).astype("<i2").tobytes(order="F")
    return {"v.nrrd": nrrd, "v.mha": mha, "v.nii": nifti, "v.nii.gz": gzip.compress(nifti)}


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


def mutate(data, payload):
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


def mutate_file(data, content: bytes) -> bytes:
    """Bytes of a volume file with 1-3 changes: header lines inserted, bytes flipped, cut or duplicated."""
    content = bytearray(content)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["line", "line", "flip", "cut", "repeat"]))
        at = data.draw(st.integers(0, 2**20)) % (len(content) + 1)
        if action == "line":
            line = _pick(data, HEADER_LINES) + _pick(data, [b"\n", b"\r\n", b"\r"])
            newline = content.find(b"\n", 0, max(at, 1))
            where = newline + 1 if newline >= 0 else at
            content[where:where] = line
        elif action == "flip" and content:
            content[at % len(content)] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del content[at:]
        else:
            content[at:at] = content[max(0, at - 64):at] * data.draw(st.integers(1, 8))
    return bytes(content)


def check(record: FuzzRecord, http: httpx.Client, kind: str, send) -> None:
    started = time.perf_counter()
    response = send()
    record.latencies_ms.append((time.perf_counter() - started) * 1000)
    record.kinds[kind] += 1
    record.statuses[response.status_code] += 1
    if response.status_code >= 500:
        record.server_errors.append({"kind": kind, "status": response.status_code, "request":
                                     f"{response.request.method} {response.request.url.path}",
                                     "body": response.text[:300]})
        if record.strict:
            raise AssertionError(f"{response.request.method} {response.request.url}: {response.status_code} "
                                 f"{response.text[:500]}")
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["type"] and error["message"], response.text
    elif response.request.url.path == "/v1/jobs" and response.request.method == "POST":
        http.delete(f"/v1/jobs/{response.json()['job_id']}")  # keep the worker free for the next cases


def run_fuzz(http: httpx.Client, bases: dict, counts: dict[str, int], record: FuzzRecord, seed_value: int) -> FuzzRecord:
    """Run `counts[kind]` examples of each case kind (mutated volume/job/image/chat/file, random body, random
    id, random credentials), each kind seeded from `seed_value`."""
    options = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True,
                   phases=[Phase.explicit, Phase.generate, Phase.shrink])

    def seeded(examples: int, offset: int):
        return lambda test: seed(seed_value + offset)(settings(max_examples=examples, **options)(test))

    def mutated(kind: str):
        @given(st.data())
        def case(data):
            payload = mutate(data, bases[kind]())
            check(record, http, f"mutated {kind}", lambda: http.post(
                ENDPOINTS[kind], content=json.dumps(payload, allow_nan=True), headers={"content-type": "application/json"}))
        return case

    @given(st.data())
    def mutated_file(data):
        name = _pick(data, sorted(bases["files"]))
        content = mutate_file(data, bases["files"][name])
        check(record, http, "mutated file", lambda: http.post(
            "/v1/volumes", files={"file": (_pick(data, [name, "x.nrrd", "x.mha", "x.nii", "x.nhdr"]), content,
                                           "application/octet-stream")}))

    @given(endpoint=st.sampled_from(sorted(ENDPOINTS.values())), body=st.binary(max_size=3000) | json_values.map(
        lambda v: json.dumps(v).encode()), content_type=st.sampled_from(
        ["application/json", "multipart/form-data; boundary=xyz", "multipart/form-data", "application/octet-stream",
         "text/plain", "", "application/json; charset=latin-1"]))
    def random_body(endpoint, body, content_type):
        check(record, http, "random body", lambda: http.post(endpoint, content=body,
                                                             headers={"content-type": content_type}))

    @given(method=st.sampled_from(["GET", "DELETE"]), template=st.sampled_from(
        ["/v1/volumes/{}", "/v1/jobs/{}", "/v1/jobs/{}/result", "/v1/conversations/{}",
         "/v1/conversations/{}/export"]), identifier=st.text(min_size=1, max_size=80))
    def random_id(method, template, identifier):
        check(record, http, "random id", lambda: http.request(method, template.format(quote(identifier, safe=""))))

    @given(value=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80).filter(
        lambda v: v == v.strip()))  # httpx itself refuses header values with outer spaces
    def random_credentials(value):
        response = http.get("/v1/info", headers={"Authorization": value})  # replaces the client's own token
        record.kinds["random credentials"] += 1
        record.statuses[response.status_code] += 1
        assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized"

    cases = {**{kind: mutated(kind) for kind in ENDPOINTS}, "file": mutated_file, "random body": random_body,
             "random id": random_id, "random credentials": random_credentials}
    for offset, (kind, test) in enumerate(cases.items()):
        if counts.get(kind):
            seeded(counts[kind], offset)(test)()
    return record
