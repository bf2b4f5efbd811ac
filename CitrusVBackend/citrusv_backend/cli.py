"""The `citrusv` command line.

Subcommands: `infer` (one image, one prompt), `segment` / `detect` / `report` (a whole volume), `batch`
(a folder of volumes, locally or on Ray), `serve` (the HTTP service), `bench` (performance figures), `eval`
(Dice, HD95, volume error against a ground truth), `serve` (the backend HTTP service), `make-tiny-checkpoint`
(a random tiny model in the release format), `demo` (the main job on the bundled sample CT). User errors print one line and exit with 2;
anything unexpected keeps its traceback and exits with 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .demo import DEFAULT_DEMO_PROMPT
from .errors import CitrusVError

DEFAULT_MODEL = "jdh-algo/Citrus-V-8B-v1.0"
MODEL_ENV = "CITRUSV_MODEL"
TINY_ALIAS = "tiny"
BANNER_WIDTH = 96


def say(message: str) -> None:
    """Progress for people: stderr, so stdout stays clean for machine-readable output."""
    print(message, file=sys.stderr, flush=True)


def random_weights_banner(checkpoint: Path) -> str:
    line = "!" * BANNER_WIDTH
    return (f"{line}\n!!  RANDOM WEIGHTS — the model in {checkpoint} is a tiny random test model.\n"
            f"!!  Every answer, mask and box below is NOISE. Use it to test the software, never to read images.\n"
            f"!!  Real results need the released weights: --model {DEFAULT_MODEL}\n{line}")


def tiny_checkpoint_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    # "-2": tiny models made before their mask logits were scaled to a trained decoder's range show nothing.
    return root / "citrusv" / "tiny-checkpoint-2"


def resolve_model_argument(model: str | None) -> str:
    """`tiny` means a random tiny checkpoint in the user cache (made once); anything else is passed on."""
    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if model != TINY_ALIAS:
        return model
    from .model.tiny import make_tiny_checkpoint

    target = tiny_checkpoint_cache()
    if not (target / "config.json").is_file():
        say(f"making a random tiny checkpoint in {target} (once) ...")
        make_tiny_checkpoint(target)
    return str(target)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help=f"checkpoint folder or hub id (default: ${MODEL_ENV} or {DEFAULT_MODEL}); "
                             f"'{TINY_ALIAS}' = a random tiny model for smoke tests")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--attention", default="auto", help="auto (flash_attention_2 if installed on CUDA, else sdpa)")


def open_engine(model: str, device: str | None, dtype: str | None, attention: str | None):
    """The model of a command. transformers' own logging is silenced for the command: it warns about the
    `citrus_v` folder while nothing is wrong, and our progress lines say what happens."""
    from transformers.utils import logging as transformers_logging

    from .inference.engine import CitrusVEngine

    transformers_logging.set_verbosity_error()
    return CitrusVEngine.load(model, device=device, dtype=dtype, attention=attention)


def load_engine(args):
    model = resolve_model_argument(args.model)
    say(f"loading model {model} ...")
    engine = open_engine(model, args.device, args.dtype, args.attention)
    info = engine.loaded.describe()
    say(f"  loaded in {info['load_seconds']:.1f} s on {info['device']} ({info['dtype']}, {info['attention']} attention)")
    return engine


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
    from .inference.images import load_image

    image = load_image(args.image)  # a bad image fails before minutes of model loading
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

class ProgressPrinter:
    """One line per stage change, then at most one update a second: readable in a terminal and in logs."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.stage = None
        self.last = 0.0

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        if stage != self.stage or now - self.last >= self.interval or fraction >= 1.0:
            say(f"  [{stage}] {fraction * 100:5.1f}%  {message}")
            self.stage, self.last = stage, now


def parse_slice_range(text: str | None):
    if not text:
        return None
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise CitrusVError(f"--slice-range {text!r}: use FIRST:LAST (slice indices, LAST excluded)") from None
    return first, last


