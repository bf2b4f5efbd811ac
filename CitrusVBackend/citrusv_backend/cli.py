"""The `citrusv` command line.

Subcommands: `infer` (one image, one prompt), `make-tiny-checkpoint` (a random tiny model in the release
format), `demo` (the main job on the bundled sample CT). User errors print one line and exit with 2;
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

from . import __version__
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
    return root / "citrusv" / "tiny-checkpoint"


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


def load_engine(args):
    from transformers.utils import logging as transformers_logging

    from .inference.engine import CitrusVEngine

    transformers_logging.set_verbosity_error()
    model = resolve_model_argument(args.model)
    say(f"loading model {model} ...")
    engine = CitrusVEngine.load(model, device=args.device, dtype=args.dtype, attention=args.attention)
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


# ---------------------------------------------------------------------------------------------- tiny

def cmd_make_tiny_checkpoint(args) -> int:
    from .model.tiny import make_tiny_checkpoint

    started = time.monotonic()
    directory = make_tiny_checkpoint(Path(args.directory), seed=args.seed, legacy_names=args.legacy_key_names)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) / 1e6
    say(f"wrote a RANDOM tiny Citrus-V checkpoint to {directory} ({size:.0f} MB, {time.monotonic() - started:.1f} s); "
        f"its outputs are noise — for tests and smoke runs only")
    return 0


# ---------------------------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from .demo import run_demo

    engine = load_engine(args)
    return run_demo(engine, prompt=args.prompt, out_dir=Path(args.out), volume=args.volume, say=say)


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

    tiny = sub.add_parser("make-tiny-checkpoint", help="write a random tiny model in the release format")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--legacy-key-names", action="store_true",
                      help="save weights under the transformers-4.4x names (mllm.model.layers.*, mllm.visual.*)")
    tiny.set_defaults(handler=cmd_make_tiny_checkpoint)

    demo = sub.add_parser("demo", help="the main job on the sample chest CT: segment a target, write the results")
    add_model_options(demo)
    demo.add_argument("--prompt", default="Please help segment the left lung in this scan.")
    demo.add_argument("--volume", default=None, help="a volume file instead of the bundled sample CT")
    demo.add_argument("--out", default="citrusv-demo-output", help="output folder")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
