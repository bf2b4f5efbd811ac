"""The backend's log as a person reads it: "12:03:41 WARNING message" instead of raw JSON lines.

The backend writes one JSON object per line (server/logs.py: ts, level, logger, message, extra fields, traceback);
its event lines on stdout (ready, failed, download, downloaded) are said in words (a download's progress by
`DownloadProgress`, the one formatting of it for the log and the panel's status line). Anything else is shown as it is.
The file on disk keeps the raw lines for troubleshooting.
"""
from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass

# Fields of a log line that are shown as "name=value" after the message (the rest are internal).
SHOWN_FIELDS = ("path", "status", "job_id", "device", "model", "seconds", "error")


def parse_json_line(line: str) -> dict | None:
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def format_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


@dataclass
class DownloadProgress:
    file: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float = 0.0
    eta_s: float | None = None
    name: str = ""

    @classmethod
    def from_event(cls, event: dict, name: str = "") -> "DownloadProgress":
        def number(key, default=0):
            value = event.get(key)
            return value if isinstance(value, (int, float)) else default

        return cls(str(event.get("file", "")), int(number("bytes_done")), int(number("bytes_total")),
                   float(number("rate_bps", 0.0)), event.get("eta_s") if isinstance(event.get("eta_s"), (int, float))
                   else None, name)

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.bytes_done / self.bytes_total) if self.bytes_total > 0 else None

    def describe(self) -> str:
        what = f"Downloading {self.name}" if self.name else "Downloading"
        amount = format_bytes(self.bytes_done)
        if self.bytes_total > 0:
            amount += f" / {format_bytes(self.bytes_total)} ({100 * self.fraction:.0f}%)"
        parts = [f"{what}: {amount}"]
        if self.rate_bps > 0:
            parts.append(f"{format_bytes(self.rate_bps)}/s")
        if self.eta_s is not None:
            parts.append(f"{format_duration(self.eta_s)} left")
        return ", ".join(parts)


def local_clock(timestamp: str) -> str:
    """"2026-12-07T02:41:09.123Z" -> "02:41:09" in this computer's time zone (the text itself if unparsable)."""
    try:
        seconds = calendar.timegm(time.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, TypeError):
        return str(timestamp)
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def last_segment(text: str) -> str:
    """A progress bar's text ("…\\r 10%\\r 20%") as its last state."""
    parts = [part for part in str(text).split("\r") if part.strip()]
    return parts[-1].strip() if parts else ""


def readable(line: str) -> str | None:
    """One line for the log pane; None for a line not worth showing (empty)."""
    record = parse_json_line(line)
    if record is None:
        text = last_segment(line)
        return text or None
    event = record.get("event")
    if event == "ready":
        return f"ready: listening on {record.get('host', '127.0.0.1')}:{record.get('port')} " \
               f"({record.get('device', 'device ?')})"
    if event == "failed":
        return f"FAILED ({record.get('reason', 'other')}): {record.get('message', '')}"
    if event == "download":
        return DownloadProgress.from_event(record).describe()
    if event == "downloaded":
        return f"downloaded into {record.get('path')}"
    if "message" not in record:
        return line.strip()
    clock = local_clock(record.get("ts", "")) if record.get("ts") else time.strftime("%H:%M:%S")
    level = str(record.get("level", "info")).upper()
    extra = " ".join(f"{name}={record[name]}" for name in SHOWN_FIELDS if name in record)
    text = f"{clock} {level:<7} {last_segment(record['message'])}{' (' + extra + ')' if extra else ''}"
    if record.get("traceback"):
        lines = [entry for entry in str(record["traceback"]).strip().splitlines() if entry.strip()]
        text += f"\n         {lines[-1].strip()}" if lines else ""
    return text


def meaningful_lines(lines, count: int = 6) -> list[str]:
    """The last lines that say something about a failure: warnings and errors first (tracebacks' last line), else
    the last lines of any level; readable, never raw JSON."""
    chosen = []
    for line in lines:
        record = parse_json_line(line)
        if record is not None and record.get("event") in ("ready", "download", "downloaded"):
            continue
        if record is not None and str(record.get("level", "")).lower() in ("debug", "info") and not record.get("event"):
            continue
        text = readable(line)
        if text:
            chosen.append(text)
    if not chosen:
        chosen = [text for text in (readable(line) for line in lines) if text]
    return chosen[-count:]
