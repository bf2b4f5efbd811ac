"""The options of `citrusv batch` (kept here so the command's parser block in cli.py stays one call)."""
from __future__ import annotations

import argparse

from .. import option_types as types
from ..volume.arguments import add_volume_options


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", help="folder of NIfTI / NRRD / MHA / MHD volumes (and DICOM series folders); "
                                          "only read, never written")
    parser.add_argument("--out", required=True, help="output folder: OUT/<case>/, manifest.jsonl, summary.csv, "
                                                     "index.html (must not be inside INPUT_DIR)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="what to segment / detect, for every case; repeat for several targets")
    parser.add_argument("--prompts-file", default=None,
                        help="CSV (columns: case|path|folder, prompt) or YAML ({case or folder: prompt(s)}): "
                             "prompts per case or per folder; --prompt is the fallback")
    parser.add_argument("--task", choices=["segment", "detect", "report"], default="segment")
    parser.add_argument("--pattern", default="*", help="file-name glob, e.g. '*_0000.nii.gz' (default: every volume)")
    parser.add_argument("--recursive", action="store_true", help="look into subfolders at any depth")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip cases done before with the same input checksum, prompt, options and model "
                             "(default); --no-resume redoes every case")
    parser.add_argument("--workers", type=types.non_negative_int, default=2,
                        help="processes reading volumes ahead of the model (0: read in the main process)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this machine, one model per GPU; ray: model actors on a Ray cluster")
    ray = parser.add_argument_group("Ray engine")
    ray.add_argument("--ray-address", default=None,
                     help="cluster to join, e.g. 'auto' or HEAD_IP:6379 (default: $RAY_ADDRESS, else a local Ray)")
    ray.add_argument("--ray-actors", type=types.positive_int, default=None,
                     help="model actors (default: one per GPU of the cluster; 1 without GPUs)")
    ray.add_argument("--ray-cpus-per-actor", type=types.positive_float, default=1.0, help="CPUs reserved per actor (default 1)")
    ray.add_argument("--ray-gpus-per-actor", type=types.non_negative_float, default=None,
                     help="GPUs per actor (default 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--ray-ship-inputs", action="store_true",
                     help="send inputs through Ray's object store instead of reading them from shared storage")

    add_volume_options(parser.add_argument_group("volume options (as for `citrusv segment`)"))
