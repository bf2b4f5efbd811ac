"""The figures issue 20 asks for, before and after: where each of five options is declared, the options a user
sees in the subcommands' --help, the README's length and where its Slicer section starts, files per folder,
and the backend's import circles. Run from the repository root:

    .venv/bin/python bench/tools/vocabulary_figures.py [--lines] [--root DIR]
    (a JSON object on stdout; --lines: every declaring line on stderr; --root: measure that checkout instead,
    e.g. `git archive fa5b00a | tar -x -C /tmp/before`)

Declarations are counted on the product's source (the backend package and the Slicer module, tests excluded):
a line declares an option when it is a field of a dataclass / pydantic model / parameter node (`name:`), an
argparse option (`"--name"`), a hand-written mapping of it (`name=getattr(...)`, `name=self.name`,
`name=args.name`, `set_defaults(... name=...)`), or spells its choice list (mode: "per-slice" and "hybrid" on
one line; axis: "coronal" and "sagittal" on one line). Generated files (a "GENERATED" first line) are counted
apart: they are derived, not declared.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if "--root" in sys.argv:  # measure another checkout (e.g. `git archive fa5b00a` unpacked), with its own package
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path.insert(0, str(ROOT / "CitrusVBackend"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Testing" / "backend"))

from import_graph import import_circles, import_graph  # noqa: E402

OPTIONS = {  # the option -> its names on every surface (Python field, argparse flag stem, Slicer parameter)
    "mode": ["mode"],
    "axis": ["axis", "plane", "sliceAxis"],
    "slice_range": ["slice_range", "sliceRange"],
    "max_pixels": ["max_pixels", "maxPixels"],
    "object_score_suppression": ["object_score_suppression"],
}
CHOICE_LISTS = {"mode": ("per-slice", "hybrid"), "axis": ("coronal", "sagittal")}


def product_files() -> list[Path]:
    files = sorted((ROOT / "CitrusVBackend" / "citrusv_backend").rglob("*.py"))
    files += sorted((ROOT / "CitrusVSlicer").rglob("*.py")) + sorted((ROOT / "CitrusVSlicer").rglob("*.ui"))
    return [path for path in files if "Testing" not in path.parts]


def _declaration_patterns(names: list[str]) -> list[re.Pattern]:
    patterns = []
    for name in names:
        flag = name.replace("_", "-")
        # a field: not a function's parameter (a line ending in "," or holding ") ->"), unless it calls a field maker
        patterns += [re.compile(rf"^\s*{name}\s*:(?=.*=\s*(option|same_as|Field)\(|(?!.*(,|\) ->.*)$))"),
                     re.compile(rf"""["']--{flag}["']"""),                            # an argparse option
                     re.compile(rf"\b{name}\s*=\s*(getattr\(\w+,\s*[\"']|self\.|args\.|request\.|options\.|settings\.)"
                                rf"({'|'.join(names)})\b"),                              # a hand-written mapping
                     re.compile(rf"set_defaults\(.*\b{name}="),                        # parser defaults
                     re.compile(rf"<string>{name}</string>")]                          # a .ui parameter binding
    return patterns


def declarations(show: bool = False) -> dict:
    """Per option: lines that declare it, in how many files, and lines in generated files; `show` prints each."""
    found = {option: {"declared": 0, "files": set(), "generated": 0} for option in OPTIONS}
    for path in product_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        generated = bool(lines) and "GENERATED" in lines[0]
        for line in lines:
            for option, names in OPTIONS.items():
                hit = any(p.search(line) for p in _declaration_patterns(names))
                choices = CHOICE_LISTS.get(option)
                hit = hit or (choices is not None and all(f'"{c}"' in line or f"'{c}'" in line for c in choices))
                if hit and show:
                    print(f"{option}: {path.relative_to(ROOT)}: {line.strip()[:110]}", file=sys.stderr)
                if hit:
                    key = "generated" if generated else "declared"
                    found[option][key] += 1
                    if not generated:
                        found[option]["files"].add(str(path.relative_to(ROOT)))
    return {option: {"declared": v["declared"], "files": len(v["files"]), "generated": v["generated"]}
            for option, v in found.items()}


def _visible_subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = [choice.dest for choice in sub._choices_actions]  # what `citrusv --help` lists
    return {name: sub.choices[name] for name in listed}


def visible_options() -> dict:
    """Options each subcommand's `--help` shows, counted as the issue counted them: -h/--help included, a
    --flag/--no-flag pair as two."""
    from citrusv_backend.cli import build_parser

    counts = {}
    for name, parser in _visible_subcommands(build_parser()).items():
        shown = getattr(parser, "shown_actions", None)
        actions = shown() if shown else [a for a in parser._actions if a.help != argparse.SUPPRESS]
        counts[name] = sum(1 + isinstance(a, argparse.BooleanOptionalAction) for a in actions if a.option_strings)
    return {"total": sum(counts.values()), "per_subcommand": counts}


def readme() -> dict:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    slicer = next((n for n, line in enumerate(lines, 1) if line.startswith("## ") and "Slicer" in line), None)
    longest = max(len(line) for line in lines)
    return {"lines": len(lines), "slicer_section_line": slicer, "longest_line_chars": longest}


def files_per_folder() -> dict:
    folders = Counter()
    for base in (ROOT / "CitrusVBackend" / "citrusv_backend", ROOT / "CitrusVSlicer"):
        for path in base.rglob("*.py"):
            folders[str(path.parent.relative_to(ROOT))] += 1
    return dict(sorted(folders.items()))


def main() -> int:
    import citrusv_backend

    assert Path(citrusv_backend.__file__).is_relative_to(ROOT), f"measuring {citrusv_backend.__file__}, not {ROOT}"
    circles = import_circles(import_graph(ROOT / "CitrusVBackend" / "citrusv_backend"))
    figures = {"declarations": declarations(show="--lines" in sys.argv), "visible_cli_options": visible_options(), "readme": readme(),
               "files_per_folder": files_per_folder(), "import_circles": {"count": len(circles), "circles": circles}}
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
