"""One Apply as a state machine on the main thread: upload the voxels (upload.py), submit the job, follow it, fetch
and decode the result.

Every step is short and non-blocking: the panel's timer calls `poll()`, which does a little work (a time-boxed
block of the voxel file, a look at the courier's answers, a block of mask inflating) and returns how soon it wants
to be called again (0 while there is local work, a few milliseconds while an answer is due, the polling interval
while the job runs). HTTP goes through transport.py; nothing here waits, sleeps or uses threads. The runner never
touches MRML or Qt: `events()` hands progress and the result to the caller.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .client import ResultDecoder
from .endpoints import BackendError
from .results import SceneResult
from .transport import Call
from .upload import ANSWER_WAIT_SECONDS, VolumeUpload

POLL_SECONDS = 0.3
CANCEL_WAIT_SECONDS = 10.0


@dataclass
class Event:
    kind: str                 # "progress" | "done" | "error" | "cancelled"
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    result: SceneResult | None = None
    written: dict | None = None   # the nodes a scene Apply wrote (apply.py)


class ApplyRunner:
    """Runs one task on one volume; `state` is idle / running / cancelling / done / failed / cancelled."""

    def __init__(self, upload: VolumeUpload, task: str, prompt: str, options: dict | None = None,
                 volume_id: str | None = None):
        # The upload says what is sent where (backend, voxels, geometry, DICOM reference); it runs only when there
        # is no `volume_id` to reuse, or when the backend has lost that volume.
        self.upload = upload
        self.transport = upload.transport
        self.target = upload.target
        self.task = task
        self.prompt = prompt
        self.options = options or {}
        self.volume_id = volume_id               # reuse an upload of the same volume
        self.on_uploaded = lambda volume_id: None  # lets the caller remember the upload
        self.job_id: str | None = None
        self.state = "idle"
        self.stage = "idle"
        self._events: list[Event] = []
        self._call: Call | None = None
        self._decoder: ResultDecoder | None = None
        self.payload: dict | None = None         # the job's result as it came, once fetched
        self._reused = volume_id is not None
        self._next_poll = 0.0
        self._cancel_sent_at: float | None = None
        self.started = self.finished = None

    # ------------------------------------------------------------------------------------------ interface

    def start(self) -> None:
        self.state = "running"
        self.started = time.monotonic()
        if self.volume_id is not None:
            self._submit()
        else:
            self._begin_upload()

    def cancel(self) -> None:
        if self.state != "running":
            return
        self.state = "cancelling"
        if self.job_id is None:  # nothing on the server yet: stop right here
            self._finish_cancelled()

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    @property
    def active(self) -> bool:
        return self.state in ("running", "cancelling")

    def poll(self) -> float:
        """Advance; returns the seconds until the next call is useful."""
        if not self.active:
            return 1.0
        self.transport.poll()
        if not self.active:  # a completed call may have finished us
            return 1.0
        try:
            return self._advance()
        except BackendError as error:
            self._fail(str(error))
        except Exception as error:  # a bug must still bring the panel back to idle, with the reason shown
            self._fail(f"{type(error).__name__}: {error}")
        return 1.0

    # ------------------------------------------------------------------------------------------ stages

    def _advance(self) -> float:
        if self.stage == "upload":
            return self.upload.poll()
        if self.stage == "decode":
            result = self._decoder.step()
            if result is not None:
                self.state = self.stage = "done"
                self.finished = time.monotonic()
                self._events.append(Event("done", result=result))
                return 1.0
            return 0.0
        if self.stage == "follow" and self._call is None and time.monotonic() >= self._next_poll:
            self._poll_job()
        if self._call is not None:
            return ANSWER_WAIT_SECONDS
        return max(0.0, self._next_poll - time.monotonic())

    def _begin_upload(self) -> None:
        self.upload.on_progress = lambda fraction, message: self._progress("upload", fraction, message)
        self.upload.on_done = self._uploaded
        self.stage = "upload"
        self.upload.start()

    def _uploaded(self, volume_id: str | None, error: str | None) -> None:
        if not self.active:
            return
        if error is not None:
            return self._fail(error)
        self.volume_id = volume_id
        self.on_uploaded(volume_id)
        if self.state == "cancelling":
            return self._finish_cancelled()
        self._submit()

    def _submit(self) -> None:
        self.stage = "submit"
        body = {"volume_id": self.volume_id, "task": self.task, "prompt": self.prompt, "options": self.options}
        self._call = self.transport.request(self.target, "POST", "/v1/jobs", json_body=body, on_done=self._submitted)

    def _submitted(self, call: Call) -> None:
        self._call = None
        if not self.active:
            return
        if not call.ok and self._reused and call.status == 404:
            # The backend evicted (or restarted and lost) our earlier upload: send the volume again.
            self._reused = False
            self.volume_id = None
            return self._begin_upload()
        if call.error:
            return self._fail(str(call.error))
        self.job_id = call.json()["job_id"]
        if self.state == "cancelling":
            self._send_cancel()
        self.stage = "follow"
        self._next_poll = time.monotonic()

    def _poll_job(self) -> None:
        if self.state == "cancelling" and self._cancel_sent_at is None:
            self._send_cancel()
        self._call = self.transport.request(self.target, "GET", f"/v1/jobs/{self.job_id}", on_done=self._job_status)

    def _send_cancel(self) -> None:
        self._cancel_sent_at = time.monotonic()
        self.transport.request(self.target, "DELETE", f"/v1/jobs/{self.job_id}")

    def _job_status(self, call: Call) -> None:
        self._call = None
        if not self.active:
            return
        if call.error:
            return self._fail(str(call.error))
        job = call.json()
        status = job.get("status")
        progress = job.get("progress") or {}
        if status in ("queued", "running"):
            if self.state == "cancelling" and self._cancel_sent_at is not None and \
                    time.monotonic() - self._cancel_sent_at > CANCEL_WAIT_SECONDS:
                return self._finish_cancelled("the backend did not confirm in time; it will stop the job later")
            self._progress(progress.get("stage", status), float(progress.get("fraction") or 0.0),
                           progress.get("message", ""))
            self._next_poll = time.monotonic() + POLL_SECONDS
        elif status == "done":
            self.stage = "result"
            self._call = self.transport.request(self.target, "GET", f"/v1/jobs/{self.job_id}/result", timeout=120,
                                                large_response=True, on_done=self._result)
        elif status == "cancelled":
            self._finish_cancelled()
        else:
            self._fail((job.get("error") or {}).get("message", f"job {status}"))

    def _result(self, call: Call) -> None:
        self._call = None
        if not self.active:
            return
        if call.error:
            return self._fail(str(call.error))
        try:
            self.payload = json.loads(call.body())
        except ValueError:
            return self._fail(f"the result of job {self.job_id} is not JSON")
        self._decoder = ResultDecoder(self.payload, self.upload.voxels.shape)
        self.stage = "decode"

    # ------------------------------------------------------------------------------------------ endings

    def _progress(self, stage: str, fraction: float, message: str) -> None:
        self._events.append(Event("progress", stage=stage, fraction=fraction, message=message))

    def _fail(self, message: str) -> None:
        self._cleanup()
        self.state = self.stage = "failed"
        self.finished = time.monotonic()
        self._events.append(Event("error", message=message))

    def _finish_cancelled(self, message: str = "cancelled") -> None:
        self._cleanup()
        self.state = self.stage = "cancelled"
        self.finished = time.monotonic()
        self._events.append(Event("cancelled", message=message))

    def _cleanup(self) -> None:
        self.upload.cancel()   # nothing to do unless it is running
        if self._call is not None:
            self._call.cancel()
            self._call = None
