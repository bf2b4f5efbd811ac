"""The `citrusv` command line.

What a user runs: `infer` (one image, one prompt), `segment` / `detect` / `report` (a whole volume), `refine`
(correct a segment with points and boxes), `batch` (a folder of volumes, locally or on Ray), `serve` (the HTTP
service the Slicer module starts), `eval` (Dice, HD95, volume error against a ground truth), `demo` (the main
job on the bundled sample CT). Developer tools sit under `citrusv dev` (not listed by `citrusv --help`):
`make-tiny-checkpoint`, `bench`. Every option is declared once, as a field of an options dataclass
(option_fields.py); `--help` shows what a user needs, `--help-all` the advanced switches too
(command_parser.py). User errors print one line and exit with 2; anything unexpected keeps its traceback and
exits with 1.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from . import option_types as types
from .command_parser import CommandParser
from .console import ProgressPrinter, random_weights_banner, say
from .demo import DEFAULT_DEMO_PROMPT
from .errors import CitrusVError
from .inference.options import ImageOptions
from .model_source import ModelOptions, load_engine, open_engine, resolve_model_argument
from .option_fields import add_options, from_args
from .paths import check_not_inside_input, writable_folder
from .signals import SignalExit, exit_on_signals
from .volume.arguments import add_volume_options, read_options, volume_options


def add_model_options(parser: CommandParser) -> None:
    add_options(parser, ModelOptions, advanced=parser.advanced_group())


def write_result(result, prefix: Path, extra: dict | None = None) -> tuple[Path, Path]:
    import numpy as np

    prefix.parent.mkdir(parents=True, exist_ok=True)
    payload = result.to_json_dict() | (extra or {})
    json_path, npz_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".npz")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    np.savez_compressed(npz_path, **result.arrays())
    return json_path, npz_path


# ---------------------------------------------------------------------------------------------- infer

def cmd_infer(args) -> int:
    writable_folder(Path(args.out).parent, create=False)  # a bad output location or image fails before the model loads
    from .inference.images import load_image

    image = load_image(args.image)
    options = from_args(ImageOptions, args)
    try:
        options.check()
    except ValueError as error:
        raise CitrusVError(str(error)) from None
    engine = load_engine(args)
    say(f"running {args.task} on {args.image} ...")
    result = engine.run(image, args.prompt, **dataclasses.asdict(options))
    extra = {"model": engine.loaded.describe(), "version": __version__}
    json_path, npz_path = write_result(result, Path(args.out), extra)
    if result.random_weights:
        say(random_weights_banner(engine.loaded.checkpoint_dir))
    say(f"answer: {result.text!r}")
    say(f"{len(result.masks)} mask(s), {len(result.boxes)} box(es); timings (s): "
        + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in result.timings.items()))
    for problem in result.problems:
        say(f"note: {problem}")
    say(f"wrote {json_path} and {npz_path}")
    return 0


# ---------------------------------------------------------------------------------------------- volumes

def cmd_volume_task(args) -> int:
    check_not_inside_input(Path(args.volume), Path(args.out))
    writable_folder(args.out, create=False)  # before anything slow, even the imports; created when written
    from .volume.input.io import read_volume
    from .volume.outputs.dicom_out import check_dicom_possible, dicom_skipped, wants_dicom
    from .volume.outputs.files import write_outputs
    from .volume.tasks.pipeline import VolumePipeline

    # a bad file (or a DICOM series that is not a regular volume) fails before the model loads
    reading = read_options(args)
    volume = read_volume(args.volume, max_voxels=reading.max_voxels, on_bad_dicom=reading.on_bad_dicom)
    options = volume_options(args)
    say(f"read {args.volume}: {' x '.join(map(str, volume.shape[::-1]))} voxels, spacing "
        f"{' x '.join(f'{s:.3g}' for s in volume.geometry.spacing)} mm, {volume.modality}")
    input_warnings = volume.dicom.warnings if volume.dicom is not None else []
    for warning in input_warnings:
        say(f"warning: {warning}")
    if wants_dicom(options.dicom_out, volume):
        check_dicom_possible(volume)
    elif skipped := dicom_skipped(options.dicom_out, volume):  # not asked for: never blocks the segmentation
        say(f"warning: {skipped}")
    engine = load_engine(args)
    pipeline = VolumePipeline(engine, progress=ProgressPrinter())
    result = pipeline.run(volume, args.prompt or "", task=args.command, options=options)
    result.problems.extend(f"input: {warning}" for warning in input_warnings)
    files = write_outputs(result, Path(args.out),
                          extra={"model": engine.loaded.describe(), "version": __version__, "input": str(args.volume)},
                          dicom=options.dicom_out)
    if result.random_weights:
        say(random_weights_banner(engine.loaded.checkpoint_dir))
    if result.experimental:
        say(f"note: {result.experimental}")
    for segment in result.segments:
        m = segment.measurements
        say(f"segment {segment.label} '{segment.name}': " + (
            f"{m['volume_ml']:.1f} mL, long axis {m['long_axis_mm']:.1f} mm, short axis {m['short_axis_mm']:.1f} mm, "
            f"{segment.laterality}, key slice {segment.key_slice}" if segment.mask.any() else "not found")
            + (f"; answer {segment.answer!r} ({segment.answer_source})" if options.answer_mode == "free" else ""))
    for box in result.boxes:
        say(f"box '{box['label']}': slices {box['slices'][0]}-{box['slices'][1]}, "
            f"{' x '.join(f'{v:.1f}' for v in box['size_mm'])} mm, {box['laterality']}")
    for problem in result.problems[:20]:
        say(f"note: {problem}")
    say(f"{args.command} done in {result.timings['total_s']:.1f} s; results in {Path(args.out).resolve()}:")
    for kind, path in files.items():
        say(f"  {kind:14s} {path.name}")
    return 0


def cmd_eval(args) -> int:
    import numpy as np

    from .volume.input.io import read_volume
    from .volume.outputs.evaluate import evaluate_labelmaps

    prediction, truth = read_volume(args.prediction), read_volume(args.truth)
    if prediction.shape != truth.shape or not np.allclose(prediction.geometry.ijk_to_lps(), truth.geometry.ijk_to_lps(),
                                                          atol=1e-3):
        raise CitrusVError("prediction and ground truth are on different voxel grids; resample one onto the other first")
    names = _segment_names(Path(args.truth)) | _segment_names(Path(args.prediction))
    pairs = [tuple(int(v) for v in pair.split(":")) for pair in args.pair] if args.pair else None
    rows = evaluate_labelmaps(prediction.voxels.astype(np.int64), truth.voxels.astype(np.int64),
                              truth.geometry.spacing, pairs=pairs, names=names)
    print(json.dumps(rows, indent=2))
    for row in rows:
        hd95 = "n/a" if row["hausdorff95_mm"] is None else f"{row['hausdorff95_mm']:.2f} mm"
        say(f"{row['name']}: Dice {row['dice']:.4f}, HD95 {hd95}, volume error {row['volume_error_ml']:+.2f} mL")
    return 0


def _segment_names(path: Path) -> dict:
    """Label names from a .seg.nrrd (slicerio) or a `*_labels.json` beside a labelmap."""
    if path.name.endswith(".seg.nrrd"):
        import slicerio

        return {s["labelValue"]: s["name"] for s in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]}
    table = path.with_name(path.name.split("_seg.")[0] + "_labels.json")
    if table.is_file():
        return {row["label"]: row["name"] for row in json.loads(table.read_text())["labels"]}
    return {}


# ---------------------------------------------------------------------------------------------- serve

EXIT_WITH_PARENT_HELP = ("stop when the launcher goes away: stdin must be a pipe from the launcher, which closes it "
                         "to stop this process (used by the Slicer module)")


def cmd_serve(args) -> int:
    """The backend service; stdout carries only its JSON ready line, logs are JSON lines on stderr."""
    from .server.launch import ServeSettings, serve

    def load():
        model = resolve_model_argument(args.model)
        if args.no_download:  # a model that is not here fails at once (model_missing) instead of downloading
            from .model.checkpoint import resolve_checkpoint_dir

            model = str(resolve_checkpoint_dir(model, download=False))
        return open_engine(model, args.device, args.dtype, args.attention)

    return serve(ServeSettings.from_args(args), load_engine=load)


# ---------------------------------------------------------------------------------------------- batch

def cmd_batch(args) -> int:
    """A folder of volumes, resumable; exit 0 all done, 1 some case failed (see citrusv_backend.batch.runner)."""
    # Until the batch installs its own handlers (importing it takes a moment), and after it restores them, a stop
    # signal raises SignalExit: exit 130/143 with a message, never a traceback or death by the signal.
    with exit_on_signals():
        from .batch.runner import run_batch

        return run_batch(args)


# ---------------------------------------------------------------------------------------------- bench

def cmd_bench(args) -> int:
    from .benchmark import BenchSettings, format_table, run_benchmarks, write_report

    settings = BenchSettings.full() if args.full else BenchSettings.host() if args.host else BenchSettings()
    settings.repeats = args.repeats or settings.repeats
    if args.full_size_random:
        import torch

        from .inference.engine import CitrusVEngine
        from .model.loader import choose_device
        from .model.random_model import build_full_size_random

        device = choose_device(args.device)
        if device.type != "cuda":
            raise CitrusVError("--full-size-random needs a CUDA GPU (about 17 GB of bf16 weights)")
        say("building the 8B architecture with random bf16 weights ...")
        engine = CitrusVEngine(build_full_size_random(device, torch.bfloat16, args.attention))
    else:
        engine = load_engine(args)
    report = run_benchmarks(engine, settings, say=say)
    path = write_report(report, Path(args.out))
    print(format_table(report))
    say(f"results written to {path}")
    return 0


# ---------------------------------------------------------------------------------------------- tiny

def cmd_make_tiny_checkpoint(args) -> int:
    from .model.tiny import make_tiny_checkpoint

    started = time.monotonic()
    directory = make_tiny_checkpoint(Path(args.directory), seed=args.seed, legacy_names=args.legacy_key_names,
                                     heads=args.heads)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) / 1e6
    say(f"wrote a RANDOM tiny Citrus-V checkpoint to {directory} ({size:.0f} MB, {time.monotonic() - started:.1f} s); "
        f"its outputs are noise — for tests and smoke runs only")
    return 0


# ---------------------------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    """`citrusv segment` on the bundled chest CT (or --volume), with the demo's defaults."""
    from .demo import sample_ct_path

    args.volume = args.volume or str(sample_ct_path())
    args.command = "segment"
    say(f"CitrusV demo: segmenting {args.prompt!r} in {Path(args.volume).name}")
    return cmd_volume_task(args)


