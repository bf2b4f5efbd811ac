"""Writing a volume result: labelmap, label table, Slicer segmentation, findings, report and a preview.

Every file is first written under a temporary name in the output folder and renamed when complete, so a
killed run never leaves a half-written file under a final name.

Segments may overlap (a lesion inside its organ); each output carries every segment's own voxels
(docs/dicom-and-overlaps.md):
- `{case}_seg.nii.gz`: the multi-label labelmap, one label per voxel, the smaller segment on top where segments
  overlap (overlaps.multilabel); when any segments overlap, also `{case}_segment_{label}.nii.gz` per found
  segment (0/1, its whole mask). `{case}_labels.json` says, per segment, which file holds all its voxels, how
  many of them the multi-label file shows and which segments it overlaps.
- `{case}_seg.seg.nrrd`: as many layers as the overlaps need, each segment whole in one layer.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...paths import atomic_path, write_text
from ...serialization import json_default
from ..input.io import Volume, write_labelmap
from ..slices.slice_source import SliceSource
from ..tasks.results import VolumeResult
from .colors import segment_color
from .overlaps import layers, overlapping, visible_voxels

FINDING_COLUMNS = ["finding", "location", "laterality", "volume_ml", "long_axis_mm", "short_axis_mm",
                   "mean_intensity", "slice", "segment"]
RANDOM_NOTE = "RANDOM WEIGHTS: these results come from a random test model and are noise."


LABELMAP_RULE = ("one label per voxel; where segments overlap the smaller segment's label is kept (a segment "
                 "inside another stays visible); a segment's own voxels are in its 'file'")


def segment_file_name(case: str, label: int) -> str:
    return f"{case}_segment_{label}.nii.gz"


def label_table(result: VolumeResult, labelmap_name: str = "", per_segment_files: bool = False) -> list[dict]:
    """Per segment: its figures, where its voxels are (`file`), how many of them the multi-label file shows."""
    shared = overlapping(result.segments)
    _, layer_of = layers(result.segments, result.labels.shape)
    rows = []
    for s in result.segments:
        found = s.found
        rows.append({"label": s.label, "name": s.name, "color": list(segment_color(s.label)), "query": s.query,
                     "key_slice": s.key_slice, "found": found, "reason": s.reason or None,
                     "voxel_count": s.measurements.get("voxel_count"),
                     "volume_ml": s.measurements.get("volume_ml") if found else None,
                     "file": (segment_file_name(result.case, s.label) if per_segment_files else labelmap_name)
                     if found else None,
                     "voxels_in_labelmap": visible_voxels(s, result.labels), "overlaps": shared.get(s.label, []),
                     "seg_nrrd_layer": layer_of[s.label]})
    return rows


def write_segmentation_nrrd(result: VolumeResult, volume: Volume, path: Path) -> Path:
    """A Slicer `.seg.nrrd` via slicerio: named and coloured segments, as many layers as the overlaps need."""
    import slicerio

    stack, layer_of = layers(result.segments, volume.shape)
    segments = [{"id": f"Segment_{s.label}", "labelValue": s.label, "layer": layer_of[s.label], "name": s.name,
                 "color": [c / 255.0 for c in segment_color(s.label)]} for s in result.segments]
    voxels = stack.transpose(0, 3, 2, 1) if len(stack) > 1 else stack[0].transpose(2, 1, 0)   # (layer,) i, j, k
    segmentation = {"voxels": np.ascontiguousarray(voxels),
                    "ijkToLPS": volume.geometry.ijk_to_lps(), "encoding": "gzip",
                    "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap",
                    "referenceImageExtentOffset": [0, 0, 0], "segments": segments}
    with atomic_path(path) as temporary:
        # slicerio picks the format from the name, so keep the .seg.nrrd ending on the temporary file.
        staged = temporary.with_name(temporary.name + ".seg.nrrd")
        slicerio.write_segmentation(str(staged), segmentation)
        os.replace(staged, temporary)
    return path


def findings_tsv(findings: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FINDING_COLUMNS, delimiter="\t", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in findings:
        writer.writerow({key: _format_cell(row.get(key)) for key in FINDING_COLUMNS})
    return buffer.getvalue()


def _format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def report_markdown(result: VolumeResult) -> str:
    lines = [f"# CitrusV {result.task} report: {result.case}", ""]
    if result.random_weights:
        lines += [f"> **{RANDOM_NOTE}**", ""]
    if result.experimental:
        lines += [f"> **{result.experimental}**", ""]
    lines += [f"Prompt: {result.prompt or '(none)'}", ""]
    if result.segments:
        lines += ["## Segments", "", "| label | segment | laterality | volume (mL) | long axis (mm) | short axis (mm) | key slice |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for s in result.segments:
            m = s.measurements
            if not s.found:
                lines.append(f"| {s.label} | {s.name} | not found{': ' + s.reason if s.reason else ''} | | | | |")
                continue
            lines.append(f"| {s.label} | {s.name} | {s.laterality or ''} | {_format_cell(m.get('volume_ml'))} | "
                         f"{_format_cell(m.get('long_axis_mm'))} | {_format_cell(m.get('short_axis_mm'))} | "
                         f"{'' if s.key_slice is None else s.key_slice} |")
        lines.append("")
    if result.boxes:
        lines += ["## Detections", ""]
        lines += [f"- {b['label'] or 'detection'}: slices {b['slices'][0]}–{b['slices'][1]}, size "
                  f"{' x '.join(f'{v:.1f}' for v in b['size_mm'])} mm, {b['laterality']}" for b in result.boxes]
        lines.append("")
    if result.report_findings or result.report_impression:
        lines += ["## FINDINGS", "", result.report_findings or "(none)", "", "## IMPRESSION", "",
                  result.report_impression or "(none)", ""]
    if result.problems:
        lines += ["## Notes", ""] + [f"- {p}" for p in result.problems] + [""]
    return "\n".join(lines)


def preview_slices(result: VolumeResult, source: SliceSource, count: int = 6) -> list[int]:
    """Slices worth showing: each segment's key slice and the span of its mask; else a spread."""
    chosen: list[int] = []
    for segment in result.segments:
        if segment.slices:
            span = segment.slices
            chosen += [segment.key_slice] if segment.key_slice is not None else []
            chosen += [span[int(round(q * (len(span) - 1)))] for q in (0.0, 0.25, 0.75, 1.0)]
    for box in result.boxes:
        chosen.append((box["slices"][0] + box["slices"][1]) // 2)
    chosen = list(dict.fromkeys(i for i in chosen if i is not None))[:count]
    if not chosen:
        chosen = [int((n + 0.5) * source.depth / count) for n in range(min(count, source.depth))]
    return sorted(set(chosen))


def render_preview(result: VolumeResult, source: SliceSource, tile: int = 256) -> Image.Image:
    """A montage of slices with the masks overlaid and each segment's measurements written under it."""
    indices = preview_slices(result, source)
    columns = min(3, len(indices))
    rows = (len(indices) + columns - 1) // columns
    legend = [f"{s.label} {s.name}: {_format_cell(s.measurements.get('volume_ml'))} mL, "
              f"{_format_cell(s.measurements.get('long_axis_mm'))} x {_format_cell(s.measurements.get('short_axis_mm'))} mm"
              f"{', ' + s.laterality if s.laterality else ''}" for s in result.segments]
    header = [f"{result.case} - {result.task}: {result.prompt}"[:110]] + ([RANDOM_NOTE] if result.random_weights else [])
    header += _wrap(result.experimental, 110) if result.experimental else []
    text_height = 16 * (len(header) + len(legend)) + 8
    canvas = Image.new("RGB", (columns * tile, rows * tile + text_height), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for n, index in enumerate(indices):
        canvas.paste(_overlay_tile(result, source, index, tile), ((n % columns) * tile, (n // columns) * tile))
        draw.text(((n % columns) * tile + 4, (n // columns) * tile + 4), f"slice {index}", fill=(255, 255, 0), font=font)
    y = rows * tile + 4
    for number, line in enumerate(header):
        draw.text((4, y), line, fill=(230, 230, 230) if number == 0 else (255, 80, 80), font=font)
        y += 16
    for segment, line in zip(result.segments, legend):
        draw.text((4, y), line, fill=segment_color(segment.label), font=font)
        y += 16
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def _overlay_tile(result: VolumeResult, source: SliceSource, index: int, tile: int) -> Image.Image:
    """One slice as people read it (radiological display orientation), whatever orientation the model saw."""
    rgb = source.display_rgb(index).astype(np.float64)
    labels = source.display.slice(result.labels, index)
    for segment in result.segments:
        inside = labels == segment.label
        rgb[inside] = 0.55 * rgb[inside] + 0.45 * np.array(segment_color(segment.label))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    scale = tile / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    framed = Image.new("RGB", (tile, tile), (0, 0, 0))
    framed.paste(image, ((tile - image.width) // 2, (tile - image.height) // 2))
    draw = ImageDraw.Draw(framed)
    for box in result.boxes:
        if box["slices"][0] <= index <= box["slices"][1]:
            x1, y1, x2, y2 = (v * scale for v in box["box_display_pixels"])
            ox, oy = (tile - image.width) // 2, (tile - image.height) // 2
            draw.rectangle([x1 + ox, y1 + oy, x2 + ox, y2 + oy], outline=(255, 64, 64), width=2)
    return framed


def _write_nifti(labels: np.ndarray, volume: Volume, path: Path) -> None:
    with atomic_path(path) as temporary:
        write_labelmap(labels, volume, temporary.with_name(temporary.name + ".nii.gz"))
        os.replace(temporary.with_name(temporary.name + ".nii.gz"), temporary)


def write_outputs(result: VolumeResult, out_dir: Path, extra: dict | None = None,
                  dicom: bool | None = None) -> dict[str, Path]:
    """All files of one case in `out_dir` (geometry and previews from the slices the task saw); by kind.

    `dicom`: also a DICOM SEG and SR (volume.outputs.dicom_out); None = only when the input is a DICOM series."""
    source = result.source
    volume = source.volume
    out_dir.mkdir(parents=True, exist_ok=True)
    case = result.case
    files = {
        "labelmap": out_dir / f"{case}_seg.nii.gz",
        "labels": out_dir / f"{case}_labels.json",
        "segmentation": out_dir / f"{case}_seg.seg.nrrd",
        "findings_json": out_dir / f"{case}_findings.json",
        "findings_tsv": out_dir / f"{case}_findings.tsv",
        "report": out_dir / f"{case}_report.md",
        "preview": out_dir / f"{case}_preview.png",
    }
    from .dicom_out import dicom_skipped, model_name, wants_dicom, write_dicom_outputs

    skipped = dicom_skipped(dicom, volume)
    if skipped and skipped not in result.problems:
        result.problems.append(skipped)
    _write_nifti(result.labels, volume, files["labelmap"])
    per_segment = bool(overlapping(result.segments))
    if per_segment:
        for segment in result.segments:
            if segment.found:
                files[f"segment_{segment.label}"] = out_dir / segment_file_name(case, segment.label)
                _write_nifti(segment.mask.astype(np.uint8), volume, files[f"segment_{segment.label}"])
    write_text(files["labels"], json.dumps({
        "case": case, "random_weights": result.random_weights, "labelmap": files["labelmap"].name,
        "labelmap_rule": LABELMAP_RULE, "per_segment_files": per_segment,
        "labels": label_table(result, files["labelmap"].name, per_segment),
        "warnings": [skipped] if skipped else []}, indent=2) + "\n")
    write_segmentation_nrrd(result, volume, files["segmentation"])
    write_text(files["findings_json"], json.dumps(result.describe() | (extra or {}), indent=2, default=json_default) + "\n")
    write_text(files["findings_tsv"], findings_tsv(result.findings))
    write_text(files["report"], report_markdown(result))
    with atomic_path(files["preview"]) as temporary:
        render_preview(result, source).save(temporary, format="PNG")
    if result.report_image is not None:
        files["report_image"] = out_dir / f"{case}_report_image.png"
        with atomic_path(files["report_image"]) as temporary:
            Image.fromarray(result.report_image).save(temporary, format="PNG")
    if wants_dicom(dicom, volume):
        files |= write_dicom_outputs(result, volume, out_dir, case, model_name((extra or {}).get("model")))
    return files

