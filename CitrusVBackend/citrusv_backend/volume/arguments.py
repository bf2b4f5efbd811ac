"""The volume pipeline's command-line options, derived from `VolumeOptions` and `ReadOptions` (volume/options.py),
shared by `citrusv segment / detect / report / demo / refine` and `citrusv batch`. Light on imports: the command
line is built from it before anything decides whether torch is needed."""
from __future__ import annotations

from ..option_fields import add_options, from_args
from .options import ReadOptions, VolumeOptions


def volume_options(args) -> VolumeOptions:
    return from_args(VolumeOptions, args)


def read_options(args) -> ReadOptions:
    return from_args(ReadOptions, args)


def add_volume_options(container, task: str | None = None, only=None, advanced=None, read: bool = True) -> None:
    """The options of the volume pipeline that concern `task` (None: every task, as the batch offers them),
    or `only` those; advanced ones into `advanced` (default: the parser's own advanced group, when it has one)."""
    if advanced is None and hasattr(container, "advanced_group"):
        advanced = container.advanced_group()
    add_options(container, VolumeOptions, only=only, task=task, advanced=advanced)
    if read:
        add_options(container, ReadOptions, advanced=advanced)