def build_parser() -> CommandParser:
    parser = CommandParser(prog="citrusv", description="Citrus-V medical segmentation, detection and reports.")
    parser.add_argument("--version", action="version", version=f"citrusv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and full tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Every subcommand is registered here, in the order `citrusv --help` lists them; a subcommand added without
    # `help=` is not listed (the dev group, old spellings).
    add_infer_parser(sub)
    add_volume_task_parsers(sub)
    from .refine.command_cli import add_refine_parser

    add_refine_parser(sub, add_model_options)
    from .ask_cli import add_parser as add_ask_parser

    add_ask_parser(sub, add_model_options)
    add_batch_parser(sub)
    add_serve_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    from .download_cli import add_parser as add_download_parser

    add_download_parser(sub)
    add_dev_parsers(sub)
    return parser


def add_infer_parser(sub) -> None:
    infer = sub.add_parser("infer", help="one image, one prompt: text, masks, boxes, findings")
    infer.add_argument("--image", required=True, help="PNG/JPEG/... image")
    infer.add_argument("--prompt", required=True, help="what to do, e.g. 'Please segment the liver in this scan.'")
    infer.add_argument("--out", required=True, help="output prefix: writes PREFIX.json and PREFIX.npz")
    add_options(infer, ImageOptions, advanced=infer.advanced_group())
    add_model_options(infer)
    infer.set_defaults(handler=cmd_infer)


def add_volume_task_parsers(sub) -> None:
    for name, summary in (("segment", "segment targets through a whole volume: labelmap, measurements, report"),
                          ("detect", "find targets in a volume: 3D boxes in patient coordinates"),
                          ("report", "a structured report of a volume from representative slices")):
        task = sub.add_parser(name, help=summary)
        task.add_argument("volume", help="NIfTI (.nii/.nii.gz), NRRD, MHA/MHD file or a DICOM series folder")
        task.add_argument("--prompt", required=name != "report", default=None,
                          help="e.g. 'segment the liver and the spleen'" if name == "segment" else "what to look for")
        task.add_argument("--out", required=True, help="output folder")
        add_volume_options(task, task=name)
        add_model_options(task)
        task.set_defaults(handler=cmd_volume_task)


def add_batch_parser(sub) -> None:
    from .batch.options import add_batch_options

    batch = sub.add_parser("batch", help="a folder of volumes: every case segmented (detected, reported), resumable; "
                                          "--engine ray for a cluster")
    add_batch_options(batch)
    add_model_options(batch)
    batch.advanced_group().add_argument("--exit-with-parent", action="store_true", help=EXIT_WITH_PARENT_HELP)
    batch.set_defaults(handler=cmd_batch)


def add_serve_parser(sub) -> None:
    from .server.config import ServeSettings, ServiceConfig

    serve = sub.add_parser("serve", help="the backend HTTP service for the Slicer module and OpenAI-compatible clients")
    advanced = serve.advanced_group()
    add_options(serve, ServeSettings, advanced=advanced)
    add_options(serve, ServiceConfig, advanced=advanced)
    add_model_options(serve)
    advanced.add_argument("--exit-with-parent", action="store_true", help=EXIT_WITH_PARENT_HELP)
    serve.set_defaults(handler=cmd_serve)


def add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="Dice, 95%% Hausdorff distance and volume error per segment")
    evaluate.add_argument("prediction", help="predicted labelmap (e.g. CASE_seg.nii.gz or .seg.nrrd)")
    evaluate.add_argument("truth", help="ground-truth labelmap on the same grid")
    evaluate.add_argument("--pair", action="append", help="PRED:TRUTH label values to compare (repeatable)")
    evaluate.set_defaults(handler=cmd_eval)


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the main job on the sample chest CT: segment a target, write the results")
    demo.add_argument("--prompt", default=DEFAULT_DEMO_PROMPT, help="what to segment")
    demo.add_argument("--volume", default=None, help="a volume file instead of the bundled sample CT")
    demo.add_argument("--out", default="citrusv-demo-output", help="output folder")
    add_volume_options(demo, only=("mode", "slice_range"), read=False)
    add_model_options(demo)
    demo.set_defaults(handler=cmd_demo)


