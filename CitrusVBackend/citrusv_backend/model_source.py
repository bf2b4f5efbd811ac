"""Which model a command runs — `--model`, else $CITRUSV_MODEL, else the released checkpoint; `tiny` is a random
tiny checkpoint made once in the user cache — and opening it as an engine."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .model.hub import RELEASED_MODEL_ID

DEFAULT_MODEL = RELEASED_MODEL_ID
MODEL_ENV = "CITRUSV_MODEL"
TINY_ALIAS = "tiny"


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
        print(f"making a random tiny checkpoint in {target} (once) ...", file=sys.stderr, flush=True)
        make_tiny_checkpoint(target)
    return str(target)


def open_engine(model: str, device: str | None, dtype: str | None, attention: str | None):
    """The model of a command. transformers' own logging is silenced for the command: it warns about the
    `citrus_v` folder while nothing is wrong, and our progress lines say what happens."""
    from transformers.utils import logging as transformers_logging

    from .inference.engine import CitrusVEngine

    transformers_logging.set_verbosity_error()
    return CitrusVEngine.load(model, device=device, dtype=dtype, attention=attention)


def load_engine(args):
    """The engine of a command's --model/--device/--dtype/--attention, with progress lines on stderr."""
    model = resolve_model_argument(args.model)
    print(f"loading model {model} ...", file=sys.stderr, flush=True)
    engine = open_engine(model, args.device, args.dtype, args.attention)
    info = engine.loaded.describe()
    print(f"  loaded in {info['load_seconds']:.1f} s on {info['device']} ({info['dtype']}, {info['attention']} "
          f"attention)", file=sys.stderr, flush=True)
    return engine
