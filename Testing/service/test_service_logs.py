"""The server's stderr is a JSON log: every line one JSON object — numpy's RuntimeWarnings and anything else
a library writes to stderr included."""
from __future__ import annotations

import json

import numpy as np
import pytest

from citrusv_backend.volume.input.io import Volume
from service_helpers import submit, volume_payload, wait

pytestmark = pytest.mark.service


def test_every_log_line_is_json_even_after_numpy_warnings(client, session_dir):
    """An MR volume with NaN voxels: windowing it makes numpy warn (invalid value in cast)."""
    voxels = np.random.default_rng(0).normal(100, 20, size=(4, 32, 32)).astype(np.float32)
    voxels[1, 3:9, 3:9] = np.nan
    voxels[2] = np.inf
    payload = volume_payload(Volume.from_ijk_to_ras(voxels, np.eye(4), modality="MR"), name="nan-mr")
    volume_id = client.post("/v1/volumes", json=payload).json()["volume_id"]
    for index in (1, 2):
        job = submit(client, volume_id, "ask", "What is this?", slice=index, max_new_tokens=1, min_pixels=784,
                     max_pixels=3136)
        assert wait(client, job)["status"] in ("done", "failed")
    lines = (session_dir / "server.log").read_text(errors="replace").splitlines()
    assert lines
    not_json = []
    for line in lines:
        try:
            assert isinstance(json.loads(line), dict)
        except (ValueError, AssertionError):
            not_json.append(line)
    assert not not_json, f"{len(not_json)} of {len(lines)} log lines are not JSON: {not_json[:5]}"
    assert any("Warning" in json.loads(line).get("message", "") + json.loads(line).get("category", "")
               for line in lines), "the numpy warning should be in the log, as JSON"