# ---------------------------------------------------------------------------------------------- dev tools

def add_dev_parsers(sub) -> None:
    """`citrusv dev ...`: tools for developing and measuring the backend, not for users (so `citrusv --help`
    does not list them). The old spellings `citrusv make-tiny-checkpoint` and `citrusv bench` still work,
    unlisted (docs/changelog.md)."""
    dev = sub.add_parser("dev", description="Developer tools: random tiny checkpoints, benchmarks, host profiling.")
    tools = dev.add_subparsers(dest="dev_command", metavar="TOOL", required=True)
    for container, listed in ((tools, True), (sub, False)):
        add_tiny_parser(container, listed)
        add_bench_parser(container, listed)


def add_tiny_parser(sub, listed: bool) -> None:
    tiny = sub.add_parser("make-tiny-checkpoint", **({"help": "write a random tiny model in the release format"}
                                                     if listed else {}))
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--legacy-key-names", action="store_true",
                      help="save weights under the transformers-4.4x names (mllm.model.layers.*, mllm.visual.*)")
    tiny.add_argument("--heads", choices=["default", "object-absent", "faint-masks"], default="default",
                      help="default: object score 'present', clear masks; object-absent: object score 'absent' "
                           "with clear masks; faint-masks: object score 'present' with undecided masks (tests)")
    tiny.set_defaults(handler=cmd_make_tiny_checkpoint)


