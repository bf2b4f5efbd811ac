"""The HTTP courier: a child process that makes the module's HTTP requests, so Slicer's main thread never does.

Why a process: PythonQt never releases the GIL while Qt's event loop runs, so Python threads inside Slicer advance
only while the main thread runs Python (a worker polled by a 200 ms timer gets a few iterations per second), and
blocking calls on the main thread freeze the UI. This process runs Slicer's own Python with Slicer's environment
(the only child that keeps it) and nothing else; transport.py is its other half, on the main thread.

Protocol (one JSON object per line):
  stdin  <- {"id": N, "method", "url", "headers": {...}, "json": ... | "body_file": PATH, "compress": "gzip"|null,
             "response_file": PATH|null, "timeout": S, "ca_bundle": PATH|null}      one request
            {"cancel": N}                                                             abort request N
  stdout -> {"id": N, "event": "progress", "sent": BYTES, "total": BYTES}             body upload progress
            {"id": N, "event": "response", "status": S, "body_b64": BASE64}         the body inline, or
            {"id": N, "event": "response", "status": S, "body_file": PATH, "bytes": B} in the file the caller named
            {"id": N, "event": "error", "kind": "connect"|"timeout"|"tls"|"cancelled"|"other", "message": TEXT}
End of stdin (the module closed it, or Slicer exited or crashed) ends the courier.

Requests run concurrently (a thread each; connections are kept alive and reused per host). Bodies are sent in
large blocks (`socket.sendfile` where possible, so a file goes from the page cache to the socket without a copy
here) and responses read whole. Proxies (HTTP(S)_PROXY, NO_PROXY, the system settings) are used for remote hosts
and never for loopback. Standard library only.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import sys
import threading
import time
import urllib.request
import zlib
from urllib.parse import unquote, urlsplit

from .endpoints import is_loopback_host

BLOCK = 8 * 1024 * 1024        # upload block (progress and cancel are checked between blocks)
IDLE_S = 2.0                   # a kept-alive connection idle longer is dropped (servers close theirs after ~5 s)
IDEMPOTENT = ("GET", "HEAD", "DELETE", "OPTIONS")


class Cancelled(Exception):
    pass


def proxy_for(url: str) -> str | None:
    """The proxy to reach `url` through, or None: never for loopback, else as the environment / OS say."""
    parts = urlsplit(url)
    if is_loopback_host(parts.hostname):
        return None
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme) or None


class Connections:
    """Kept-alive connections per (scheme, host, port, proxy, CA bundle), one request at a time on each."""

    def __init__(self):
        self._idle: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def take(self, url: str, timeout: float, ca_bundle: str | None, fresh: bool = False):
        """(key, connection, reused)."""
        parts = urlsplit(url)
        proxy = proxy_for(url)
        key = (parts.scheme, parts.hostname, parts.port, proxy, ca_bundle)
        with self._lock:
            idle = self._idle.get(key) or []
            while idle and not fresh:
                connection, since = idle.pop()
                if time.monotonic() - since > IDLE_S or connection.sock is None:
                    connection.close()
                    continue
                connection.timeout = timeout
                connection.sock.settimeout(timeout)
                return key, connection, True
        return key, _open(parts, proxy, timeout, ca_bundle), False

    def give_back(self, key: tuple, connection) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append((connection, time.monotonic()))


def _open(parts, proxy: str | None, timeout: float, ca_bundle: str | None):
    host, port = parts.hostname, parts.port
    context = ssl.create_default_context(cafile=ca_bundle) if parts.scheme == "https" else None
    if proxy is None:
        if context is not None:
            return http.client.HTTPSConnection(host, port or 443, timeout=timeout, context=context)
        return http.client.HTTPConnection(host, port or 80, timeout=timeout)
    proxy_parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    auth = {}
    if proxy_parts.username:
        credentials = f"{unquote(proxy_parts.username)}:{unquote(proxy_parts.password or '')}".encode()
        auth = {"Proxy-Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}
    if context is not None:  # CONNECT tunnel through the proxy, TLS end to end
        connection = http.client.HTTPSConnection(proxy_parts.hostname, proxy_parts.port or 8080, timeout=timeout,
                                                 context=context)
        connection.set_tunnel(host, port or 443, headers=auth)
        return connection
    connection = http.client.HTTPConnection(proxy_parts.hostname, proxy_parts.port or 8080, timeout=timeout)
    connection.absolute_form = True  # plain HTTP through a proxy: the request target is the whole URL
    connection.proxy_headers = auth
    return connection


class Courier:
    def __init__(self, out=None):
        self.out = out or sys.stdout
        self._write_lock = threading.Lock()
        self._cancelled: dict[int, threading.Event] = {}
        self._active: dict[int, object] = {}
        self.connections = Connections()

    def emit(self, event: dict) -> None:
        line = json.dumps(event)
        with self._write_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def handle_line(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if "cancel" in message:
            self.cancel(int(message["cancel"]))
            return
        number = int(message["id"])
        self._cancelled[number] = threading.Event()
        threading.Thread(target=self._run, args=(number, message), name=f"courier-{number}", daemon=True).start()

    def cancel(self, number: int) -> None:
        flag = self._cancelled.get(number)
        if flag is not None:
            flag.set()
        connection = self._active.get(number)
        if connection is not None and getattr(connection, "sock", None) is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on the socket
            except OSError:
                pass

    def _run(self, number: int, request: dict) -> None:
        cancel = self._cancelled[number]
        try:
            event = self._exchange(number, request, cancel)
            if cancel.is_set():
                raise Cancelled()
            self.emit(event)
        except Cancelled:
            self.emit({"id": number, "event": "error", "kind": "cancelled", "message": "cancelled"})
        except ssl.SSLError as error:
            self.emit({"id": number, "event": "error", "kind": "tls", "message": str(error)})
        except (socket.timeout, TimeoutError):
            self.emit({"id": number, "event": "error", "kind": "timeout", "message": "no answer in time"})
        except (ConnectionError, OSError, http.client.HTTPException) as error:
            kind = "cancelled" if cancel.is_set() else "connect"
            self.emit({"id": number, "event": "error", "kind": kind, "message": f"{type(error).__name__}: {error}"})
        except Exception as error:  # never let one request take the courier down
            self.emit({"id": number, "event": "error", "kind": "other", "message": f"{type(error).__name__}: {error}"})
        finally:
            self._cancelled.pop(number, None)
            self._active.pop(number, None)

    def _exchange(self, number: int, request: dict, cancel: threading.Event, fresh: bool = False) -> dict:
        url = request["url"]
        timeout = float(request.get("timeout") or 30)
        key, connection, reused = self.connections.take(url, timeout, request.get("ca_bundle"), fresh)
        self._active[number] = connection
        reusable = False
        try:
            try:
                response = self._send(number, connection, request, cancel)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server had just closed: the request never arrived. Only requests that
                # may be repeated are sent again, on a new connection.
                if not reused or cancel.is_set() or request.get("method", "GET") not in IDEMPOTENT:
                    raise
                connection.close()
                return self._exchange(number, request, cancel, fresh=True)
            event = self._receive(number, response, request.get("response_file"), cancel)
            reusable = not response.will_close
            return event
        finally:
            if reusable and not cancel.is_set():
                self.connections.give_back(key, connection)
            else:
                connection.close()

    def _send(self, number: int, connection, request: dict, cancel: threading.Event):
        parts = urlsplit(request["url"])
        target = request["url"] if getattr(connection, "absolute_form", False) else \
            (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = dict(request.get("headers") or {})
        headers.update(getattr(connection, "proxy_headers", {}))
        body_file = request.get("body_file")
        payload = None
        if "json" in request:
            payload = json.dumps(request["json"]).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        compress = request.get("compress")
        if body_file and compress:
            headers["Content-Encoding"] = compress
            headers["Transfer-Encoding"] = "chunked"
        elif body_file:
            headers["Content-Length"] = str(os.path.getsize(body_file))
        else:
            headers["Content-Length"] = str(len(payload or b""))
        connection.putrequest(request.get("method", "GET"), target, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        if cancel.is_set():  # cancelled before the socket existed: cancel() could not shut it down
            raise Cancelled()
        if body_file:
            self._send_file(number, connection, body_file, compress, cancel)
        elif payload:
            connection.send(payload)
        return connection.getresponse()

    def _send_file(self, number: int, connection, path: str, compress: str | None, cancel: threading.Event) -> None:
        total = os.path.getsize(path)
        sent = 0
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31 if compress == "gzip" else 15) if compress else None
        plain_socket = compressor is None and not isinstance(connection.sock, ssl.SSLSocket) and \
            hasattr(connection.sock, "sendfile")
        with open(path, "rb") as handle:
            while sent < total:
                if cancel.is_set():
                    raise Cancelled()
                if plain_socket:  # page cache -> socket, no copy through this process
                    count = connection.sock.sendfile(handle, offset=sent, count=min(BLOCK, total - sent))
                    if count == 0:
                        raise ConnectionError("the connection closed during the upload")
                else:
                    block = handle.read(BLOCK)
                    if not block:
                        raise ConnectionError(f"{path} became shorter during the upload")
                    count = len(block)
                    if compressor is not None:
                        _send_chunk(connection, compressor.compress(block))
                    else:
                        connection.sock.sendall(block)
                sent += count
                self.emit({"id": number, "event": "progress", "sent": sent, "total": total})
        if compressor is not None:
            _send_chunk(connection, compressor.flush())
            connection.sock.sendall(b"0\r\n\r\n")

    @staticmethod
    def _receive(number: int, response, response_file: str | None, cancel: threading.Event) -> dict:
        """The response as an event. With a file from the caller the body is streamed into it through one reused
        buffer, in large reads, never held whole here; otherwise it travels inline, base64 (bytes stay bytes)."""
        if response_file:
            buffer = bytearray(BLOCK)
            view = memoryview(buffer)
            total = 0
            with open(response_file, "wb") as handle:
                while True:
                    if cancel.is_set():
                        raise Cancelled()
                    count = response.readinto(view)
                    if not count:
                        break
                    handle.write(view[:count])
                    total += count
            return {"id": number, "event": "response", "status": response.status, "body_file": response_file,
                    "bytes": total}
        body = response.read()
        return {"id": number, "event": "response", "status": response.status,
                "body_b64": base64.b64encode(body).decode("ascii")}


def _send_chunk(connection, data: bytes) -> None:
    if data:  # an empty chunk would end the body
        connection.sock.sendall(b"%x\r\n" % len(data) + data + b"\r\n")


def main() -> None:
    courier = Courier()
    courier.emit({"event": "started", "pid": os.getpid(), "python": sys.version.split()[0]})
    for line in sys.stdin:
        if line.strip():
            courier.handle_line(line)
    for number in list(courier._cancelled):  # stdin closed: the module is gone or done with us
        courier.cancel(number)


if __name__ == "__main__":
    main()
