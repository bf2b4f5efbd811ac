"""The options of `citrusv batch`, declared once (`BatchOptions`; the volume options are `VolumeOptions`'), and
the command's parser block built from them, so cli.py's block stays one call."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..option_fields import add_options, option
from ..volume.arguments import add_volume_options
from ..volume.options import TASKS


@dataclass
class BatchOptions:
    prompt: tuple[str, ...] = option((), "what to segment / detect, for every case; repeat for several targets",
                                     append=True)
    prompts_file: str | None = option(None, "CSV (columns: case|path|folder, prompt) or YAML ({case or folder: "
                                             "prompt(s)}): prompts per case or per folder; --prompt is the fallback")
    task: str = option("segment", "what each case gets", choices=TASKS)
    pattern: str = option("*", "file-name glob, e.g. '*_0000.nii.gz' (default: every volume)")
    recursive: bool = option(False, "look into subfolders at any depth")
    resume: bool = option(True, "skip cases done before with the same input checksum, prompt, options and model "
                                "(default); --no-resume redoes every case", negatable=True)
    workers: int = option(2, "processes reading volumes ahead of the model (0: read in the main process)", ge=0,
                          advanced=True)
    engine: str = option("local", "local: this machine, one model per GPU; ray: model actors on a Ray cluster "
                                  "(its options: --help-all)", choices=("local", "ray"))
    ray_address: str | None = option(None, "Ray: cluster to join, e.g. 'auto' or HEAD_IP:6379 (default: "
                                           "$RAY_ADDRESS, else a local Ray)", advanced=True)
    ray_actors: int | None = option(None, "Ray: model actors (default: one per GPU of the cluster; 1 without GPUs)",
                                    ge=1, advanced=True)
    ray_cpus_per_actor: float = option(1.0, "Ray: CPUs reserved per actor (default 1)", ge=1e-9, advanced=True)
    ray_gpus_per_actor: float | None = option(None, "Ray: GPUs per actor (default 1 when the cluster has GPUs, "
                                                    "else 0)", ge=0, advanced=True)
    ray_ship_inputs: bool = option(False, "Ray: send inputs through Ray's object store instead of reading them "
                                          "from shared storage", advanced=True)


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", help="folder of NIfTI / NRRD / MHA / MHD volumes (and DICOM series folders); "
                                          "only read, never written")
    parser.add_argument("--out", required=True, help="output folder: OUT/<case>/, manifest.jsonl, summary.csv, "
                                                     "index.html (must not be inside INPUT_DIR)")
    advanced = parser.advanced_group()
    add_options(parser, BatchOptions, advanced=advanced)
    add_volume_options(parser.add_argument_group("volume options (as for `citrusv segment`)"), advanced=advanced)
