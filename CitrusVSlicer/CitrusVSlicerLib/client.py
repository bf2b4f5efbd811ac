"""HTTP client of the CitrusV backend service (requests only; no Qt, no MRML).

The volume is uploaded once (zlib-compressed voxels + the IJK->RAS matrix) and referred to by id; jobs are
submitted, followed and cancelled; results come back as compressed crops of the labelmap on the uploaded
grid, rebuilt here into `SceneResult`. TLS certificates are always verified (a custom CA bundle may be
given, verification can never be switched off).
"""
from __future__ import annotations

import base64
import ipaddress
import zlib
from urllib.parse import urlparse

import numpy as np
import requests

from .results import SceneResult, SegmentMask

SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")


class BackendError(Exception):
    """The backend could not be reached, refused the request, or the job failed; the message says which."""


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalise_url(url: str) -> str:
    """Users type 'gpu-server:8000'; requests needs a scheme (a frequent support question for other tools)."""
    url = url.strip().rstrip("/")
    if not url:
        raise BackendError("no backend URL given")
    if "://" not in url:
        url = "http://" + url
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BackendError(f"{url!r} is not an http(s) URL")
    return url


def guess_modality(voxels: np.ndarray) -> str:
    """CT in Hounsfield units has air near -1000 and integer voxels; anything else is treated as MR."""
    if np.issubdtype(voxels.dtype, np.integer) and voxels.size and int(voxels.min()) <= -500:
        return "CT"
    return "MR"


class BackendClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0, ca_bundle: str | None = None):
        self.url = normalise_url(url)
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.verify = ca_bundle or True  # never False

    # ------------------------------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, timeout: float | None = None, **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, self.url + path, timeout=timeout or self.timeout, **kwargs)
        except requests.exceptions.SSLError as error:
            raise BackendError(f"the backend's TLS certificate could not be verified ({error}); give the CA bundle "
                               f"of your organisation instead of disabling checks") from None
        except requests.exceptions.ConnectionError:
            raise BackendError(f"cannot connect to the backend at {self.url}: is it running, and is the address "
                               f"right? (behind a proxy, add the host to NO_PROXY)") from None
        except requests.exceptions.Timeout:
            raise BackendError(f"the backend at {self.url} did not answer within {timeout or self.timeout:.0f} s") from None
        if response.status_code >= 400:
            raise BackendError(self._error_message(response))
        return response

    @staticmethod
    def _error_message(response: requests.Response) -> str:
        try:
            error = response.json().get("error", {})
            message = error.get("message") or response.text
        except ValueError:
            message = response.text[:300] or response.reason
        if response.status_code == 401:
            return f"the backend refused the token (401): {message}"
        return f"backend error {response.status_code}: {message}"

    # ------------------------------------------------------------------------------------------ API

    def health(self) -> dict:
        return self._request("GET", "/healthz", timeout=5).json()

    def info(self) -> dict:
        return self._request("GET", "/v1/info", timeout=10).json()

    def upload_volume(self, voxels: np.ndarray, ijk_to_ras: np.ndarray, name: str, modality: str | None = None,
                      dicom: dict | None = None) -> str:
        """`dicom`: the source series (dicom_export.dicom_reference), so the backend makes a DICOM SEG and SR."""
        if voxels.ndim != 3:
            raise BackendError(f"the volume must be 3D, got shape {voxels.shape}")
        array = voxels if voxels.dtype.name in SUPPORTED_DTYPES else voxels.astype(np.float32)
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        # On loopback compressing costs more than it saves (about 2x end to end); over a network it pays.
        compression = "none" if is_loopback(self.url) else "zlib"
        payload = little if compression == "none" else zlib.compress(little, 1)
        body = {"voxels": base64.b64encode(payload).decode("ascii"), "compression": compression,
                "dtype": array.dtype.name, "shape": list(array.shape),
                "ijk_to_ras": np.asarray(ijk_to_ras, float).tolist(), "name": name[:200] or "volume",
                "modality": modality or (dicom or {}).get("modality") or guess_modality(array)}
        if dicom:
            body["dicom"] = dicom
            body["modality"] = "PET" if body["modality"] == "PT" else body["modality"]
        return self._request("POST", "/v1/volumes", json=body, timeout=max(self.timeout, 300)).json()["volume_id"]

    def submit_job(self, volume_id: str, task: str, prompt: str, options: dict | None = None) -> str:
        body = {"volume_id": volume_id, "task": task, "prompt": prompt, "options": options or {}}
        return self._request("POST", "/v1/jobs", json=body).json()["job_id"]

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel_job(self, job_id: str) -> dict:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def result_payload(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}/result", timeout=max(self.timeout, 120)).json()

    def result(self, job_id: str, shape_kji: tuple[int, int, int]) -> SceneResult:
        return scene_result_from_payload(self.result_payload(job_id), shape_kji)

    def download(self, path: str) -> bytes:
        """The bytes at a path the service named (e.g. a job's DICOM object)."""
        return self._request("GET", path, timeout=max(self.timeout, 120)).content


def decode_crop(mask: dict) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(mask["data"]))
    return np.frombuffer(raw, np.uint8).reshape(mask["shape"])


def scene_result_from_payload(payload: dict, shape_kji: tuple[int, int, int]) -> SceneResult:
    """The service's result JSON -> what the scene writers need (checks that the masks fit the volume)."""
    expected = list(payload.get("labelmap", {}).get("shape", shape_kji))
    if list(shape_kji) != expected:
        raise BackendError(f"the result is for a volume of shape {expected}, not {list(shape_kji)}")
    segments = []
    for segment in payload.get("segments", []):
        mask = segment.get("mask")
        if not mask:
            continue
        segments.append(SegmentMask(
            label=int(segment["label"]), name=segment["name"], color=tuple(c / 255.0 for c in segment["color"]),
            offset_kji=tuple(mask["offset"]), crop=decode_crop(mask) > 0, measurements=segment.get("measurements", {}),
            laterality=segment.get("laterality"), key_slice=segment.get("key_slice")))
    report = payload.get("report") or {}
    answer = (payload.get("answer") or {}).get("text", "")
    return SceneResult(task=payload.get("task", ""), prompt=payload.get("prompt", ""), segments=segments,
                       findings=payload.get("findings", []), boxes=payload.get("boxes", []),
                       report_findings=report.get("findings", "") or "", report_impression=report.get("impression", "") or "",
                       answer=answer or "", problems=payload.get("problems", []),
                       random_weights=bool(payload.get("random_weights")), dicom=payload.get("dicom"))
