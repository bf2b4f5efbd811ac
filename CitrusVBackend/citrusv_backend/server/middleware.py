"""Pure ASGI middleware, outermost first: access log + catch-all, bearer auth, request-body limits.

Auth runs before any body is read, so an unauthenticated client cannot make the service buffer an upload.
The body limit answers 413 from Content-Length before reading anything, and counts bytes as they arrive for
bodies without one; a client that stalls mid-body gets 408 after `read_timeout_s`.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import time
import uuid

from .errors import ApiError, error_response, request_id_of
from .logs import log_event

log = logging.getLogger("citrusv.server")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class AccessLog:
    """A request id for every request (the client's X-Request-ID when sane), one JSON log line per request,
    and a JSON 500 for anything unexpected — after which the service keeps serving."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        sent = {"status": None}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id, "path": scope.get("path")}})
            if sent["status"] is None:
                response = error_response(500, "internal_error", f"unexpected server error; the server log has the "
                                          f"details under request id {request_id}", request_id)
                await response(scope, receive, send_with_id)
        finally:
            state = scope["state"]
            log_event(log, "request", request_id=request_id, method=scope.get("method"), path=scope.get("path"),
                      status=sent["status"] or 0, ms=round((time.perf_counter() - started) * 1000, 2),
                      **{key: state[key] for key in ("auth", "job_id", "volume_id") if key in state})


class BearerAuth:
    """`Authorization: Bearer <token>` on every request except the open paths; compared in constant time."""

    def __init__(self, app, token: str, open_paths: tuple[str, ...] = ("/healthz",)):
        self.app = app
        self.token = token.encode()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        header = _header(scope, b"authorization") or ""
        scheme, _, given = header.partition(" ")
        problem = None
        if scheme.lower() != "bearer" or not given.strip():
            problem = "missing"
        elif not secrets.compare_digest(given.strip().encode("latin-1"), self.token):
            problem = "wrong"
        if problem is None:
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["auth"] = problem  # logged as such: the given value never is
        message = ("a bearer token is required: send 'Authorization: Bearer <token>' (the token is in the file "
                   "named by the server's ready line, or the one it was started with)" if problem == "missing"
                   else "the bearer token is wrong")
        response = error_response(401, "unauthorized", message, request_id_of(scope),
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class LoopbackOpenAccess:
    """The reference-compatible launch: no token (ms-swift's deploy without --api_key takes any Authorization
    header, or none), so the socket is loopback-only and every request must name a loopback host — a web page
    that rebinds its own domain to 127.0.0.1 still sends its own name in Host and is refused."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _host_name(_header(scope, b"host") or "")
        if host != "localhost" and not _is_loopback_address(host):
            scope.setdefault("state", {})["auth"] = "foreign_host"
            response = error_response(403, "forbidden", "this reference-compatible server answers only requests "
                                      "addressed to localhost or a loopback address", request_id_of(scope))
            return await response(scope, receive, send)
        scope.setdefault("state", {})["auth"] = "open"
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback_address(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """At most `limit_for(path)` bytes of request body; an idle body read fails after `read_timeout_s`."""

    def __init__(self, app, limit_for, read_timeout_s: float):
        self.app = app
        self.limit_for = limit_for
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            response = error_response(413, "too_large", _too_large(int(declared), limit), request_id_of(scope))
            return await response(scope, receive, send)
        received = 0
        body_done = False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:
                return await receive()  # after the body only a disconnect can come: no timeout on that wait
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body stalled: nothing arrived for {self.read_timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, _too_large(received, limit, partial=True))
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(size: int, limit: int, partial: bool = False) -> str:
    amount = f"more than {limit:,}" if partial else f"{size:,}"
    return (f"the request body is {amount} bytes; this endpoint accepts at most {limit:,} bytes (the server's "
            f"--max-upload-mb limits volume uploads; compress the voxels or crop the volume)")
