"""Header abuse by clients that never authenticate, with real sockets against the real server process: a header
bomb, connections whose headers never finish (or trickle in), and more connections than the server holds.
The limits server runs with --header-timeout 2 --max-connections 24 (headers: 64 KiB at most)."""
from __future__ import annotations

import select
import socket
import time

import pytest

from service_helpers import reset_peak_memory, server_memory

pytestmark = pytest.mark.service

MiB = 2**20
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 24


def _connect(server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((server.ready["host"], server.ready["port"]), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_header_bomb_is_cut_off_early_without_buffering_it(limits_server):
    """64 MiB of one header line (no token): the server answers 431 after its 64 KiB and stops reading,
    instead of buffering the whole header for the 401."""
    reset_peak_memory(limits_server)
    before = server_memory(limits_server)["rss"]
    sent = 0
    with _connect(limits_server) as sock:
        sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bomb: ")
        block = b"A" * MiB
        try:
            while sent < 64 * MiB:
                sock.sendall(block)
                sent += len(block)
            sock.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_all(sock)
    grown = server_memory(limits_server)["peak"] - before
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert b"headers_too_large" in reply
    assert sent < 16 * MiB, f"the server read {sent / MiB:.0f} MiB of one header before refusing it"
    assert grown < 32 * MiB, f"the server's peak memory grew by {grown / MiB:.0f} MiB"


def test_headers_that_never_finish_or_trickle_are_dropped(limits_server):
    """20 connections send half a request and stop; one sends a header byte every 0.2 s. All are answered
    408 and closed once the header timeout (2 s) has passed, not held."""
    started = time.monotonic()
    silent = []
    for _ in range(20):
        sock = _connect(limits_server)
        sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        silent.append(sock)
    trickler = _connect(limits_server)
    trickler.sendall(b"GET /v1/info HTTP/1.1\r\nX-Slow: ")
    try:
        while time.monotonic() - started < HEADER_TIMEOUT + 3:
            try:
                trickler.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.2)
        closed_after = time.monotonic() - started
        for sock in silent + [trickler]:
            sock.settimeout(HEADER_TIMEOUT + 5)
            reply = _read_all(sock)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - started < 2 * HEADER_TIMEOUT + 6
        assert closed_after < HEADER_TIMEOUT + 3, "the trickling client was never cut off"
    finally:
        for sock in silent + [trickler]:
            sock.close()


def test_connections_beyond_the_limit_are_refused_at_once(limits_server):
    """More idle connections than --max-connections: the extra ones get 503 and are closed at once; the
    server serves again as soon as the idle ones have timed out."""
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS + 6):
            sock = _connect(limits_server)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # headers never finished: each holds a connection
            sockets.append(sock)
        # Each connection is answered once: 503 (over the limit) or, after the header timeout, 408. Counted by
        # the answer, not by how fast it came (a loaded machine may take seconds to accept them all).
        refused, answered, deadline = [], [], time.monotonic() + 60
        while len(refused) < 6 and len(answered) < len(sockets) and time.monotonic() < deadline:
            waiting = [sock for sock in sockets if sock not in answered]
            readable, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
            for sock in readable:
                answered.append(sock)
                if _read_all(sock).startswith(b"HTTP/1.1 503"):
                    refused.append(sock)
        assert len(refused) >= 6, f"{len(refused)} of {len(sockets)} connections refused"
        assert len(sockets) - len(refused) <= MAX_CONNECTIONS
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + HEADER_TIMEOUT + 10
    while True:
        with _connect(limits_server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            reply = _read_all(sock)
        if reply.startswith(b"HTTP/1.1 200"):
            break
        assert time.monotonic() < deadline, reply[:200]
        time.sleep(0.2)


def _one_response(sock: socket.socket) -> bytes:
    """One HTTP response (headers and Content-Length body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_ordinary_requests_and_keep_alive_are_untouched(limits_server):
    """A kept-alive connection idle for less than the keep-alive time, then used again, is served."""
    with _connect(limits_server) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            reply = _one_response(sock)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'"worker_alive":true}'), reply[:300]
            time.sleep(HEADER_TIMEOUT + 0.5)  # longer than the header timeout, shorter than keep-alive (5 s)
