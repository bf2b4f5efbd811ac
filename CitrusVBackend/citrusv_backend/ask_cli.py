"""`citrusv ask VOLUME --prompt ... --slice N`: one turn of a conversation about a volume
(volume/tasks/conversation.py).

Prints the answer on stdout; writes the turn's segments ([SEG] masks, optionally propagated) and ROIs (boxes) like
`citrusv segment` does (volume/outputs/files.py), and the conversation: `--conversation FILE` continues the saved
conversation in FILE (or starts it there) and saves it with the new turn; its Markdown beside the outputs.
Without --slice the question is a text-only follow-up about the conversation's latest image.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def roi_argument(text: str) -> dict:
    """--roi I0,J0,K0:I1,J1,K1 (voxel indices, both corners included)."""
    try:
        low, high = ([int(v) for v in corner.split(",")] for corner in text.split(":"))
        if len(low) != 3 or len(high) != 3 or min(low + high) < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use I0,J0,K0:I1,J1,K1 (voxel indices, corners included)") from None
    return {"ijk_min": low, "ijk_max": high}


def add_parser(sub, add_model_options) -> None:
    from . import option_types as types
    from .volume.arguments import add_volume_options

    ask = sub.add_parser("ask", help="ask about a slice of a volume (a conversation: --conversation FILE continues "
                                     "it); [SEG] in the answer become segments, boxes become ROIs")
    ask.add_argument("volume", help="the volume (NIfTI, NRRD, MHA/MHD or a DICOM folder)")
    add_model_options(ask)
    ask.add_argument("--prompt", required=True, help="the question, e.g. 'Is there a nodule in the left lung?'")
    ask.add_argument("--slice", type=types.non_negative_int, default=None,
                     help="the slice index along --axis to show the model (omit: a text-only follow-up)")
    ask.add_argument("--roi", type=roi_argument, default=None,
                     help="I0,J0,K0:I1,J1,K1: show the model only the slice's crop inside this box of voxels")
    ask.add_argument("--propagate", action="store_true", help="carry each [SEG] mask through the volume (SAM2 memory)")
    ask.add_argument("--conversation", default=None,
                     help="JSON file of the conversation: continued when it exists, written with the new turn")
    ask.add_argument("--out", required=True, help="output folder (segments, ROIs, the conversation's Markdown)")
    add_volume_options(ask, task="ask", only=("window", "axis", "max_pixels", "max_new_tokens", "dicom_out"))
    ask.set_defaults(handler=cmd_ask)


def cmd_ask(args) -> int:
    from . import __version__
    from .console import random_weights_banner, say
    from .errors import CitrusVError
    from .model_source import load_engine
    from .paths import check_not_inside_input, writable_folder
    from .volume.tasks.conversation import (Conversation, ConversationRunner, TurnRequest, check_turn,
                                            conversation_markdown)
    from .paths import write_text
    from .volume.input.io import read_volume
    from .volume.outputs.dicom_out import model_name
    from .volume.outputs.files import write_outputs

    check_not_inside_input(Path(args.volume), Path(args.out))
    writable_folder(args.out, create=False)
    volume = read_volume(args.volume, max_voxels=args.max_voxels, on_bad_dicom=args.on_bad_dicom)
    saved = Path(args.conversation) if args.conversation else None
    if saved is not None and saved.exists():
        try:
            conversation = Conversation.from_dict(json.loads(saved.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise CitrusVError(f"--conversation {saved}: not a readable conversation file ({error})") from None
        conversation.check_volume(volume)
    else:
        conversation = Conversation.new(volume, title=volume.name)
    request = TurnRequest(prompt=args.prompt, slice=args.slice, axis=args.axis, window=args.window, roi=args.roi,
                          propagate=args.propagate, max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels)
    check_turn(conversation, volume, request, args.max_new_tokens)  # a bad question fails before the model loads
    engine = load_engine(args)
    runner = ConversationRunner(engine, model_name(engine.loaded.describe()),
                                progress=lambda stage, fraction, message: None)
    outcome = runner.ask(conversation, volume, request)
    turn = outcome.turn
    print(turn.answer, flush=True)
    out = Path(args.out)
    outcome.result.case = f"{volume.name}_turn{turn.number}"
    files = write_outputs(outcome.result, out, extra={"model": engine.loaded.describe(), "version": __version__,
                                                       "input": str(args.volume), "turn": turn.__dict__},
                          dicom=args.dicom_out)
    files["conversation_md"] = write_text(out / f"{volume.name}_conversation.md", conversation_markdown(conversation))
    saved = saved or out / f"{volume.name}_conversation.json"
    files["conversation"] = write_text(saved, json.dumps(conversation.to_dict(), indent=2) + "\n")
    if turn.random_weights:
        say(random_weights_banner(engine.loaded.checkpoint_dir))
    if turn.experimental:
        say(f"note: {turn.experimental}")
    where = f"{turn.axis} slice {turn.slice}" if turn.slice is not None else \
        f"text only (masks and boxes on turn {turn.masks_on_turn}'s image)" if turn.masks_on_turn else "text only"
    say(f"turn {turn.number} of conversation {conversation.id} ({where}, {conversation.tokens:,} of "
        f"{conversation.budget_tokens:,} tokens)")
    for segment in turn.segments:
        say(f"segment {segment['label']} '{segment['name']}': {segment['voxels']} voxels on slices "
            f"{segment['slices'][0] if segment['slices'] else '-'}..{segment['slices'][-1] if segment['slices'] else '-'}")
    for box in turn.boxes:
        say(f"ROI '{box['label']}': ijk {box['ijk_min']}..{box['ijk_max']}")
    for problem in turn.problems[:20]:
        say(f"note: {problem}")
    for kind, path in files.items():
        say(f"  {kind:16s} {path}")
    return 0
