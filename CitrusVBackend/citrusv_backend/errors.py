"""Errors a user can act on. Every message says what was wrong and what to do about it.

Each kind names its `reason`: the word a launcher reads from `citrusv serve`'s and `citrusv download`'s
`{"event": "failed", "reason": ..., "message": ...}` line (`failure_event`) to choose what it offers.
"""

FAILURE_REASONS = ("model_missing", "hub_unreachable", "out_of_memory", "cuda_unusable", "bad_checkpoint",
                   "disk_full", "port_in_use", "cancelled", "other")


class CitrusVError(Exception):
    """Base class: an expected failure with a message meant for the user (no traceback needed)."""

    reason = "other"

    def __init__(self, message: str = "", **numbers):
        super().__init__(message)
        self.numbers = numbers  # e.g. needed_gb / available_gb, carried into the failure event


class CheckpointError(CitrusVError):
    """The model weights or their configuration cannot be used."""

    reason = "bad_checkpoint"


class ModelMissingError(CheckpointError):
    """The model is neither a folder here nor in the local Hugging Face cache (and may not be downloaded)."""

    reason = "model_missing"


class HubUnreachableError(CheckpointError):
    """The model hub cannot be reached (offline, a proxy, HF_HUB_OFFLINE)."""

    reason = "hub_unreachable"


class InputError(CitrusVError):
    """An image, volume, prompt or option given by the user is not usable."""


class JobCancelled(CitrusVError):
    """The caller cancelled the work (a user, a signal, a client that hung up); nothing of it is kept."""

    reason = "cancelled"


class DependencyError(CitrusVError):
    """A required package is missing or unusable in this environment."""


class CudaUnusableError(DependencyError):
    """CUDA was asked for (or expected) but torch cannot use it: no driver, a driver older than torch's CUDA."""

    reason = "cuda_unusable"


class NotEnoughMemoryError(CitrusVError):
    """The model does not fit the device's memory (numbers: needed_gb, available_gb)."""

    reason = "out_of_memory"


class DiskFullError(CitrusVError):
    """Not enough free disk space for what is to be written (numbers: needed_gb, available_gb)."""

    reason = "disk_full"


class PortInUseError(CitrusVError):
    """The service's port is taken by another program."""

    reason = "port_in_use"


class TooLargeError(InputError):
    """A volume or request beyond a configured size limit (the service answers 413)."""


def failure_event(error: BaseException) -> dict:
    """The one JSON line a launcher reads when a command fails for a reason it can name."""
    if isinstance(error, CitrusVError):
        return {"event": "failed", "reason": error.reason, "message": str(error), **error.numbers}
    if type(error).__name__ == "OutOfMemoryError":  # torch's, outside the load that names the numbers
        return {"event": "failed", "reason": "out_of_memory", "message": f"out of memory: {error}"}
    return {"event": "failed", "reason": "other", "message": f"{type(error).__name__}: {error}"}
