"""`citrusv serve`: token, socket, model, then uvicorn — and one JSON "ready" line on stdout when it is up, or,
when it cannot start, one JSON "failed" line (`errors.failure_event`: a reason a launcher acts on, and the message).

Order matters: the host and token are checked first (a refused configuration fails at once), the port is
bound (reserved, so a taken port fails before a 17 GB model load) but listens only after the model has
loaded, so a launcher that sees the ready line — or can connect at all — finds the service ready.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import uvicorn

from ..errors import CitrusVError, PortInUseError, failure_event
from ..model.processor import IMAGE_FACTOR, QWEN_MAX_PIXELS
from ..signals import SIGNAL_EXIT, STOP_SIGNALS, SignalExit, exit_on_signals
from .app import MiB, ServiceConfig, ServiceState, create_app
from .connections import guarded_protocol
from .local_images import allowed_folders
from .logs import capture_stderr, configure_logging, log_event
from .raw_upload import ready_fields

log = logging.getLogger("citrusv.server")

TOKEN_ENV = "CITRUSV_TOKEN"
PIXEL_ENV = ("MIN_PIXELS", "MAX_PIXELS")  # read by ms-swift's deploy too
REFERENCE_PORT = 8000  # the reference deployment's --port, which its demo clients call
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: it travels in an HTTP header


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 0
    token_file: Path | None = None
    config: ServiceConfig = field(default_factory=ServiceConfig)
    reference_compatible: bool = False  # no token, loopback only, port 8000 unless given: the reference's demos run as they are

    @classmethod
    def from_args(cls, args, environ=os.environ) -> "ServeSettings":
        reference = bool(getattr(args, "reference_compatible", False))
        if reference and args.token_file:
            raise CitrusVError("--reference-compatible accepts any bearer token; it takes no --token-file")
        min_pixels, max_pixels = (_pixels(getattr(args, name.lower(), None), name, environ) for name in PIXEL_ENV)
        if min_pixels and max_pixels and min_pixels > max_pixels:
            raise CitrusVError(f"the minimum pixels ({min_pixels}) are more than the maximum ({max_pixels})")
        config = ServiceConfig(served_model_name=args.served_model_name,
                               max_upload_bytes=int(args.max_upload_mb * MiB), max_voxels=args.max_voxels,
                               volume_budget_bytes=int(args.volume_budget_mb * MiB), volume_ttl_s=args.volume_ttl,
                               result_ttl_s=args.result_ttl, request_timeout_s=args.request_timeout,
                               read_timeout_s=args.read_timeout, max_new_tokens=args.max_new_tokens,
                               header_timeout_s=args.header_timeout, max_connections=args.max_connections,
                               min_pixels=min_pixels, max_pixels=max_pixels,
                               local_image_dirs=allowed_folders(getattr(args, "allow_local_images", None) or ()),
                               chat_image_tags=getattr(args, "chat_image_tags", "text"),
                               refine_cache_bytes=int(getattr(args, "refine_cache_mb", 2048) * MiB))
        port = args.port if args.port is not None else (REFERENCE_PORT if reference else 0)
        return cls(host=args.host, port=port, token_file=Path(args.token_file) if args.token_file else None,
                   config=config, reference_compatible=reference)


def _pixels(given: int | None, env_name: str, environ) -> int | None:
    """--min-pixels / --max-pixels, else $MIN_PIXELS / $MAX_PIXELS, checked against qwen_vl_utils' bounds."""
    source = f"--{env_name.lower().replace('_', '-')}"
    if given is None and environ.get(env_name, "").strip():
        source = f"${env_name}"
        try:
            given = int(environ[env_name])
        except ValueError:
            raise CitrusVError(f"${env_name}={environ[env_name]!r} is not a whole number of pixels") from None
    if given is not None and not IMAGE_FACTOR ** 2 <= given <= QWEN_MAX_PIXELS:
        raise CitrusVError(f"{source} {given}: use {IMAGE_FACTOR ** 2} to {QWEN_MAX_PIXELS} pixels")
    return given


@dataclass
class Token:
    value: str
    source: str              # "file", "env" or "generated"
    file: Path | None        # where a launcher can read it (None for "env")

    def __repr__(self) -> str:  # never print the value, not even by accident
        return f"Token(source={self.source!r}, file={self.file!r})"


