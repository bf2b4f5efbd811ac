"""The work on one case, shared by every engine (in-process, a process per GPU, a Ray actor).

`load_case` reads and checksums an input (in I/O worker processes, or in the Ray actor); `CaseProcessor`
runs the volume pipeline on a loaded model and writes the case's files with `write_outputs`, exactly as
`citrusv segment` does. Every expected failure becomes a failed `CaseOutcome` with a message; only a
cancellation (`JobCancelled`) propagates. Nothing in this module imports torch at import time.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import CitrusVError
from ..paths import describe_os_error
from .manifest import sha256_of_input

log = logging.getLogger(__name__)


@dataclass
class CaseTask:
    """One case to run: picklable, so it travels to worker processes and Ray actors."""

    case: str
    path: str
    relative: str
    kind: str
    prompt: str
    skip_digest: str | None = None  # checksum of the done entry that may be kept: equal -> skip the case
    attempts: int = 0
    dicom_out: bool | None = None   # DICOM SEG + SR: None = for DICOM series inputs only
    on_bad_dicom: str = "refuse"    # or "skip" (volume.input.dicom_series)


@dataclass
class LoadedCase:
    task: CaseTask
    digest: str | None = None
    nbytes: int = 0
    volume: object | None = None    # volume.input.io.Volume
    error: str | None = None
    error_type: str | None = None
    read_s: float = 0.0
    skipped: bool = False


@dataclass
class CaseOutcome:
    case: str
    status: str                      # "done", "failed" or "skipped"
    digest: str | None = None
    nbytes: int = 0
    files: dict = field(default_factory=dict)        # kind -> file name inside the case folder
    file_bytes: dict | None = None                   # name -> bytes, when the files come from another machine
    segments: list = field(default_factory=list)
    boxes: int = 0
    timings: dict = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None
    random_weights: bool = False
    worker: str = ""
    attempts: int = 1
    warnings: list = field(default_factory=list)     # what reading the input left out (--on-bad-dicom skip)


def describe_failure(error: BaseException) -> tuple[str, str]:
    """(type, message) a person can act on; out-of-memory named as such."""
    kind = type(error).__name__
    if isinstance(error, CitrusVError):
        return kind, str(error)
    if isinstance(error, OSError) and error.errno is not None:
        return kind, describe_os_error(error)
    if isinstance(error, MemoryError) or kind == "OutOfMemoryError" or "out of memory" in str(error).lower():
        return "OutOfMemory", f"out of memory ({kind}: {str(error).strip()[:300] or 'no details'}); " \
                              f"crop the volume, use --slice-range, or a machine with more memory"
    return kind, f"{kind}: {str(error).strip()[:500]}"


def worker_name(device: str = "") -> str:
    return f"{socket.gethostname()} pid {os.getpid()}" + (f" {device}" if device else "")


def load_case(task: CaseTask, max_voxels: int) -> LoadedCase:
    """Checksum the input; unless it matches `skip_digest`, read it as a 3D volume named after the case."""
    from ..volume.input.io import read_volume
    from ..volume.outputs.dicom_out import check_dicom_possible, wants_dicom

    started = time.perf_counter()
    loaded = LoadedCase(task)
    try:
        loaded.digest, loaded.nbytes = sha256_of_input(Path(task.path))
        if task.skip_digest and task.skip_digest == loaded.digest:
            loaded.skipped = True
            return loaded
        loaded.volume = read_volume(task.path, max_voxels=max_voxels, on_bad_dicom=task.on_bad_dicom)
        loaded.volume.name = task.case
        if wants_dicom(task.dicom_out, loaded.volume):
            check_dicom_possible(loaded.volume)  # before the model runs
    except Exception as error:  # a bad input is a failed case, never a failed batch
        loaded.error_type, loaded.error = describe_failure(error)
    finally:
        loaded.read_s = round(time.perf_counter() - started, 3)
    return loaded


def outcome_without_model(loaded: LoadedCase) -> CaseOutcome | None:
    """The outcome of a case that needs no model: unchanged (skipped) or unreadable (failed); else None."""
    if not (loaded.skipped or loaded.error):
        return None
    return CaseOutcome(loaded.task.case, "skipped" if loaded.skipped else "failed", loaded.digest, loaded.nbytes,
                       timings={"read_s": loaded.read_s}, error=loaded.error, error_type=loaded.error_type,
                       worker=worker_name("reader"))


def summarise_segments(result) -> list[dict]:
    rows = []
    for segment in result.segments:
        m = segment.measurements if segment.found else {"voxel_count": 0}   # not found: never a volume
        rows.append({"label": segment.label, "name": segment.name, "found": segment.found,
                     "reason": segment.reason or None, "voxel_count": m.get("voxel_count"),
                     "volume_ml": m.get("volume_ml"), "long_axis_mm": m.get("long_axis_mm"),
                     "short_axis_mm": m.get("short_axis_mm"), "laterality": segment.laterality,
                     "key_slice": segment.key_slice})
    return rows


class CaseProcessor:
    """One loaded model and its volume pipeline; `process` turns a loaded case into a case folder."""

    def __init__(self, engine, task: str, options, extra: dict | None = None):
        from ..volume.tasks.pipeline import VolumePipeline

        self.engine = engine
        self.task = task
        self.options = options
        self.extra = extra or {}
        self.pipeline = VolumePipeline(engine)
        self.device = str(engine.loaded.device)

    def process(self, loaded: LoadedCase, out_dir: Path, progress: Callable | None = None,
                should_cancel: Callable[[], bool] | None = None) -> CaseOutcome:
        """Run and write into `out_dir`; JobCancelled propagates (the caller discards `out_dir`)."""
        from ..errors import JobCancelled

        outcome = outcome_without_model(loaded)
        if outcome is not None:
            return outcome
        outcome = CaseOutcome(loaded.task.case, "failed", loaded.digest, loaded.nbytes, worker=worker_name(self.device),
                              timings={"read_s": loaded.read_s})
        self.pipeline.progress = progress or (lambda stage, fraction, message: None)
        self.pipeline.should_cancel = should_cancel or (lambda: False)
        try:
            self._run(loaded, out_dir, outcome)
        except JobCancelled:
            raise
        except Exception as error:
            outcome.error_type, outcome.error = describe_failure(error)
            log.debug("case %s failed", loaded.task.case, exc_info=True)
            self._release_memory(outcome.error_type)
        return outcome

    def _run(self, loaded: LoadedCase, out_dir: Path, outcome: CaseOutcome) -> None:
        from ..volume.outputs.dicom_out import dicom_skipped
        from ..volume.outputs.files import write_outputs

        started = time.perf_counter()
        volume, prompt = loaded.volume, loaded.task.prompt
        result = self.pipeline.run(volume, prompt, task=self.task, options=self.options)
        outcome.timings["pipeline_s"] = round(time.perf_counter() - started, 3)
        outcome.warnings = list(volume.dicom.warnings) if volume.dicom is not None else []
        result.problems.extend(f"input: {warning}" for warning in outcome.warnings)
        skipped = dicom_skipped(loaded.task.dicom_out, volume)   # an optional output never blocks the case
        if skipped:
            outcome.warnings.append(skipped)
        started = time.perf_counter()
        files = write_outputs(result, out_dir, extra=self.extra | {"input": loaded.task.relative},
                              dicom=loaded.task.dicom_out)
        outcome.timings["write_s"] = round(time.perf_counter() - started, 3)
        outcome.files = {kind: path.name for kind, path in files.items()}
        outcome.segments = summarise_segments(result)
        outcome.boxes = len(result.boxes)
        outcome.random_weights = result.random_weights
        outcome.status = "done"

    @staticmethod
    def _release_memory(error_type: str) -> None:
        if error_type == "OutOfMemory":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def read_case_files(folder: Path, names: dict) -> dict:
    """The bytes of a case's files, to send them to the machine that writes the results."""
    return {name: (folder / name).read_bytes() for name in names.values()}
