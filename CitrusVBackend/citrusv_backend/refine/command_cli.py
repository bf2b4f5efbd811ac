"""`citrusv refine`: the text gives the first mask (or a labelmap you have), clicks and boxes correct it.

Prompts come from a JSON file of steps (`--steps`: one step object or a list; each step holds "points" and/or a
"box" with "ijk", "ras" or "lps" coordinates) or from Slicer markups files (`--include` / `--exclude` point lists,
`--box` an ROI), which together make one more step. Writes the refined labelmap in the input's geometry, a JSON
record of the steps, and a before / after preview.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import option_types as types
from ..errors import CitrusVError
from ..option_fields import add_options, from_args
from ..volume.arguments import add_volume_options, volume_options
from ..volume.options import RefineOptions


def add_refine_parser(sub, add_model_options) -> None:
    refine = sub.add_parser("refine", help="correct a segment with include / exclude points and boxes (SAM2 prompts), "
                                           "re-propagated through the volume")
    refine.add_argument("volume", help="the volume (NIfTI, NRRD, MHA/MHD or a DICOM folder)")
    start = refine.add_mutually_exclusive_group(required=True)
    start.add_argument("--prompt", help="segment this first (e.g. 'segment the left lung'), then refine")
    start.add_argument("--labelmap", help="refine a segment of this labelmap (same grid as the volume)")
    refine.add_argument("--query", default=None, help="with --labelmap: the target, e.g. 'left lung' (for --keep-text)")
    refine.add_argument("--label", type=types.positive_int, default=1, help="the segment's label value (default 1)")
    refine.add_argument("--steps", help="JSON: a step {points, box} or a list of steps, applied in order")
    refine.add_argument("--include", action="append", default=[], help="Slicer point list (.mrk.json): include points")
    refine.add_argument("--exclude", action="append", default=[], help="Slicer point list (.mrk.json): exclude points")
    refine.add_argument("--box", help="Slicer ROI (.mrk.json): the target lies inside it")
    refine.add_argument("--out", required=True, help="output folder")
    # The slices as `citrusv segment` makes them (with --labelmap: as they were made for it).
    add_volume_options(refine, only=("window", "axis", "slice_range", "max_pixels"), read=False)
    add_options(refine, RefineOptions, advanced=refine.advanced_group())
    add_model_options(refine)
    refine.set_defaults(handler=cmd_refine)


def read_steps(args, lps_to_ijk: np.ndarray) -> list:
    from .volume_prompts import RefinePrompts, prompts_from_dict, prompts_from_markups

    steps = []
    if args.steps:
        try:
            data = json.loads(Path(args.steps).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CitrusVError(f"--steps {args.steps}: not a readable JSON file ({error})") from None
        steps += [prompts_from_dict(step, lps_to_ijk) for step in (data if isinstance(data, list) else [data])]
    marked = RefinePrompts()
    for path, positive in [(p, True) for p in args.include] + [(p, False) for p in args.exclude]:
        marked.points += prompts_from_markups(Path(path), lps_to_ijk, positive).points
    if args.box:
        marked.box = prompts_from_markups(Path(args.box), lps_to_ijk).box
    if marked:
        steps.append(marked)
    if not steps:
        raise CitrusVError("no prompts: give --steps, --include / --exclude point lists or a --box ROI")
    return steps


def cmd_refine(args) -> int:
    from ..console import ProgressPrinter, random_weights_banner, say
    from ..model.feature_cache import SAM2FeatureCache
    from ..model_source import load_engine
    from ..paths import check_not_inside_input, writable_folder
    from ..volume.input.io import read_volume
    from ..volume.tasks.pipeline import VolumePipeline
    from ..volume.tasks.sampling import task_budget
    from .volume_features import SliceFeatureStore
    from .volume_prompts import prompts_by_slice
    from .volume_session import RefinementSession

    check_not_inside_input(Path(args.volume), Path(args.out))
    writable_folder(args.out, create=False)  # a bad output folder fails before the volume is read
    volume = read_volume(args.volume)
    steps = read_steps(args, np.linalg.inv(volume.geometry.ijk_to_lps()))  # bad prompts fail before the model loads
    options = volume_options(args)
    labels = _read_labels(args, volume) if args.labelmap else None
    engine = load_engine(args)
    features = SAM2FeatureCache()  # the segmentation's slice features serve the clicks
    if labels is None:
        result = VolumePipeline(engine, progress=ProgressPrinter(), feature_cache=features).run(
            volume, args.prompt, "segment", options)
        labels, source = result.labels, result.source
        segment = next((s for s in result.segments if s.label == args.label), None)
        if segment is None:
            raise CitrusVError(f"the prompt gave segments {[s.label for s in result.segments]}, not label {args.label}")
        query, anchors = segment.query, [segment.key_slice] if segment.key_slice is not None else []
        before = segment.mask   # its own voxels, also where another segment lies over it
    else:
        source, query, anchors = _labelmap_source(volume, options, args.query), args.query, []
        before = labels == args.label
    budget = task_budget("segment", options)
    session = RefinementSession(engine, source, before, query=_model_query(query), budget=budget,
                                slice_range=options.validate(source.depth), anchors=anchors,
                                features=SliceFeatureStore(engine, source, budget, features))
    refine_options = from_args(RefineOptions, args)
    records, placed, changed = [], {}, []
    for number, prompts in enumerate(steps, start=1):
        outcome = session.refine(prompts, refine_options)
        for index, prompt in prompts_by_slice(prompts, source.orientation, volume.shape, session.slice_range).items():
            placed.setdefault(index, []).append(prompt)
        changed += outcome.changed_slices
        records.append({"step": number, "refined_slices": outcome.refined_slices,
                        "propagated_slices": outcome.propagated_slices, "changed_slices": outcome.changed_slices,
                        "voxels": session.voxels, "timings": outcome.timings})
        say(f"step {number}: slices {outcome.refined_slices} refined, {len(outcome.propagated_slices)} re-propagated, "
            f"{len(outcome.changed_slices)} changed; {session.voxels} voxels; "
            f"{outcome.timings['total_s'] * 1000:.0f} ms")
    _write(args, volume, source, labels, before, session, records, placed, changed, engine.loaded.random_weights)
    if engine.loaded.random_weights:
        say(random_weights_banner(engine.loaded.checkpoint_dir))
    return 0


def _read_labels(args, volume) -> np.ndarray:
    from ..volume.input.io import read_volume

    labelmap = read_volume(args.labelmap)
    if labelmap.shape != volume.shape or not np.allclose(labelmap.geometry.ijk_to_lps(), volume.geometry.ijk_to_lps(),
                                                         atol=1e-3):
        raise CitrusVError("the labelmap is on another voxel grid than the volume; resample it onto the volume first")
    labels = np.asarray(labelmap.voxels)
    if not (labels == args.label).any():
        raise CitrusVError(f"the labelmap has no voxel with label {args.label} (labels: {np.unique(labels)[:20].tolist()})")
    return labels.astype(np.uint16 if labels.max() > 255 else np.uint8)


def _labelmap_source(volume, options, query):
    from ..volume.slices.slice_source import SliceSource
    from ..volume.slices.windowing import parse_window

    return SliceSource(volume, options.axis, parse_window(options.window, query or "", volume.modality, volume.voxels))


def _model_query(text: str | None) -> str | None:
    """A target as the pipeline asks the model about it: a --query 'left lung' becomes the reference phrasing."""
    from ..volume.tasks.targets import QUERY_TEMPLATE, parse_targets

    if not text or text.strip().lower().startswith("please"):
        return text
    target = parse_targets(text)[0]
    return target.query if target.query != text.strip() else QUERY_TEMPLATE.format(target=target.name)


def _write(args, volume, source, labels, before, session, records, placed, changed, random_weights) -> None:
    from ..console import say
    from ..paths import atomic_path, write_text
    from ..volume.input.io import write_labelmap
    from .volume_preview import preview_rows, render_refinement

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    refined = labels.copy()
    refined[before & ~session.mask] = 0
    refined[session.mask & (refined == 0)] = args.label  # other segments keep their voxels, as in the pipeline
    suffix = ".nii.gz"
    labelmap = out / f"{volume.name}_refined_seg{suffix}"
    with atomic_path(labelmap) as temporary:
        staged = temporary.with_name(temporary.name + suffix)
        write_labelmap(refined, volume, staged)
        staged.replace(temporary)
    record = out / f"{volume.name}_refine.json"
    write_text(record, json.dumps({"volume": str(args.volume), "label": args.label, "random_weights": random_weights,
                                   "voxels_before": int(before.sum()), "steps": records}, indent=2) + "\n")
    preview = out / f"{volume.name}_refine_preview.png"
    rows = preview_rows(changed, sorted(placed))
    title = f"{volume.name}: refinement of label {args.label} ({len(records)} step(s))"
    with atomic_path(preview) as temporary:
        render_refinement(source, before, session.mask, placed, rows, title, random_weights).save(temporary, "PNG")
    for path in (labelmap, record, preview):
        say(f"wrote {path}")
