"""One volume sent to a backend without blocking: the module's only upload path (Apply and Refine both use it).

The voxels are written to a file in time-boxed steps (handover.py: into the local backend's handover folder, which
the server maps, or into the courier's work folder, which the courier streams as the raw body, gzip-compressed for
a remote server), POSTed as `application/octet-stream` with the geometry in the header, and, when the volume came
from Slicer's DICOM database, its series reference attached with PUT /v1/volumes/{id}/dicom. `poll()` (from the
panel's timer) writes the next block; the answers arrive through `Transport.poll()`. No threads, no waiting, no
MRML: `on_progress(fraction, message)` while it runs, then `on_done(volume_id, error)` once (one of them None).
UploadCache remembers what was sent, so Apply, refinement, conversations and export send each volume once.
"""
from __future__ import annotations

from pathlib import Path

from .client import upload_headers, uploadable
from .endpoints import BackendError, Target
from .handover import VolumeFileWriter
from .transport import Call, Transport

ANSWER_WAIT_SECONDS = 0.005
UPLOAD_TIMEOUT_SECONDS = 600.0


class VolumeUpload:
    """`state`: idle / writing / sending / describing / done / failed / cancelled."""

    def __init__(self, transport: Transport, target: Target, voxels, ijk_to_ras, name: str,
                 dicom_reference: dict | None = None, source_changed=None):
        self.transport = transport
        self.target = target
        self.voxels = uploadable(voxels)
        self.ijk_to_ras = ijk_to_ras
        self.name = name
        self.dicom_reference = dicom_reference
        self.source_changed = source_changed     # () -> bool: the volume was modified while it was being written
        self.on_progress = lambda fraction, message: None
        self.on_done = lambda volume_id, error: None
        self.state = "idle"
        self.volume_id: str | None = None
        self.error: str | None = None
        self._writer: VolumeFileWriter | None = None
        self._call: Call | None = None

    @property
    def active(self) -> bool:
        return self.state in ("writing", "sending", "describing")

    def start(self) -> None:
        folder = self.target.handover_dir or self.transport.work_dir
        self._writer = VolumeFileWriter(self.voxels, Path(folder))
        self.state = "writing"
        self.volume_id = self.error = None   # started again when the backend lost the volume
        self.on_progress(0.0, f"sending {self.name} to the backend")

    def poll(self) -> float:
        """Write the next block (or send once written); seconds until the next call is useful."""
        if self.state != "writing":
            return ANSWER_WAIT_SECONDS if self.active else 1.0
        if not self._writer.step():
            self.on_progress(0.5 * self._writer.fraction, f"writing {self.name} for the backend")
            return 0.0
        if self.source_changed is not None and self.source_changed():
            return self._end("failed", error="the volume changed while it was being sent; press Apply again")
        self._send()
        return ANSWER_WAIT_SECONDS

    def cancel(self) -> None:
        if self.active:
            self._end("cancelled", error="cancelled")

    # ------------------------------------------------------------------------------------------ steps

    def _send(self) -> None:
        handover = self._writer.name if self.target.handover_dir else None
        headers = upload_headers(self.voxels, self.ijk_to_ras, self.name, handover=handover, dicom=self.dicom_reference)
        body = None if handover else str(self._writer.path)
        # Compressing pays over a network, not on this machine (it costs more than the copy it saves).
        compress = None if handover or self.target.loopback else "gzip"
        self.state = "sending"
        self._call = self.transport.request(self.target, "POST", "/v1/volumes", body_file=body, headers=headers,
                                            compress=compress, timeout=UPLOAD_TIMEOUT_SECONDS, on_done=self._sent)
        self._call.on_progress = lambda call: self.on_progress(
            0.5 + 0.5 * call.sent / max(call.total, 1), f"sending {self.name} to the backend")

    def _sent(self, call: Call) -> None:
        self._call = None
        self._writer.discard()  # taken by the server (handover) or sent: the file is no longer needed
        if self.state != "sending":
            return
        if call.error:
            return self._end("failed", error=str(call.error))
        try:
            self.volume_id = call.json()["volume_id"]
        except (BackendError, KeyError, TypeError) as error:
            return self._end("failed", error=f"the backend's answer to the upload has no volume id ({error})")
        if not self.dicom_reference:
            return self._end("done")
        self.state = "describing"
        self._call = self.transport.request(self.target, "PUT", f"/v1/volumes/{self.volume_id}/dicom",
                                            json_body=self.dicom_reference, on_done=self._described)

    def _described(self, call: Call) -> None:
        self._call = None
        if self.state != "describing":
            return
        if call.error:
            return self._end("failed", error=str(call.error))
        self._end("done")

    def _end(self, state: str, error: str | None = None) -> float:
        if self._writer is not None:
            self._writer.discard()
        if self._call is not None:
            call, self._call = self._call, None
            call.cancel()
        self.state, self.error = state, error
        if state == "done":
            self.on_done(self.volume_id, None)
        elif state == "failed":
            self.on_done(None, error)
        return 1.0


class UploadCache:
    """Volume ids per (backend, volume node, its voxels' modification time, its geometry): one upload per content."""

    def __init__(self):
        self._ids: dict[tuple, str] = {}

    @staticmethod
    def key(target, volume_node, ijk_to_ras, with_dicom: bool = False) -> tuple:
        return (target.url, volume_node.GetID(), volume_node.GetImageData().GetMTime(), ijk_to_ras.tobytes(), with_dicom)

    def get(self, key: tuple) -> str | None:
        return self._ids.get(key)

    def remember(self, key: tuple, volume_id: str) -> None:
        self._ids[key] = volume_id

    def find(self, target, volume_node, ijk_to_ras) -> str | None:
        """An upload of this content with or without its DICOM reference (either serves refinement)."""
        for with_dicom in (True, False):
            known = self.get(self.key(target, volume_node, ijk_to_ras, with_dicom))
            if known is not None:
                return known
        return None

    def forget(self, volume_node) -> None:
        """The backend lost this node's uploads (evicted, restarted): the next use sends the volume again."""
        for key in [k for k in self._ids if k[1] == volume_node.GetID()]:
            del self._ids[key]
