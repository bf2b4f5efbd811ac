"""What a person reads after a batch: summary.csv (one row per case and segment), index.html (every case's
preview with its summary rows) and the progress lines while it runs."""
from __future__ import annotations

import csv
import html
import io
import sys
import time
from pathlib import Path

from ..paths import write_text

SUMMARY_NAME = "summary.csv"
INDEX_NAME = "index.html"
SUMMARY_COLUMNS = ["case", "input", "status", "seconds", "segment", "label", "found", "voxel_count", "volume_ml",
                   "long_axis_mm", "short_axis_mm", "laterality", "dicom_seg", "dicom_sr", "warnings", "error"]


def _number(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def summary_rows(entries: list[dict]) -> list[dict]:
    """One row per segment of each case; a case without segments (failed, detect, report) gets one row."""
    rows = []
    for entry in entries:
        base = {"case": entry["case"], "input": entry.get("input", ""), "status": entry.get("status", "not run"),
                "seconds": _number(entry.get("timings", {}).get("total_s"), 1), "error": entry.get("error") or "",
                "dicom_seg": (entry.get("outputs") or {}).get("dicom_seg", ""),
                "dicom_sr": (entry.get("outputs") or {}).get("dicom_sr", ""),
                "warnings": "; ".join(entry.get("warnings") or [])}
        segments = entry.get("segments") or [{}]
        for segment in segments:
            found = segment.get("found")
            rows.append(base | {"segment": segment.get("name", ""), "label": segment.get("label", ""),
                                "found": "" if found is None else ("yes" if found else
                                                                   f"no: {segment.get('reason') or 'not found'}"),
                                "voxel_count": "" if segment.get("voxel_count") is None else segment["voxel_count"],
                                "volume_ml": _number(segment.get("volume_ml")),
                                "long_axis_mm": _number(segment.get("long_axis_mm")),
                                "short_axis_mm": _number(segment.get("short_axis_mm")),
                                "laterality": segment.get("laterality") or ""})
    return rows


def write_summary(out_dir: Path, entries: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_rows(entries))
    return write_text(out_dir / SUMMARY_NAME, buffer.getvalue())


_STYLE = "\n".join([
    "body{font-family:system-ui,sans-serif;background:#111;color:#ddd;margin:1.5em}",
    ".case{display:inline-block;vertical-align:top;width:400px;margin:0 1em 1.5em 0;background:#1c1c1c;"
    "padding:.6em;border-radius:6px}",
    ".case img{width:100%;border-radius:4px} .done{color:#7c7} .failed{color:#f66} .notrun{color:#aa8}",
    "table{border-collapse:collapse;font-size:.85em;width:100%}",
    "td,th{padding:2px 6px;text-align:left;border-bottom:1px solid #333}",
    ".error{color:#f99;font-size:.85em;white-space:pre-wrap} .warning{color:#f55;font-weight:bold}",
    "h2{font-size:1em;margin:.2em 0}"])
SEGMENT_HEADER = "<tr><th>segment</th><th>mL</th><th>long mm</th><th>short mm</th><th>side</th></tr>"


def _segment_row(segment: dict) -> str:
    cells = [f"{segment.get('label')} {segment.get('name')}", _number(segment.get("volume_ml")),
             _number(segment.get("long_axis_mm")), _number(segment.get("short_axis_mm")),
             segment.get("laterality") or ""]
    return "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>"


def _case_card(entry: dict) -> str:
    """A case's preview with its summary figures (or its error)."""
    case, status = html.escape(entry["case"]), html.escape(entry.get("status", "not run"))
    seconds = _number(entry.get("timings", {}).get("total_s"), 1)
    parts = [f'<div class="case" id="{case}"><h2>{case} <span class="{status.replace(" ", "")}">{status}</span></h2>',
             f'<div>{html.escape(entry.get("input", ""))}{f" · {seconds} s" if seconds else ""}</div>']
    preview = (entry.get("outputs") or {}).get("preview")
    if preview and status == "done":
        link = html.escape(preview)
        parts.append(f'<a href="{link}"><img src="{link}" alt="preview of {case}" loading="lazy"></a>')
    if entry.get("segments"):
        parts += ["<table>", SEGMENT_HEADER] + [_segment_row(s) for s in entry["segments"]] + ["</table>"]
    if entry.get("error"):
        parts.append(f'<div class="error">{html.escape(entry["error"])}</div>')
    return "\n".join(parts) + "</div>"


def write_index(out_dir: Path, entries: list[dict], title: str) -> Path:
    counts = {status: sum(e.get("status", "not run") == status for e in entries)
              for status in ("done", "failed", "not run")}
    random = any(e.get("random_weights") for e in entries)
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{counts['done']} done, {counts['failed']} failed, {counts['not run']} not run · "
            f'<a href="{SUMMARY_NAME}">summary.csv</a> · <a href="manifest.jsonl">manifest.jsonl</a></p>']
    if random:
        body.append('<p class="warning">RANDOM WEIGHTS: results from a random test model are noise.</p>')
    body += [_case_card(entry) for entry in entries]
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return write_text(out_dir / INDEX_NAME, page)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class BatchProgress:
    """Line-based progress on stderr: counts, the current case and stage, throughput and ETA."""

    def __init__(self, total: int, stream=None, interval: float = 1.0):
        self.total, self.stream, self.interval = total, stream or sys.stderr, interval
        self.counts = {"done": 0, "failed": 0, "skipped": 0}
        self.current = ""
        self.stage_key, self.last = None, 0.0
        self.started = time.monotonic()
        self.processed = 0  # cases the model ran (done or failed), for the throughput

    def restart_clock(self) -> None:
        """Throughput counts from when the model is ready, not from start-up."""
        self.started = time.monotonic()
        self.processed = 0

    @property
    def left(self) -> int:
        return self.total - sum(self.counts.values())

    def rate_per_hour(self) -> float | None:
        elapsed = time.monotonic() - self.started
        return self.processed / elapsed * 3600 if self.processed and elapsed > 0 else None

    def line(self) -> str:
        rate = self.rate_per_hour()
        pace = f"{rate:.0f} cases/h, ETA {format_duration(self.left / rate * 3600)}" if rate else "ETA -"
        finished = self.total - self.left
        return (f"[{finished}/{self.total}] done {self.counts['done']}, failed {self.counts['failed']}, "
                f"skipped {self.counts['skipped']}, left {self.left} | {self.current or '-'} | {pace}")

    def emit(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def stage(self, case: str, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        self.current = f"{case}: {stage} {fraction * 100:.0f}%" + (f" {message}" if message else "")
        if (case, stage) != self.stage_key or now - self.last >= self.interval:
            self.stage_key, self.last = (case, stage), now
            self.emit()

    def finished(self, case: str, status: str, seconds: float | None, error: str | None) -> None:
        self.counts[status] += 1
        if status != "skipped":
            self.processed += 1
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        shown = status.upper() if status == "failed" else status
        self.current = f"{case} {shown}{took}" + (f": {error}" if error else "")
        self.emit()
