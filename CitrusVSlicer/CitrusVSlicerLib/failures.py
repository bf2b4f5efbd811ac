"""Why the local backend did not start (or stopped), as the one message the panel shows, with what to do.

`citrusv serve` and `citrusv download` print `{"event": "failed", "reason": REASON, "message": str, ...numbers}` on
stdout for every failure they can name (CONTRACTS.md, issue 22). Each reason maps to the panel's own way out:
Browse… / Download for a missing model, CPU or Remote for a GPU too small, the driver/torch fix for CUDA. A crash
without such a line is explained by its last meaningful log lines; only a backend that had started and then died
is told to press Restart (restarting a start that fails repeats the failure).
"""
from __future__ import annotations

from dataclasses import dataclass

from .logview import meaningful_lines, parse_json_line
from .requirements import gb

FAILED_EVENT = "failed"
REASONS = ("model_missing", "hub_unreachable", "out_of_memory", "cuda_unusable", "bad_checkpoint", "disk_full",
           "port_in_use", "cancelled", "other")


@dataclass
class FailureEvent:
    reason: str
    message: str
    details: dict

    @classmethod
    def from_line(cls, line: str) -> "FailureEvent | None":
        record = parse_json_line(line)
        if record is None or record.get("event") != FAILED_EVENT:
            return None
        reason = str(record.get("reason", "other"))
        details = {k: v for k, v in record.items() if k not in ("event", "reason", "message")}
        return cls(reason if reason in REASONS else "other", str(record.get("message", "")), details)

    def number(self, name: str) -> float | None:
        value = self.details.get(name)
        return float(value) if isinstance(value, (int, float)) else None


def first_sentence(text: str) -> str:
    """The backend's message says what happened first, then its own advice for the command line: the panel shows
    the first part with the panel's own way out (the whole message is in the log pane)."""
    text = text.strip()
    for end in (". ", "; "):
        if end in text:
            return text.split(end, 1)[0]
    return text.rstrip(".")


def _gb(value: float | None) -> str:
    return "?" if value is None else gb(value)


def explain_start_failure(event: FailureEvent, model: str, ram_gb: float | None = None,
                          cpu_ram_needed_gb: float | None = None, downloading: bool = False,
                          device: str = "auto") -> str:
    """The panel's message for a `failed` event of `citrusv serve` (or of `citrusv download`: `downloading`)."""
    said = first_sentence(event.message)
    if event.reason == "model_missing" and downloading:
        return (f"The hub has no model {model} ({said}). Check the Model field (the released model is "
                f"jdh-algo/Citrus-V-8B-v1.0), or choose a folder with the weights with Browse....")
    if event.reason == "cancelled" and downloading:
        return "Download cancelled; what was fetched is kept and Download again continues from there."
    if event.reason == "model_missing":
        return (f"The model is not on this computer: {said}. Press Download to fetch it, or, if you have the "
                f"weights (copied from another machine or a USB drive), choose their folder with Browse....")
    if event.reason == "hub_unreachable":
        return (f"{said}. If you have the weights (copied from another machine "
                f"or a USB drive), choose their folder with Browse...; otherwise check the network or proxy "
                f"(HTTPS_PROXY; a CA bundle for a TLS-inspecting proxy) and press Download.")
    if event.reason == "out_of_memory" and (str(event.details.get("device", device)) == "cpu"):
        needed, available = event.number("needed_gb"), event.number("available_gb")
        memory = f" (the model needs about {_gb(needed)}, {_gb(available)} are available)" \
            if needed is not None or available is not None else ""
        return (f"This computer ran out of memory (RAM) while loading the model on the CPU{memory}. Close other "
                f"programs, or use a Remote server with a GPU.")
    if event.reason == "out_of_memory":
        needed, available = event.number("needed_gb"), event.number("available_gb")
        memory = f" (the model needs about {_gb(needed)}, {_gb(available)} are free on the GPU)" \
            if needed is not None or available is not None else ""
        cpu = ""
        if cpu_ram_needed_gb:
            has = f", this computer has {gb(ram_gb)}" if ram_gb else ""
            fits = "" if not ram_gb or ram_gb >= cpu_ram_needed_gb else " — not enough here"
            cpu = f" (needs about {gb(cpu_ram_needed_gb)} of RAM{has}{fits})"
        return (f"The GPU ran out of memory while loading the model{memory}. Close other programs that use the GPU, "
                f"or choose Device: cpu{cpu} and press Start, or use a Remote server with a larger GPU.")
    if event.reason == "cuda_unusable":
        return (f"PyTorch cannot use the GPU: {said}. The NVIDIA driver is usually older than the CUDA build of "
                f"PyTorch in the backend environment: update the driver (Windows: NVIDIA's Game Ready/Studio driver; "
                f"Linux: your distribution's nvidia-driver package, then reboot), or press Install again so that a "
                f"build the driver supports is chosen. Meanwhile Device: cpu works (slowly).")
    if event.reason == "bad_checkpoint":
        return (f"{model} is not a complete Citrus-V checkpoint ({said}). Choose the folder that holds config.json "
                f"and the *.safetensors files with Browse..., or press Download to fetch it again.")
    if event.reason == "disk_full":
        return f"The disk is full ({said}). Free some space, or choose another weights folder, then try again."
    if event.reason == "port_in_use":
        return f"The backend could not open its port ({said}). Press Start again."
    if event.reason == "cancelled":
        return "Cancelled."
    return f"The backend could not start: {said}."


def explain_crash(lines, returncode: int | None, had_started: bool, log_path=None) -> str:
    """A backend that exited without a `failed` line: its last meaningful log lines."""
    last = "\n".join(meaningful_lines(list(lines))) or "(no output)"
    where = f"\nThe full log: {log_path}" if log_path else ""
    if had_started:
        return f"The backend stopped unexpectedly (exit code {returncode}). Its last messages:\n{last}\n" \
               f"Press Restart to start it again.{where}"
    return f"The backend stopped while starting (exit code {returncode}). Its last messages:\n{last}{where}"


def failure_from_lines(lines) -> FailureEvent | None:
    """The last `failed` event among a process's output lines."""
    found = None
    for line in lines:
        event = FailureEvent.from_line(line)
        if event is not None:
            found = event
    return found
