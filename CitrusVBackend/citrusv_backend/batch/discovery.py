"""Which inputs of a folder are cases, and case ids that are safe folder names and unique.

A case is a volume file (NIfTI, NRRD, MHA/MHD) or a folder holding a DICOM series (files that carry the
`DICM` marker). Case ids come from the path relative to INPUT_DIR: separators become `__`, anything outside
`[A-Za-z0-9._-]` becomes `_`, so `a/scan.nii.gz` and `scan.nii.gz` are `a__scan` and `scan`. Ids that would
still clash (case-insensitively: some file systems fold case) or hit a name the batch uses itself get a short
hash of their relative path; an id never starts with a dot and never contains a separator, so
OUTPUT_DIR/<case> is always a direct child of OUTPUT_DIR.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..volume.input.dicom_series import has_dicom_marker
from ..volume.input.io import VOLUME_SUFFIXES, case_name

RESERVED_NAMES = {"manifest.jsonl", "summary.csv", "index.html", ".staging", ".lock"}
MAX_ID_LENGTH = 120
DICOM_PROBE_FILES = 4  # files per folder checked for the DICM marker
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class CaseInput:
    case: str          # safe, unique id: the output folder's name
    path: Path         # absolute path of the file or DICOM folder
    relative: str      # path relative to INPUT_DIR, with '/' separators
    kind: str          # "file" or "dicom"


def is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES)


def could_be_input(name: str) -> bool:
    """A name an input may have: a volume's, a DICOM file's, or none (DICOM files often have no suffix)."""
    return is_volume_file(name) or name.lower().endswith((".dcm", ".ima")) or "." not in name


def is_unreachable(path: Path) -> bool:
    """A link that loops, or an entry that cannot be looked at (not: one that does not exist)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


is_dicom_file = has_dicom_marker


def is_dicom_folder(folder: Path, names: list[str]) -> bool:
    candidates = [n for n in sorted(names) if not n.startswith(".") and not is_volume_file(n)][:DICOM_PROBE_FILES]
    return any(is_dicom_file(folder / n) for n in candidates if (folder / n).is_file())


def _walk(root: Path, recursive: bool):
    """(folder, file names) from `root` down; hidden entries and folder links skipped."""
    for folder, subfolders, files in os.walk(root, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        folder_path = Path(folder)
        yield folder_path, sorted(f for f in files if not f.startswith("."))
        if not recursive:
            # One level down still counts for DICOM series folders (a folder per series is the usual layout).
            for name in subfolders:
                sub = folder_path / name
                yield sub, sorted(_file_names(sub))
            subfolders[:] = []


def _file_names(folder: Path) -> list[str]:
    """The files of one folder; an entry that cannot be followed (a looping link) counts as a file, so that
    reading it says what is wrong with it."""
    names = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return names  # an unreadable folder holds no case we could read
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_file = entry.is_file()
        except OSError:
            is_file = True
        if is_file:
            names.append(entry.name)
    return names


def find_inputs(root: Path, pattern: str = "*", recursive: bool = False) -> tuple[list[tuple[Path, str]], int]:
    """((path, kind) of every case in sorted order, count of files ignored as not a volume)."""
    found, ignored = [], 0
    for folder, files in _walk(root, recursive):
        top = folder == root
        if is_dicom_folder(folder, files):
            if fnmatch.fnmatch(folder.name, pattern):
                found.append((folder, "dicom"))
            continue
        for name in files:
            if not top and not recursive:
                continue  # a non-DICOM subfolder of a non-recursive run: only top-level files count
            if fnmatch.fnmatch(name, pattern) and (is_volume_file(name) or (
                    could_be_input(name) and is_unreachable(folder / name))):
                found.append((folder / name, "file"))  # an unreachable one fails as a case, with its reason
            else:
                ignored += 1
    return sorted(found, key=lambda item: str(item[0])), ignored


def base_case_id(relative: str) -> str:
    """`sub dir/scan 1.nii.gz` -> `sub_dir__scan_1`; empty or dotted results are made safe."""
    parts = relative.split("/")
    parts[-1] = case_name(Path(parts[-1]))
    text = "__".join(_UNSAFE.sub("_", part) for part in parts).strip("._")
    if not text:
        text = "case"
    if len(text) > MAX_ID_LENGTH:
        text = text[:MAX_ID_LENGTH - 9].rstrip("._") + "-" + short_hash(relative)
    return text


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def assign_case_ids(relatives: list[str]) -> dict[str, str]:
    """relative path -> unique id; the first (sorted) keeps the plain id, later clashes get a hash."""
    taken = {name.lower() for name in RESERVED_NAMES}
    ids = {}
    for relative in sorted(relatives):
        case = base_case_id(relative)
        if case.lower() in taken:
            case = f"{case}-{short_hash(relative)}"
        taken.add(case.lower())
        ids[relative] = case
    return ids


def discover_cases(root: Path, pattern: str = "*", recursive: bool = False) -> tuple[list[CaseInput], int]:
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; give the folder that holds the volumes")
    found, ignored = find_inputs(root, pattern, recursive)
    relatives = [path.relative_to(root).as_posix() if path != root else root.name for path, _ in found]
    ids = assign_case_ids(relatives)
    cases = [CaseInput(ids[rel], path, rel, kind) for (path, kind), rel in zip(found, relatives)]
    return cases, ignored


def case_folder(out_dir: Path, case: str) -> Path:
    """OUTPUT_DIR/<case>, refusing anything that would land elsewhere (a link out, a separator, '..')."""
    out_dir = out_dir.resolve()
    target = out_dir / case
    if case in ("", ".", "..") or "/" in case or os.sep in case or case.startswith("."):
        raise InputError(f"unsafe case id {case!r}")
    if target.is_symlink() or target.resolve().parent != out_dir:
        raise InputError(f"{target} would leave {out_dir} (a link?); remove it and rerun")
    return target
