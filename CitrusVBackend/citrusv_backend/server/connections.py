"""HTTP/1.1 connections as the service accepts them, with limits no unauthenticated client can get around.

uvicorn's default parser (httptools) buffers a header of any size before the app (and its bearer check) sees
the request, and nothing ends a connection whose headers never finish. This protocol is uvicorn's h11 one
(pure Python, bounded buffers) with three limits enforced before any request reaches the app:
- a request's headers hold at most `max_header_bytes` (431 beyond, and the connection is closed);
- they must be complete within `header_timeout_s` of the connection opening or, on a kept-alive connection,
  of the next request's first byte (408), so slow or silent clients do not hold connections;
- at most `max_connections` are open at once: one more is answered 503 and closed at once.
"""
from __future__ import annotations

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body

log = logging.getLogger("citrusv.server")


def raw_error(status: int, reason: str, type: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection (for before a request exists)."""
    body = json.dumps(error_body(type, message)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    max_header_bytes = 64 * 1024
    header_timeout_s = 10.0
    max_connections = 256

    def connection_made(self, transport) -> None:
        self._refused = len(self.server_state.connections) >= self.max_connections
        self._header_bytes = 0
        self._header_timer = None
        if self._refused:
            log.warning("connection refused", extra={"fields": {"reason": "too many connections",
                                                                "max_connections": self.max_connections}})
            transport.write(raw_error(503, "Service Unavailable", "too_many_connections",
                                      f"the server holds {self.max_connections} connections, its most "
                                      f"(--max-connections); try again shortly"))
            transport.close()
            return
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc) -> None:
        if self._refused:
            return
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        waiting = self.conn.their_state is h11.IDLE  # before this request's headers are complete
        if waiting:
            self._header_bytes += len(data)
            if self._header_timer is None:
                self._start_header_timer()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.ERROR):
            self._header_bytes = 0
            self._stop_header_timer()

    def send_400_response(self, msg: str) -> None:
        """h11 refuses a header beyond its buffer limit as a protocol error: say what it was."""
        if self._header_bytes <= self.max_header_bytes:
            return super().send_400_response(msg)
        log.warning("request refused", extra={"fields": {"reason": "headers too large",
                                                         "max_header_bytes": self.max_header_bytes}})
        self.transport.write(raw_error(431, "Request Header Fields Too Large", "headers_too_large",
                                       f"the request headers are larger than {self.max_header_bytes:,} bytes"))
        self.transport.close()

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being sent on this connection
        log.warning("request refused", extra={"fields": {"reason": "headers too slow",
                                                         "header_timeout_s": self.header_timeout_s}})
        self.transport.write(raw_error(408, "Request Timeout", "request_timeout",
                                       f"the request headers did not arrive within {self.header_timeout_s:g} s"))
        self.transport.close()


def guarded_protocol(max_header_bytes: int, header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """The protocol class for uvicorn's `http=` setting, with these limits."""
    return type("CitrusVH11Protocol", (GuardedH11Protocol,), {
        "max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s, "max_connections": max_connections})
