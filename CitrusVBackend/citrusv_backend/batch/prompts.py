"""Prompts per case: `--prompt` for all, or a CSV / YAML file per case or per folder.

CSV: a header with `prompt` and one key column (`case`, `path` or `folder`); one row per prompt, so a key
may appear on several rows. YAML: a mapping `key: prompt` or `key: [prompt, ...]`. A key names a case by its
id, its path relative to INPUT_DIR, or its file name; or a folder relative to INPUT_DIR (every case below it;
`.` is INPUT_DIR itself). The most specific key wins: case id or path, then file name, then the deepest
folder, then `--prompt`.

Several prompts for one case are several targets of one run: "liver" and "segment the spleen" become
"segment liver; spleen", one segment per target, exactly as the volume pipeline does for one prompt.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path, PurePosixPath

from ..errors import InputError
from ..volume.tasks.targets import parse_targets
from .discovery import CaseInput

KEY_COLUMNS = ("case", "path", "folder")


def load_prompts_file(path: Path) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--prompts-file {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = _read_csv(path)
    elif suffix in (".yaml", ".yml"):
        table = _read_yaml(path)
    else:
        raise InputError(f"--prompts-file {path.name}: use a .csv or .yaml file")
    if not table:
        raise InputError(f"--prompts-file {path.name}: no prompts in it")
    return table


def _read_csv(path: Path) -> dict[str, list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        key = next((c for c in KEY_COLUMNS if c in columns), None)
        if "prompt" not in columns or key is None:
            raise InputError(f"--prompts-file {path.name}: needs a 'prompt' column and one of "
                             f"{', '.join(KEY_COLUMNS)} (found: {', '.join(columns) or 'no header'})")
        table: dict[str, list[str]] = defaultdict(list)
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if row.get(key) and row.get("prompt"):
                table[_normalise_key(row[key])].append(row["prompt"])
    return dict(table)


def _read_yaml(path: Path) -> dict[str, list[str]]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise InputError(f"--prompts-file {path.name}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise InputError(f"--prompts-file {path.name}: expected a mapping 'case or folder: prompt(s)'")
    table = {}
    for key, value in data.items():
        prompts = [value] if isinstance(value, str) else value
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise InputError(f"--prompts-file {path.name}: {key!r} must map to a prompt or a list of prompts")
        table[_normalise_key(str(key))] = [p.strip() for p in prompts]
    return table


def _normalise_key(key: str) -> str:
    key = key.strip().replace("\\", "/").strip("/")
    return key or "."


def prompts_for(case: CaseInput, table: dict[str, list[str]], default: list[str]) -> list[str]:
    relative = PurePosixPath(case.relative)
    for key in (case.case, case.relative, relative.name):
        if key in table:
            return table[key]
    for folder in relative.parents:  # deepest first; the last one is "."
        if str(folder) in table:
            return table[str(folder)]
    return default


def unused_keys(table: dict[str, list[str]], cases: list[CaseInput]) -> list[str]:
    """Keys of the prompts file that name no case (most likely a typo)."""
    used = set()
    for case in cases:
        relative = PurePosixPath(case.relative)
        used |= {case.case, case.relative, relative.name} | {str(p) for p in relative.parents}
    return sorted(set(table) - used)


def combine_prompts(prompts: list[str], task: str) -> str:
    """One prompt for the pipeline; several are several targets of a segmentation."""
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if len(prompts) <= 1:
        return prompts[0] if prompts else ""
    if task != "segment":
        raise InputError(f"{len(prompts)} prompts for one case: the {task} task takes one prompt per case")
    names = [target.name for prompt in prompts for target in parse_targets(prompt)]
    return "segment " + "; ".join(dict.fromkeys(names))