def volume_options(args):
    from .volume.pipeline import VolumeOptions

    return VolumeOptions(mode=getattr(args, "mode", "propagate"), window=args.window, plane=args.axis,
                         slice_range=parse_slice_range(args.slice_range), max_pixels=args.max_pixels,
                         fill_holes=not getattr(args, "no_fill_holes", False),
                         largest_component=getattr(args, "largest_component", False),
                         max_new_tokens=args.max_new_tokens, batch_size=getattr(args, "batch_size", 4),
                         presence=getattr(args, "presence", "mask"),
                         object_score_suppression=getattr(args, "object_score_suppression", False),
                         answer_mode=getattr(args, "answer_mode", "forced"),
                         mask_upsampling=getattr(args, "mask_upsampling", "bilinear"),
                         report_image=getattr(args, "report_image", "slices"))


def check_not_inside_input(volume: Path, out: Path) -> None:
    """A DICOM folder is never written into: a SEG among its files would make it a folder of two series."""
    source, target = volume.resolve(), out.resolve()
    if source.is_dir() and (target == source or target.is_relative_to(source)):
        raise CitrusVError(f"--out {out} is inside the input folder {volume}; the input is never written, choose an "
                           f"output folder outside it")


def cmd_volume_task(args) -> int:
    from .volume.dicom_out import check_dicom_possible, wants_dicom
    from .volume.io import read_volume
    from .volume.outputs import write_outputs
    from .volume.pipeline import VolumePipeline

    check_not_inside_input(Path(args.volume), Path(args.out))
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
        return open_engine(resolve_model_argument(args.model), args.device, args.dtype, args.attention)

    return serve(ServeSettings.from_args(args), load_engine=load)


# ---------------------------------------------------------------------------------------------- batch

def cmd_batch(args) -> int:
    """A folder of volumes, resumable; exit 0 all done, 1 some case failed (see citrusv_backend.batch.runner)."""
    from .batch.runner import run_batch

    return run_batch(args)


# ---------------------------------------------------------------------------------------------- bench

def cmd_bench(args) -> int:
    from .benchmark import BenchSettings, format_table, run_benchmarks, write_report

    settings = BenchSettings.full() if args.full else BenchSettings()
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


