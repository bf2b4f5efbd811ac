"""Where requests go: a backend's URL, token and (for the module's own local backend) its handover folder.

Standard library only: the HTTP courier child process imports this too.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlparse


class BackendError(Exception):
    """The backend could not be reached, refused the request, or the job failed; the message says which."""


def is_loopback_host(host: str | None) -> bool:
    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def is_loopback(url: str) -> bool:
    return is_loopback_host(urlparse(url).hostname)


def normalise_url(url: str) -> str:
    """Users type 'gpu-server:8000'; an HTTP client needs a scheme (a frequent support question for other tools)."""
    url = (url or "").strip().rstrip("/")
    if not url:
        raise BackendError("no backend URL given")
    if "://" not in url:
        url = "http://" + url
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BackendError(f"{url!r} is not an http(s) URL")
    try:
        parsed.port
    except ValueError:
        raise BackendError(f"{url!r} has an invalid port") from None
    return url


@dataclass(frozen=True)
class Target:
    """One backend. TLS certificates are always verified (a CA bundle may be given; checks cannot be switched off)."""

    url: str
    token: str
    ca_bundle: str | None = None
    handover_dir: str | None = None   # only for the module's own local backend (its ready line names it)

    @classmethod
    def remote(cls, url: str, token: str, ca_bundle: str | None = None) -> "Target":
        return cls(normalise_url(url), (token or "").strip(), ca_bundle or None)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.url)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def __repr__(self) -> str:  # never show the token
        return f"Target({self.url!r}, handover={'yes' if self.handover_dir else 'no'})"
