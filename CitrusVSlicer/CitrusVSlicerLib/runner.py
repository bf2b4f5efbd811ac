"""One Apply in a background thread: upload the volume (once), submit the job, follow it, fetch the result.

The thread only talks HTTP; it never touches MRML or Qt. The panel drains `events()` from a timer on the
main thread and writes the result into the scene there. Cancel asks the backend to stop the job and
returns the runner to idle as soon as the backend confirms (or after a short timeout).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from .client import BackendClient, BackendError
from .process import drain_queue
from .results import SceneResult

POLL_SECONDS = 0.3
CANCEL_WAIT_SECONDS = 10.0


@dataclass
class Event:
    kind: str                 # "progress" | "done" | "error" | "cancelled"
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    result: SceneResult | None = None


class ApplyRunner:
    """Runs one task on one volume; `state` is idle / running / cancelling / done / failed / cancelled."""

    def __init__(self, client: BackendClient, voxels, ijk_to_ras, volume_name: str, task: str, prompt: str,
                 options: dict | None = None, volume_id: str | None = None, dicom_reference: dict | None = None):
        self.client = client
        self.voxels = voxels
        self.ijk_to_ras = ijk_to_ras
        self.volume_name = volume_name
        self.task = task
        self.prompt = prompt
        self.options = options or {}
        self.volume_id = volume_id           # reuse an upload of the same volume
        self.dicom_reference = dicom_reference   # the source DICOM series, sent with the upload
        self.on_uploaded = lambda volume_id: None   # lets the caller remember the upload
        self.job_id: str | None = None
        self.state = "idle"
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.state = "running"
        self._thread = threading.Thread(target=self._run, name="citrusv-apply", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        if self.state == "running":
            self.state = "cancelling"
            self._cancel.set()

    def events(self) -> list[Event]:
        return drain_queue(self._events)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _emit(self, kind: str, **fields) -> None:
        self._events.put(Event(kind, **fields))

    def _run(self) -> None:
        try:
            reused = self.volume_id is not None
            if not reused:
                self._upload()
            if self._cancel.is_set():
                return self._finish_cancelled()
            try:
                self.job_id = self.client.submit_job(self.volume_id, self.task, self.prompt, self.options)
            except BackendError as error:
                if not (reused and "404" in str(error)):
                    raise
                self._upload()  # the backend evicted (or restarted and lost) our earlier upload
                self.job_id = self.client.submit_job(self.volume_id, self.task, self.prompt, self.options)
            self._follow()
        except BackendError as error:
            self.state = "failed"
            self._emit("error", message=str(error))
        except Exception as error:  # a bug or a network failure must still bring the panel back to idle
            self.state = "failed"
            self._emit("error", message=f"{type(error).__name__}: {error}")

    def _upload(self) -> None:
        self._emit("progress", stage="upload", message=f"sending {self.volume_name} to the backend")
        self.volume_id = self.client.upload_volume(self.voxels, self.ijk_to_ras, self.volume_name,
                                                   dicom=self.dicom_reference)
        self.on_uploaded(self.volume_id)

    def _follow(self) -> None:
        cancel_sent_at = None
        while True:
            if self._cancel.is_set() and cancel_sent_at is None:
                self.client.cancel_job(self.job_id)
                cancel_sent_at = time.monotonic()
            job = self.client.job(self.job_id)
            status = job.get("status")
            progress = job.get("progress") or {}
            if status in ("queued", "running"):
                self._emit("progress", stage=progress.get("stage", status), fraction=float(progress.get("fraction") or 0.0),
                           message=progress.get("message", ""))
                if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > CANCEL_WAIT_SECONDS:
                    return self._finish_cancelled("the backend did not confirm in time; it will stop the job later")
                time.sleep(POLL_SECONDS)
                continue
            if status == "done":
                result = self.client.result(self.job_id, self.voxels.shape)
                self.state = "done"
                self._emit("done", result=result)
            elif status == "cancelled":
                self._finish_cancelled()
            else:
                self.state = "failed"
                self._emit("error", message=(job.get("error") or {}).get("message", f"job {status}"))
            return

    def _finish_cancelled(self, message: str = "cancelled") -> None:
        self.state = "cancelled"
        self._emit("cancelled", message=message)
