"""Structured logs: one JSON object per line on stderr (requests, jobs, volumes, startup).

Fields passed as `extra={"fields": {...}}` are merged into the line. Nothing here ever receives the token:
the auth middleware logs only whether a token was missing or wrong. Python warnings (numpy's RuntimeWarnings)
are logged as JSON too, and `capture_stderr` turns whatever else reaches the process's stderr — a library's
print, a C++ warning from ITK — into JSON lines, so every line a log reader sees parses.
"""
from __future__ import annotations

import atexit
import faulthandler
import json
import logging
import os
import sys
import threading
import time
import warnings


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": _timestamp(record.created), "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: int = logging.INFO, stream=None) -> None:
    """JSON lines for every logger (ours, uvicorn's, the model loader's), replacing earlier handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("citrusv", "citrusv_backend", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("uvicorn.access").disabled = True  # our access log has the request id and timing
    warnings.showwarning = _log_warning


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("citrusv.warnings").warning(str(message), extra={"fields": {
        "category": category.__name__, "file": filename, "line": lineno}})


def capture_stderr() -> None:
    """Route file descriptor 2 through a pipe whose reader writes each line on as JSON (lines that are JSON
    already, as is). The log handlers keep writing to the real stderr; a crash's traceback (faulthandler) too."""
    real = os.dup(2)
    out = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")
    lock = threading.Lock()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(out)
    faulthandler.enable(out)
    read, write = os.pipe()
    sys.stderr.flush()
    os.dup2(write, 2)
    os.close(write)

    def forward() -> None:
        with os.fdopen(read, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not text.strip():
                    continue
                try:
                    json.loads(text)
                    is_json = text.lstrip().startswith("{")
                except ValueError:
                    is_json = False
                line = text if is_json else json.dumps({"ts": _timestamp(time.time()), "level": "warning",
                                                         "logger": "stderr", "message": text}, ensure_ascii=False)
                with lock:
                    out.write(line + "\n")

    thread = threading.Thread(target=forward, name="stderr-to-json", daemon=True)
    thread.start()

    def finish() -> None:  # everything written before exit reaches the log
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the reader sees its end
        thread.join(2.0)

    atexit.register(finish)


def log_event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields) -> None:
    logger.log(level, message, extra={"fields": fields})