def resolve_token(token_file: Path | None, environ=os.environ) -> Token:
    """--token-file, else $CITRUSV_TOKEN, else a new random token in a 0600 file of a private folder."""
    if token_file is not None:
        try:
            value = token_file.read_text().strip()
        except OSError as error:
            raise CitrusVError(f"--token-file {token_file}: cannot read it ({error.strerror})") from None
        if token_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the token file can be read by other users; chmod 600 it",
                        extra={"fields": {"token_file": str(token_file)}})
        return Token(_checked(value, f"the token in {token_file}"), "file", token_file)
    if environ.get(TOKEN_ENV):
        return Token(_checked(environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"), "env", None)
    return Token(secrets.token_urlsafe(32), "generated", None)


def _checked(value: str, what: str) -> str:
    if not value or not _TOKEN_CHARS.match(value):
        raise CitrusVError(f"{what} must be printable ASCII without spaces (it is sent as 'Authorization: Bearer ...')")
    if len(value) < 16:
        log.warning("the token is shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 32`)")
    return value


def write_private_token_file(value: str) -> Path:
    """A new folder only this user can enter (mkdtemp: 0700) with the token in a 0600 file."""
    base = os.environ.get("XDG_RUNTIME_DIR") or None
    directory = Path(tempfile.mkdtemp(prefix="citrusv-serve-", dir=base if base and os.path.isdir(base) else None))
    path = directory / "token"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return path


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise CitrusVError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        kind = PortInUseError if error.errno == errno.EADDRINUSE else CitrusVError
        raise kind(f"cannot listen on {host}:{port} ({error.strerror}): another program uses this port; choose "
                   f"another --port, or 0 for any free port (the Slicer module does)"
                   if kind is PortInUseError else
                   f"cannot listen on {host}:{port} ({error.strerror}); choose another --port, or 0 for any "
                   f"free port") from None
    return sock


def serve(settings: ServeSettings, load_engine: Callable[[], object], stdout=None) -> int:
    """Serve until stopped. Any failure before the ready line is also told on stdout as a "failed" line."""
    stdout = stdout or sys.stdout
    configure_logging()
    capture_stderr()
    announced: list[dict] = []
    try:
        return _serve(settings, load_engine, stdout, announced)
    except SignalExit as stopped:
        if not announced:
            _say_failed({"event": "failed", "reason": "cancelled", "message": f"the backend was {stopped} while it "
                         f"was starting"}, stdout)
        raise
    except Exception as error:
        if not announced:
            _say_failed(failure_event(error), stdout)
        raise


def _say_failed(event: dict, stdout) -> None:
    print(json.dumps(event), file=stdout, flush=True)
    log_event(log, "failed", **{("detail" if key == "message" else key): value for key, value in event.items()
                                if key != "event"})


def _serve(settings: ServeSettings, load_engine: Callable[[], object], stdout, announced: list) -> int:
    token = None if settings.reference_compatible else resolve_token(settings.token_file)
    sock = bind_socket(settings.host, settings.port)
    address, port = sock.getsockname()[:2]
    if token is None:
        if not is_loopback(address):
            sock.close()
            raise CitrusVError(f"--reference-compatible accepts any bearer token, so it listens on loopback only, "
                               f"not on {settings.host} ({address}); drop --host or use 127.0.0.1")
        log.warning(OPEN_ACCESS_WARNING, extra={"fields": {"host": address, "port": port}})
    elif not is_loopback(address) and token.source == "generated":
        sock.close()
        raise CitrusVError(f"refusing to listen on {settings.host} ({address}), which is reachable from other machines, "
                           f"with a generated token: pass --token-file FILE or set ${TOKEN_ENV} (and use a firewall)")
    # From the token file to uvicorn's own handlers (and after them), a stop signal raises SignalExit, so the
    # clean-up below runs on every exit path: while the model loads, and in the moments between the load and the
    # server's start (setting up the app), not only while serving.
    with exit_on_signals():
        try:
            if token is not None and token.source == "generated":
                token.file = write_private_token_file(token.value)
            log_event(log, "loading model")
            engine = load_engine()
            state = ServiceState(engine, settings.config, None if token is None else token.value)
            app = create_app(state)
            sock.listen(2048)
            ready = ready_line(state, address, port, token)
            server = ReadyServer(uvicorn_config(app, settings.config),
                                 on_ready=lambda: announced.append(_announce(ready | ready_fields(state), stdout)))
            server.run(sockets=[sock])
            if server.exit_signal is not None:
                log_event(log, "stopped", signal=signal.Signals(server.exit_signal).name)
                return SIGNAL_EXIT[server.exit_signal]
            return 0 if server.started else 1
        finally:
            sock.close()
            if token is not None and token.source == "generated" and token.file is not None:
                shutil.rmtree(token.file.parent, ignore_errors=True)


def uvicorn_config(app, config: ServiceConfig) -> uvicorn.Config:
    """uvicorn with the h11 protocol that bounds header size and time and the number of connections."""
    protocol = guarded_protocol(config.max_header_bytes, config.header_timeout_s, config.max_connections)
    return uvicorn.Config(app, http=protocol, ws="none", h11_max_incomplete_event_size=config.max_header_bytes,
                          log_config=None, access_log=False, server_header=False, timeout_keep_alive=5,
                          timeout_graceful_shutdown=5)


def ready_line(state: ServiceState, address: str, port: int, token: Token | None) -> dict:
    described = state.engine.loaded.describe()
    host = f"[{address}]" if ":" in address else address
    min_pixels, max_pixels = state.config.pixel_budget()
    return {"event": "ready", "host": address, "port": port, "url": f"http://{host}:{port}",
            "token_source": "none" if token is None else token.source,
            "token_file": str(token.file) if token is not None and token.file else None,
            "pixel_budget": {"min_pixels": min_pixels, "max_pixels": max_pixels} if max_pixels else "per task",
            "model": state.model_name, **{key: described[key] for key in ("checkpoint", "device", "dtype", "random_weights")},
            "pid": os.getpid()}


OPEN_ACCESS_WARNING = (
    "REFERENCE-COMPATIBLE MODE: NO AUTHENTICATION. Any program of any user on this machine can use this server "
    "and read what it answers. It listens on loopback only and answers only requests addressed to localhost. "
    "Use it to run the reference's demo clients; never for patient data on a shared machine.")


def _announce(ready: dict, stdout) -> dict:
    print(json.dumps(ready), file=stdout, flush=True)
    log_event(log, "ready", **{k: v for k, v in ready.items() if k != "event"})
    return ready


class ReadyServer(uvicorn.Server):
    """uvicorn's server, calling `on_ready` once it accepts connections. A stop signal shuts it down gracefully
    and is remembered (`exit_signal`) instead of being raised again at the end as uvicorn does: that would kill
    the process before `serve` removes its token folder."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]):
        super().__init__(config)
        self.on_ready = on_ready
        self.exit_signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.signal(number, self.handle_exit) for number in STOP_SIGNALS}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def handle_exit(self, sig, frame) -> None:
        self.exit_signal = self.exit_signal or sig
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_ready()
