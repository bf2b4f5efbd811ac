"""The panel's Batch section: `citrusv batch` in the backend environment, followed line by line.

The same command as on the command line (one pipeline, one set of outputs, resumable); the panel only starts
it, shows its progress and stops it. Like the backend it runs isolated in Slicer's startup environment and ends
when Slicer does (`--exit-with-parent`: its stdin is a pipe the module holds).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .backend_options import COMMAND_LINE_FLAGS
from .environment import isolated
from .process import StreamingProcess

# The batch command's progress lines carry "done/total" counts, e.g. "[batch] 3/10 done, 1 failed ...".
_COUNTS = re.compile(r"(\d+)\s*/\s*(\d+)")
_FAILED = re.compile(r"(\d+)\s+failed")


@dataclass
class BatchProgress:
    done: int = 0
    failed: int = 0
    total: int = 0
    last_line: str = ""

    def summary(self) -> str:
        if not self.total:
            return self.last_line
        return f"{self.done}/{self.total} cases done, {self.failed} failed — {self.last_line[:120]}"


def batch_command(python: str, input_folder: str, output_folder: str, task: str, prompt: str, model: str,
                  device: str, options: dict) -> list[str]:
    command = isolated(python) + ["-m", "citrusv_backend.cli", "batch", input_folder, "--out", output_folder,
                                  "--task", task, "--model", model, "--device", device, "--exit-with-parent"]
    if prompt.strip():
        command += ["--prompt", prompt]
    for key, flag in COMMAND_LINE_FLAGS.items():
        value = options.get(key)
        if value not in (None, ""):
            command += [flag, "{}:{}".format(*value) if key == "slice_range" else str(value)]
    return command


class BatchRun(StreamingProcess):
    def __init__(self, python: str, input_folder: str, output_folder: str, task: str, prompt: str, model: str,
                 device: str, options: dict, log_dir: Path | None = None):
        if not input_folder or not Path(input_folder).is_dir():
            raise ValueError(f"input folder {input_folder!r} does not exist")
        if not output_folder:
            raise ValueError("choose an output folder")
        if Path(output_folder).resolve() == Path(input_folder).resolve():
            raise ValueError("the output folder must differ from the input folder (inputs are never written)")
        super().__init__(batch_command(python, input_folder, output_folder, task, prompt, model, device, options),
                         name="batch", log_dir=log_dir, graceful="stdin")
        self.input_folder = input_folder
        self.output_folder = output_folder   # kept with the run: the panel needs no parameter node to open it
        self.device = device
        self.progress = BatchProgress()

    def on_line(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        self.progress.last_line = text
        counts = _COUNTS.search(text)
        if counts and ("case" in text.lower() or "batch" in text.lower()):
            self.progress.done, self.progress.total = int(counts.group(1)), int(counts.group(2))
        failed = _FAILED.search(text)
        if failed:
            self.progress.failed = int(failed.group(1))
