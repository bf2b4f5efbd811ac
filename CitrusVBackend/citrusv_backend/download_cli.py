"""`citrusv download [MODEL] [--to DIR]`: the weights as a step of their own, one JSON line per event on stdout.

  {"event": "download", "file", "bytes_done", "bytes_total", "rate_bps", "eta_s"}   (the whole download's bytes)
  {"event": "downloaded", "path", "bytes_total"}                                       exit 0
  {"event": "failed", "reason", "message", ...}                                        exit 2
`--check` downloads nothing: one `{"event": "check", "need": ..., "machine": ..., "weights": ..., "device", "fits",
"advice"}` line (preflight.py).
A stop signal (the panel's Cancel) ends it with `failed`/`cancelled`; what was downloaded stays and the next run
continues it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CitrusVError, failure_event
from .model.hub import RELEASED_MODEL_ID, is_hub_id
from .signals import SignalExit, exit_on_signals


def add_parser(sub) -> None:
    parser = sub.add_parser("download", help="download the model's weights (JSON progress lines; resumable)")
    parser.add_argument("model", nargs="?", default=RELEASED_MODEL_ID, help=f"hub id (default {RELEASED_MODEL_ID})")
    parser.add_argument("--to", default=None, metavar="DIR",
                        help="a folder of your choice (default: the Hugging Face cache, $HF_HOME)")
    parser.add_argument("--check", action="store_true",
                        help="download nothing: print what the model needs (GPU memory, RAM, disk) beside what this "
                             "machine has (one JSON line)")
    parser.set_defaults(handler=cmd_download)


def _emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def cmd_download(args) -> int:
    try:
        with exit_on_signals():
            if args.check:
                from .preflight import preflight

                _emit(preflight(args.model, Path(args.to).expanduser() if args.to else None))
                return 0
            return _download(args)
    except CitrusVError as error:
        _emit(failure_event(error))
    except SignalExit as stopped:
        _emit({"event": "failed", "reason": "cancelled",
               "message": f"The download was stopped ({stopped}); what it fetched is kept and the next download "
                          f"continues from there."})
    except Exception as error:  # unexpected: the launcher still gets its line; the traceback follows on stderr
        _emit(failure_event(error))
        raise
    return 2


def _download(args) -> int:
    from .hub_download import download, plan_download

    if not is_hub_id(args.model):
        raise CitrusVError(f"{args.model}: not a hub id like {RELEASED_MODEL_ID} (a folder on this machine needs "
                           f"no download: pass it with --model, or choose it with Browse… in the Slicer module)")
    plan = plan_download(args.model, to=Path(args.to).expanduser().resolve() if args.to else None)
    path = download(plan, _emit)
    _emit({"event": "downloaded", "path": str(path), "bytes_total": plan.bytes_total})
    return 0

