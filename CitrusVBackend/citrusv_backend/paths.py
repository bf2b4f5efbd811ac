"""Output locations, checked before any work: a bad --out (a file, under a file, not writable) is a one-line
usage error at once, not a traceback after a whole model run."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import CitrusVError, InputError


def writable_folder(path: str | Path, option: str = "--out", create: bool = True) -> Path:
    """`path` as a folder that can be written to: created (`create`), or only checked — nothing in its way, and
    the deepest part of it that exists is a folder this process can write into (a probe file, removed)."""
    path = Path(path)
    try:
        existing = path if create else next((p for p in (path, *path.parents) if p.exists()), path.parent)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        if not existing.is_dir():
            raise (FileExistsError if existing == path else NotADirectoryError)(errno.EEXIST, "in the way")
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".citrusv-write-test-")
        os.close(descriptor)
        os.unlink(probe)
    except FileExistsError:
        raise InputError(f"{option} {path}: a file of that name is in the way; give a folder") from None
    except NotADirectoryError:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise InputError(f"{option} {path}: {blocker} is a file, so nothing can be created under it") from None
    except PermissionError:
        raise InputError(f"{option} {path}: permission denied; choose a folder you can write to") from None
    except OSError as error:
        raise InputError(f"{option} {path}: cannot write there ({error.strerror})") from None
    return path


def describe_os_error(error: OSError) -> str:
    """An OSError about an input, in words: a looping link, a permission, a missing file."""
    name = f" {error.filename}" if error.filename else ""
    if error.errno == errno.ELOOP:
        return f"{name.strip() or 'the input'}: a symbolic link that loops (it never reaches a file); fix or remove it"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{name.strip() or 'the input'}: permission denied"
    return f"{name.strip() or 'the input'}: {error.strerror or error}"


def resolved(path: Path, what: str = "") -> Path:
    """`path.resolve()`, or a one-line InputError for a link that loops or a path that cannot be looked at."""
    try:
        return path.resolve()
    except RuntimeError:  # Python before 3.13 reports a symbolic-link loop so
        raise InputError(f"{what}{describe_os_error(OSError(errno.ELOOP, 'loop', str(path)))}") from None
    except OSError as error:
        raise InputError(f"{what}{describe_os_error(error)}") from None


def check_not_inside_input(volume: Path, out: Path) -> None:
    """A DICOM folder is never written into: a SEG among its files would make it a folder of two series."""
    source, target = resolved(volume), resolved(out, "--out ")
    if source.is_dir() and (target == source or target.is_relative_to(source)):
        raise CitrusVError(f"--out {out} is inside the input folder {volume}; the input is never written, choose an "
                           f"output folder outside it")