def add_bench_parser(sub, listed: bool) -> None:
    bench = sub.add_parser("bench", **({"help": "performance figures per stage and end to end (JSON + table); "
                                                "--host: host profiling"} if listed else {}))
    add_model_options(bench)
    bench.add_argument("--full-size-random", action="store_true",
                       help="the exact 8B architecture with random bf16 weights, built in memory (needs a GPU)")
    bench.add_argument("--full", action="store_true",
                       help="full measurement: 512x512x200 synthetic CT, 64 decoded tokens, 5 repeats (default: quick)")
    bench.add_argument("--host", action="store_true",
                       help="only the host-side figures (CPU work per slice, model waiting share, profile) at 512x512")
    bench.add_argument("--repeats", type=types.positive_int, default=None)
    bench.add_argument("--out", default="bench/results", help="folder for the results JSON")
    bench.set_defaults(handler=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "exit_with_parent", False):
        import signal

        from .parent_watch import watch_parent

        # serve: uvicorn's graceful shutdown (SIGINT); batch: cancel the current case now (SIGTERM).
        watch_parent(signal.SIGINT if args.handler is cmd_serve else signal.SIGTERM)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except CitrusVError as error:
        if args.verbose:
            raise
        print(f"citrusv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("citrusv: interrupted", file=sys.stderr)
        return 130
    except SignalExit as stopped:
        print(f"citrusv: {stopped}", file=sys.stderr)
        return stopped.code


if __name__ == "__main__":
    sys.exit(main())
