"""The user's command line: `citrusv --help` lists what a user runs, not the developer tools; a command's
`--help` shows its everyday options and names its advanced group, `--help-all` lists that group too; the old
spellings of the developer tools still parse."""
from __future__ import annotations

import argparse

import pytest

from citrusv_backend.cli import build_parser, cmd_bench, cmd_make_tiny_checkpoint

pytestmark = pytest.mark.unit

USER_COMMANDS = ["infer", "segment", "detect", "report", "refine", "ask", "batch", "serve", "eval", "demo", "download"]
VISIBLE_OPTIONS_LIMIT = 100  # issue 20: at most 100 visible options across the user commands


def _commands(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_the_main_help_lists_the_user_commands_only(capsys):
    parser = build_parser()
    assert [choice.dest for choice in _commands(parser)._choices_actions] == USER_COMMANDS
    text = parser.format_help()
    assert "dev" not in text.split() and "make-tiny-checkpoint" not in text and "bench" not in text


def test_help_shows_the_everyday_options_and_help_all_the_advanced_ones(capsys):
    segment = _commands(build_parser()).choices["segment"]
    short, full = segment.format_help(), segment.format_help(advanced=True)
    assert "--mode" in short and "--object-score-suppression" not in short and "--presence" not in short
    assert "advanced:" in short and "citrusv segment --help-all" in short
    assert "--object-score-suppression" in full and "--presence" in full and "--device" in full
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["segment", "--help-all"])
    assert stopped.value.code == 0 and "--answer-mode" in capsys.readouterr().out


def test_the_visible_options_stay_few():
    parser = build_parser()
    counts = {name: sum(1 + isinstance(a, argparse.BooleanOptionalAction)
                        for a in _commands(parser).choices[name].shown_actions() if a.option_strings)
              for name in USER_COMMANDS}
    assert sum(counts.values()) <= VISIBLE_OPTIONS_LIMIT, counts


def test_developer_tools_live_under_dev_and_their_old_spellings_still_parse(tmp_path):
    parser = build_parser()
    for argv in (["dev", "make-tiny-checkpoint", str(tmp_path), "--heads", "faint-masks"],
                 ["make-tiny-checkpoint", str(tmp_path), "--heads", "faint-masks"]):
        args = parser.parse_args(argv)
        assert args.handler is cmd_make_tiny_checkpoint and args.heads == "faint-masks"
    for argv in (["dev", "bench", "--full-size-random", "--host"], ["bench", "--full-size-random", "--host"]):
        args = parser.parse_args(argv)
        assert args.handler is cmd_bench and args.full_size_random and args.host
