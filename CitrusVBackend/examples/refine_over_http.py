#!/usr/bin/env python3
"""Text first, then clicks: segment a volume over HTTP, refine the segment with an exclude point, undo it.

    python CitrusVBackend/examples/refine_over_http.py --url http://127.0.0.1:40123 --token-file TOKEN_FILE [VOLUME]

Any `citrusv serve` works (`citrusv serve --model tiny` for a try with the random test model). Without VOLUME
the chest CT that the slicerio package ships is used. Prints what each step changed; exits non-zero on failure.
"""
from __future__ import annotations

import argparse
import base64
import time
import zlib
from pathlib import Path

import numpy as np
import requests


def paste(mask: np.ndarray, change: dict | None) -> None:
    """A step's answer into the client's mask: every voxel of the changed box is replaced."""
    if change:
        crop = np.frombuffer(zlib.decompress(base64.b64decode(change["data"])), np.uint8).reshape(change["shape"])
        mask[tuple(slice(o, o + n) for o, n in zip(change["offset"], change["shape"]))] = crop > 0


def main(url: str, token: str, volume_path: str | None = None, prompt: str = "segment the left lung") -> np.ndarray:
    import SimpleITK as sitk

    if volume_path is None:
        import slicerio

        volume_path = str(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd")
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"

    def call(method: str, path: str, **kwargs) -> dict:
        response = http.request(method, url + path, timeout=600, **kwargs)
        if response.status_code >= 400:
            raise SystemExit(f"{method} {path}: {response.status_code} {response.json()['error']['message']}")
        return response.json()

    with open(volume_path, "rb") as file:                       # the server reads NIfTI / NRRD / MHA uploads
        volume = call("POST", "/v1/volumes", files={"file": (Path(volume_path).name, file)})
    depth = volume["shape"][0]
    job = call("POST", "/v1/jobs", json={"volume_id": volume["volume_id"], "task": "segment", "prompt": prompt,
                                         "options": {"slice_range": [depth // 2 - 2, depth // 2 + 2]}})
    while (status := call("GET", f"/v1/jobs/{job['job_id']}"))["status"] in ("queued", "running"):
        time.sleep(0.5)
    result = call("GET", f"/v1/jobs/{job['job_id']}/result")
    mask = np.zeros(result["labelmap"]["shape"], bool)
    paste(mask, result["segments"][0]["mask"])
    first = mask.copy()

    # One session per volume and segment; it starts from the job (its mask, slices and text prompt).
    segment = f"/v1/volumes/{volume['volume_id']}/segments/lung"
    info = call("PUT", segment, json={"job_id": job["job_id"], "label": 1})
    k, j, i = np.argwhere(mask)[len(np.argwhere(mask)) // 2]   # a voxel of the segment, in (k, j, i)
    step = call("POST", f"{segment}/refine", json={
        "points": [{"ijk": [int(i), int(j), int(k)], "positive": False}],   # voxel indices (i, j, k)
        "propagate": True, "max_propagation_slices": 2, "expected_version": info["version"]})
    paste(mask, step["change"])
    print(f"refine: slices {step['refined_slices']} corrected, {step['propagated_slices']} re-propagated, "
          f"{step['voxels']} voxels, {step['timings']['total_s'] * 1000:.0f} ms")
    assert not mask[k, j, i], "the excluded voxel left the segment"
    undone = call("POST", f"{segment}/undo", json={"expected_version": step["version"]})
    paste(mask, undone["change"])
    assert np.array_equal(mask, first), "undo gives back the exact mask"
    print(f"undo: back to version {undone['version']} with {undone['voxels']} voxels, as the text prompt left it")
    return mask


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("volume", nargs="?", default=None)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--prompt", default="segment the left lung")
    args = parser.parse_args()
    main(args.url, Path(args.token_file).read_text().strip(), args.volume, args.prompt)
