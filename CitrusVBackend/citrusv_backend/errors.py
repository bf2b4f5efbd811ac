"""Errors a user can act on. Every message says what was wrong and what to do about it."""


class CitrusVError(Exception):
    """Base class: an expected failure with a message meant for the user (no traceback needed)."""


class CheckpointError(CitrusVError):
    """The model weights or their configuration cannot be used."""


class InputError(CitrusVError):
    """An image, volume, prompt or option given by the user is not usable."""


class JobCancelled(CitrusVError):
    """The caller cancelled the work (a user, a signal, a client that hung up); nothing of it is kept."""


class DependencyError(CitrusVError):
    """A required package is missing or unusable in this environment."""


class TooLargeError(InputError):
    """A volume or request beyond a configured size limit (the service answers 413)."""
