"""The `citrusv` command line.

Subcommands: `infer` (one image, one prompt), `segment` / `detect` / `report` (a whole volume), `refine`
(correct a segment with points and boxes), `batch`
(a folder of volumes, locally or on Ray), `serve` (the HTTP service), `bench` (performance figures), `eval`
(Dice, HD95, volume error against a ground truth), `serve` (the backend HTTP service), `make-tiny-checkpoint`
(a random tiny model in the release format), `demo` (the main job on the bundled sample CT). User errors print one line and exit with 2;
anything unexpected keeps its traceback and exits with 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from . import option_types as types
from .console import ProgressPrinter, random_weights_banner, say
from .demo import DEFAULT_DEMO_PROMPT
from .errors import CitrusVError
from .paths import check_not_inside_input, writable_folder
from .model_source import DEFAULT_MODEL, MODEL_ENV, TINY_ALIAS, load_engine, open_engine, resolve_model_argument
from .signals import SignalExit, exit_on_signals
from .volume.arguments import add_volume_options, volume_options

def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help=f"checkpoint folder or hub id (default: ${MODEL_ENV} or {DEFAULT_MODEL}); "
                             f"'{TINY_ALIAS}' = a random tiny model for smoke tests")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--attention", default="auto", help="auto (flash_attention_2 if installed on CUDA, else sdpa)")


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
    engine = load_engine(args)
    say(f"running {args.task} on {args.image} ...")
    result = engine.run(image, args.prompt, task=args.task, answer=args.answer, min_pixels=args.min_pixels,
                        max_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens,
                        mask_upsampling=args.mask_upsampling)
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
    from .volume.dicom_out import check_dicom_possible, wants_dicom
    from .volume.io import read_volume
    from .volume.outputs import write_outputs
    from .volume.pipeline import VolumePipeline

    # a bad file (or a DICOM series that is not a regular volume) fails before the model loads
    volume = read_volume(args.volume, max_voxels=args.max_voxels, on_bad_dicom=args.on_bad_dicom)
    options = volume_options(args)
    say(f"read {args.volume}: {' x '.join(map(str, volume.shape[::-1]))} voxels, spacing "
        f"{' x '.join(f'{s:.3g}' for s in volume.geometry.spacing)} mm, {volume.modality}")
    input_warnings = volume.dicom.warnings if volume.dicom is not None else []
    for warning in input_warnings:
        say(f"warning: {warning}")
    if wants_dicom(args.dicom_out, volume):
        check_dicom_possible(volume)
    engine = load_engine(args)
    pipeline = VolumePipeline(engine, progress=ProgressPrinter())
    result = pipeline.run(volume, args.prompt or "", task=args.command, options=options)
    result.problems.extend(f"input: {warning}" for warning in input_warnings)
    files = write_outputs(result, Path(args.out),
                          extra={"model": engine.loaded.describe(), "version": __version__, "input": str(args.volume)},
                          dicom=args.dicom_out)
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

    from .volume.evaluate import evaluate_labelmaps
    from .volume.io import read_volume

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citrusv", description="Citrus-V medical segmentation, detection and reports.")
    parser.add_argument("--version", action="version", version=f"citrusv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and full tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    infer = sub.add_parser("infer", help="one image, one prompt: text, masks, boxes, findings")
    add_model_options(infer)
    infer.add_argument("--image", required=True, help="PNG/JPEG/... image")
    infer.add_argument("--prompt", required=True, help="what to do, e.g. 'Please segment the liver in this scan.'")
    infer.add_argument("--answer", default=None, help="force this answer (e.g. 'Sure, it is [SEG].'): one prefill, no decoding")
    infer.add_argument("--task", choices=["ask", "segment", "detect", "report"], default="ask")
    infer.add_argument("--min-pixels", type=types.pixel_count, default=None, help="Qwen resize lower bound (default per task)")
    infer.add_argument("--max-pixels", type=types.pixel_count, default=None, help="Qwen resize upper bound (segment 65535, others 1003520)")
    infer.add_argument("--max-new-tokens", type=types.positive_int, default=1024)
    infer.add_argument("--mask-upsampling", choices=["bilinear", "nearest"], default="bilinear",
                       help="bilinear: smooth, upsample logits (default); nearest: the reference's exact resize")
    infer.add_argument("--out", required=True, help="output prefix: writes PREFIX.json and PREFIX.npz")
    infer.set_defaults(handler=cmd_infer)

    for name, summary in (("segment", "segment targets through a whole volume: labelmap, measurements, report"),
                          ("detect", "find targets in a volume: 3D boxes in patient coordinates"),
                          ("report", "a structured report of a volume from representative slices")):
        task = sub.add_parser(name, help=summary)
        task.add_argument("volume", help="NIfTI (.nii/.nii.gz), NRRD, MHA/MHD file or a DICOM series folder")
        add_model_options(task)
        task.add_argument("--prompt", required=name != "report", default=None,
                          help="e.g. 'segment the liver and the spleen'" if name == "segment" else "what to look for")
        task.add_argument("--out", required=True, help="output folder")
        add_volume_options(task, segment_options=name == "segment", report_options=name == "report")
        task.set_defaults(handler=cmd_volume_task)

    evaluate = sub.add_parser("eval", help="Dice, 95%% Hausdorff distance and volume error per segment")
    evaluate.add_argument("prediction", help="predicted labelmap (e.g. CASE_seg.nii.gz or .seg.nrrd)")
    evaluate.add_argument("truth", help="ground-truth labelmap on the same grid")
    evaluate.add_argument("--pair", action="append", help="PRED:TRUTH label values to compare (repeatable)")
    evaluate.set_defaults(handler=cmd_eval)

    serve = sub.add_parser("serve", help="the backend HTTP service for the Slicer module and OpenAI-compatible clients")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default loopback; any other needs --token-file or $CITRUSV_TOKEN)")
    serve.add_argument("--port", type=types.port, default=None,
                       help="TCP port; 0 (default) picks a free one (see the ready line); 8000 with --reference-compatible")
    serve.add_argument("--token-file", default=None,
                       help="file holding the bearer token (else $CITRUSV_TOKEN, else a random one written to a 0600 file)")
    serve.add_argument("--max-upload-mb", type=types.positive_float, default=1024, help="largest volume upload accepted (MiB)")
    serve.add_argument("--max-voxels", type=types.positive_int, default=1024**3, help="largest volume accepted (voxels)")
    serve.add_argument("--volume-budget-mb", type=types.positive_float, default=4096,
                       help="memory for uploaded volumes; the least recently used are evicted beyond it (MiB)")
    serve.add_argument("--volume-ttl", type=types.positive_float, default=3600, help="evict a volume unused for this long (s)")
    serve.add_argument("--result-ttl", type=types.positive_float, default=3600, help="keep a finished job's result this long (s)")
    serve.add_argument("--request-timeout", type=types.positive_float, default=600,
                       help="longest wait for a synchronous 2D or chat request (s)")
    serve.add_argument("--read-timeout", type=types.positive_float, default=60,
                       help="drop a request whose body stalls this long (s)")
    serve.add_argument("--max-new-tokens", type=types.positive_int, default=4096, help="the most tokens one answer may ask for")
    serve.add_argument("--header-timeout", type=types.positive_float, default=10,
                       help="drop a connection whose request headers take longer than this to arrive (s)")
    serve.add_argument("--max-connections", type=types.positive_int, default=256,
                       help="the most open connections; one more is answered 503 and closed")
    serve.add_argument("--refine-cache-mb", type=types.positive_float, default=2048,
                       help="memory for the SAM2 features of slices kept for refinement clicks, all sessions (MiB)")
    serve.add_argument("--served-model-name", default="CitrusV_8B",
                       help="the model name of the OpenAI-compatible endpoints (default: the reference's)")
    serve.add_argument("--min-pixels", type=int, default=None,
                       help="image-size budget of the 2D and chat routes, as ms-swift's MIN_PIXELS (default: $MIN_PIXELS, "
                            "else each task's own)")
    serve.add_argument("--max-pixels", type=int, default=None,
                       help="as --min-pixels, for MAX_PIXELS (the reference's Streamlit demo expects 1003520)")
    serve.add_argument("--allow-local-images", action="append", default=[], metavar="DIR",
                       help="let chat requests name image files inside DIR (repeatable); by default no file is read")
    serve.add_argument("--chat-image-tags", choices=["text", "swift"], default="text",
                       help="chat requests with an image part and an <image> typed in the text: 'text' (default) puts "
                            "the image at the typed tag; 'swift' keeps ms-swift's rule (image at the part, tag as text)")
    serve.add_argument("--reference-compatible", action="store_true",
                       help="run the reference's demo clients unchanged: port 8000, ANY bearer token accepted, loopback "
                            "only (see the README before using it)")
    serve.add_argument("--exit-with-parent", action="store_true", help=EXIT_WITH_PARENT_HELP)
    serve.add_argument("--no-download", action="store_true",
                       help="never download the model: one not on this machine fails at once (see `citrusv download`)")
    serve.set_defaults(handler=cmd_serve)

    batch = sub.add_parser("batch", help="a folder of volumes: every case segmented (detected, reported), resumable; "
                                          "--engine ray for a cluster")
    add_model_options(batch)
    from .batch.options import add_batch_options

    add_batch_options(batch)
    batch.add_argument("--exit-with-parent", action="store_true", help=EXIT_WITH_PARENT_HELP)
    batch.set_defaults(handler=cmd_batch)

    tiny = sub.add_parser("make-tiny-checkpoint", help="write a random tiny model in the release format")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--legacy-key-names", action="store_true",
                      help="save weights under the transformers-4.4x names (mllm.model.layers.*, mllm.visual.*)")
    tiny.add_argument("--heads", choices=["default", "object-absent", "faint-masks"], default="default",
                      help="default: object score 'present', clear masks; object-absent: object score 'absent' "
                           "with clear masks; faint-masks: object score 'present' with undecided masks (tests)")
    tiny.set_defaults(handler=cmd_make_tiny_checkpoint)

    demo = sub.add_parser("demo", help="the main job on the sample chest CT: segment a target, write the results")
    add_model_options(demo)
    demo.add_argument("--prompt", default=DEFAULT_DEMO_PROMPT)
    demo.add_argument("--volume", default=None, help="a volume file instead of the bundled sample CT")
    demo.add_argument("--out", default="citrusv-demo-output", help="output folder")
    demo.add_argument("--mode", choices=["propagate", "per-slice", "hybrid"], default="propagate")
    demo.add_argument("--slice-range", default=None, type=types.slice_range, help="FIRST:LAST slice indices to work on")
    demo.set_defaults(handler=cmd_demo, window="auto", axis="axial", max_pixels=None, max_new_tokens=1024,
                      max_voxels=1024**3, batch_size=4, dicom_out=None, on_bad_dicom="refuse")

    from .refine_cli import add_refine_parser

    add_refine_parser(sub, add_model_options)
    from .download_cli import add_parser as add_download_parser
    add_download_parser(sub)

    bench = sub.add_parser("bench", help="performance figures per stage and end to end (JSON + table)")
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
    return parser


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
