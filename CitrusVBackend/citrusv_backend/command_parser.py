"""The parser class of every `citrusv` command: `--help` shows what a user needs; research and tuning switches
sit in the command's "advanced" group, which `--help` names with a count and `--help-all` lists (as vllm's
`--help=all`). Subcommands registered without a `help=` (the `dev` group, old spellings) are not listed."""
from __future__ import annotations

import argparse
import sys

ADVANCED_TITLE = "advanced"


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help(advanced=True)
        parser.exit()


class CommandParser(argparse.ArgumentParser):
    def advanced_group(self) -> argparse._ArgumentGroup:
        """This command's "advanced" group (made on first use, with the hidden --help-all that lists it)."""
        for group in self._action_groups:
            if getattr(group, "advanced", False):
                return group
        group = self.add_argument_group(ADVANCED_TITLE)
        group.advanced = True
        self.add_argument("--help-all", action=_HelpAll, help=argparse.SUPPRESS)
        return group

    def _groups(self, advanced: bool):
        return [group for group in self._action_groups if advanced or not getattr(group, "advanced", False)]

    def shown_actions(self, advanced: bool = False) -> list[argparse.Action]:
        """The actions `--help` (advanced: `--help-all`) lists."""
        return [action for group in self._groups(advanced) for action in group._group_actions
                if action.help is not argparse.SUPPRESS]

    def hidden_count(self) -> int:
        return len(self.shown_actions(True)) - len(self.shown_actions(False))

    def format_help(self, advanced: bool = False) -> str:
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self.shown_actions(advanced), self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        for group in self._action_groups:
            formatter.start_section(group.title)
            if getattr(group, "advanced", False) and not advanced:
                formatter.add_text(f"{self.hidden_count()} research and tuning options: {self.prog} --help-all")
            else:
                formatter.add_text(group.description)
                formatter.add_arguments(group._group_actions)
            formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()

    def print_help(self, file=None, advanced: bool = False) -> None:
        self._print_message(self.format_help(advanced), file or sys.stdout)
