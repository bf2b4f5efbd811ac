"""What the panel remembers per machine, across Slicer sessions and scenes: kept in Slicer's QSettings.

The parameter node keeps what belongs to a scene (prompt, task, volumes); where the model and the backend live on
this machine belongs to the machine: weights copied from a USB drive are chosen once, not in every session.

The store is anything with QSettings' `value(key, default)` / `setValue(key, value)` (Slicer's `qt.QSettings()`,
PyQt5's in tests, or a dict-backed `MemoryStore`): values are written as strings (the remote URL history as a JSON
list), because QSettings' ini and registry back-ends return types differently per platform.

The remote server's token is NOT kept: QSettings is a plain-text file (or registry key) readable by anything running
as the user, and Slicer offers no secret store. The token lives in the panel for the session only; a user who wants
it kept passes it to `citrusv serve` through a token file and types it once per session.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Protocol

PREFIX = "CitrusV/"
URL_HISTORY_LENGTH = 10
DEVICES = ("auto", "cuda", "cpu")


class SettingsStore(Protocol):
    def value(self, key: str, default=None): ...

    def setValue(self, key: str, value) -> None: ...


class MemoryStore:
    """A dict with QSettings' two methods (scripts and tests without Qt)."""

    def __init__(self):
        self.values: dict = {}

    def value(self, key: str, default=None):
        return self.values.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.values[key] = value


@dataclass
class MachineSettings:
    """One field per setting; the QSettings key is the field's `key` metadata (stable across renames)."""

    model: str = field(default="", metadata={"key": "Model"})                       # hub id or folder; "" = default
    weights_folder: str = field(default="", metadata={"key": "WeightsFolder"})      # where Download puts weights
    device: str = field(default="auto", metadata={"key": "Device"})
    backend_python: str = field(default="", metadata={"key": "BackendPython"})      # a Python 3.10+ to build with
    environment_folder: str = field(default="", metadata={"key": "EnvironmentFolder"})  # "" = the default folder
    ca_bundle: str = field(default="", metadata={"key": "CABundle"})                # an organisation's CA (PEM)
    remote_urls: list = field(default_factory=list, metadata={"key": "RemoteUrls"})  # newest first

    @classmethod
    def load(cls, store: SettingsStore) -> "MachineSettings":
        settings = cls()
        for item in fields(cls):
            raw = store.value(PREFIX + item.metadata["key"], None)
            if raw is None:
                continue
            if item.name == "remote_urls":
                settings.remote_urls = _url_list(raw)
            else:
                setattr(settings, item.name, str(raw))
        if settings.device not in DEVICES:
            settings.device = "auto"
        return settings

    def save(self, store: SettingsStore) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            store.setValue(PREFIX + item.metadata["key"], json.dumps(value) if item.name == "remote_urls"
                           else str(value))

    def remember_url(self, url: str) -> None:
        """Most recent first, no duplicates, at most URL_HISTORY_LENGTH."""
        url = url.strip()
        if url:
            self.remote_urls = [url] + [u for u in self.remote_urls if u != url][:URL_HISTORY_LENGTH - 1]


def _url_list(raw) -> list:
    if isinstance(raw, (list, tuple)):
        return [str(u) for u in raw if str(u).strip()]
    try:
        value = json.loads(str(raw))
    except ValueError:
        return []
    return [str(u) for u in value if str(u).strip()] if isinstance(value, list) else []
