"""The command-line options of the volume pipeline, shared by `citrusv segment / detect / report` and
`citrusv batch`, and the VolumeOptions they make. Light on imports: the command line is built from it before
anything decides whether torch is needed."""
from __future__ import annotations

import argparse

from .. import option_types as types
from ..errors import CitrusVError


def parse_slice_range(text: str | None):
    if not text:
        return None
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise CitrusVError(f"--slice-range {text!r}: use FIRST:LAST (slice indices, LAST excluded)") from None
    return first, last


def volume_options(args):
    from .pipeline import VolumeOptions

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
    parser.add_argument("--window", default="auto", type=types.window,
                        help="auto/training: each volume normalised as the training data (its 0.5-99.5th "
                             "percentiles, default); clinical: a CT preset per target from its words; soft_tissue, "
                             "lung, bone, brain, liver, or CENTER,WIDTH")
    parser.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default="axial", help="slice plane")
    parser.add_argument("--slice-range", default=None, type=types.slice_range, help="FIRST:LAST slice indices to work on (LAST excluded)")
    parser.add_argument("--max-pixels", type=types.pixel_count, default=None, help="Qwen resize upper bound per slice")
    parser.add_argument("--max-new-tokens", type=types.positive_int, default=1024)
    parser.add_argument("--batch-size", type=types.positive_int, default=4, help="slices per batched prefill / SAM2 encoding")
    parser.add_argument("--max-voxels", type=types.positive_int, default=1024**3, help="refuse larger volumes (memory budget)")
    parser.add_argument("--dicom-out", action=argparse.BooleanOptionalAction, default=None,
                        help="also write a DICOM SEG and a TID 1500 SR (default: only for a DICOM series input; "
                             "for other inputs they get a new study without patient identity)")
    parser.add_argument("--on-bad-dicom", choices=["refuse", "skip"], default="refuse",
                        help="a DICOM series with unreadable files, mixed orientations or stray images: refuse it "
                             "(default) or leave those files out with a warning (gaps and uneven spacing are always "
                             "refused)")