def add_volume_options(parser, segment_options: bool = True, report_options: bool = True) -> None:
    """The options of the volume pipeline, shared by segment / detect / report and batch."""
    if segment_options:
        parser.add_argument("--mode", choices=["propagate", "per-slice", "hybrid"], default="propagate",
                            help="propagate: key slice + SAM2 memory (default); per-slice: every slice alone; "
                                 "hybrid: propagation re-anchored by Citrus-V where it loses the target")
        parser.add_argument("--largest-component", action="store_true", help="keep only the largest 3D component")
        parser.add_argument("--no-fill-holes", action="store_true", help="keep holes inside masks")
        parser.add_argument("--presence", choices=["mask", "object-score", "both"], default="mask",
                            help="how a slice is judged to show the target: mask (its mask logits, what Citrus-V "
                                 "trained; default), object-score (SAM2's untrained object-score head), both")
        parser.add_argument("--object-score-suppression", action="store_true",
                            help="let SAM2's propagation blank slices whose object score is negative (SAM2's own "
                                 "behaviour; off by default: Citrus-V never trained that head)")
        parser.add_argument("--answer-mode", choices=["forced", "free"], default="forced",
                            help="forced: 'Sure, it is [SEG].' on every slice (default); free: the model writes its "
                                 "own answer on the key slice, and that answer (if it has a [SEG]) is forced on the rest")
        parser.add_argument("--mask-upsampling", choices=["bilinear", "nearest"], default="bilinear",
                            help="bilinear: smooth, upsample logits (default); nearest: the reference's exact resize")
    if report_options:
        parser.add_argument("--report-image", choices=["slices", "projection"], default="slices",
                            help="report from representative slices (default) or from a radiograph-like frontal "
                                 "projection of the CT (closer to the chest X-rays the report prompt was trained on)")
    parser.add_argument("--window", default="auto",
                        help="auto/training: each volume normalised as the training data (its 0.5-99.5th "
                             "percentiles, default); clinical: a CT preset per target from its words; soft_tissue, "
                             "lung, bone, brain, liver, or CENTER,WIDTH")
    parser.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default="axial", help="slice plane")
    parser.add_argument("--slice-range", default=None, help="FIRST:LAST slice indices to work on (LAST excluded)")
    parser.add_argument("--max-pixels", type=int, default=None, help="Qwen resize upper bound per slice")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4, help="slices per batched prefill / SAM2 encoding")
    parser.add_argument("--max-voxels", type=int, default=1024**3, help="refuse larger volumes (memory budget)")
    parser.add_argument("--dicom-out", action=argparse.BooleanOptionalAction, default=None,
                        help="also write a DICOM SEG and a TID 1500 SR (default: only for a DICOM series input; "
                             "for other inputs they get a new study without patient identity)")
    parser.add_argument("--on-bad-dicom", choices=["refuse", "skip"], default="refuse",
                        help="a DICOM series with unreadable files, mixed orientations or stray images: refuse it "
                             "(default) or leave those files out with a warning (gaps and uneven spacing are always "
                             "refused)")


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
    infer.add_argument("--min-pixels", type=int, default=None, help="Qwen resize lower bound (default per task)")
    infer.add_argument("--max-pixels", type=int, default=None, help="Qwen resize upper bound (segment 65535, others 1003520)")
    infer.add_argument("--max-new-tokens", type=int, default=1024)
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
    serve.add_argument("--port", type=int, default=None,
                       help="TCP port; 0 (default) picks a free one (see the ready line); 8000 with --reference-compatible")
    serve.add_argument("--token-file", default=None,
                       help="file holding the bearer token (else $CITRUSV_TOKEN, else a random one written to a 0600 file)")
    serve.add_argument("--max-upload-mb", type=float, default=1024, help="largest volume upload accepted (MiB)")
    serve.add_argument("--max-voxels", type=int, default=1024**3, help="largest volume accepted (voxels)")
    serve.add_argument("--volume-budget-mb", type=float, default=4096,
                       help="memory for uploaded volumes; the least recently used are evicted beyond it (MiB)")
    serve.add_argument("--volume-ttl", type=float, default=3600, help="evict a volume unused for this long (s)")
    serve.add_argument("--result-ttl", type=float, default=3600, help="keep a finished job's result this long (s)")
    serve.add_argument("--request-timeout", type=float, default=600,
                       help="longest wait for a synchronous 2D or chat request (s)")
    serve.add_argument("--read-timeout", type=float, default=60,
                       help="drop a request whose body stalls this long (s)")
    serve.add_argument("--max-new-tokens", type=int, default=4096, help="the most tokens one answer may ask for")
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
    demo.add_argument("--slice-range", default=None, help="FIRST:LAST slice indices to work on")
    demo.set_defaults(handler=cmd_demo, window="auto", axis="axial", max_pixels=None, max_new_tokens=1024,
                      max_voxels=1024**3, batch_size=4, dicom_out=None, on_bad_dicom="refuse")

    bench = sub.add_parser("bench", help="performance figures per stage and end to end (JSON + table)")
    add_model_options(bench)
    bench.add_argument("--full-size-random", action="store_true",
                       help="the exact 8B architecture with random bf16 weights, built in memory (needs a GPU)")
    bench.add_argument("--full", action="store_true",
                       help="full measurement: 512x512x200 synthetic CT, 64 decoded tokens, 5 repeats (default: quick)")
    bench.add_argument("--repeats", type=int, default=None)
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


if __name__ == "__main__":
    sys.exit(main())
