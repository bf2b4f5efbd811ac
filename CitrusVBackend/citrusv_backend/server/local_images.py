"""Images named by a file path in an OpenAI request, read only inside the folders the operator allowed.

ms-swift's deploy reads any local path a client names (`{"type": "image", "image": "../asset/x.png"}`, as the
reference's `projects/inference_with_deploy.py` sends). Here that needs `citrusv serve --allow-local-images DIR`:
the path — relative ones from the server's working folder, as in swift — is resolved with its links and must
lie inside one of those folders, and must be a regular file no larger than a request body may be.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from PIL import Image

from ..errors import CitrusVError, InputError
from .codec import decode_image

ALLOW_FLAG = "--allow-local-images"


def allowed_folders(directories: Iterable[str | Path]) -> tuple[str, ...]:
    """The folders, resolved, each checked to exist (for `citrusv serve`, before the model loads)."""
    resolved = []
    for directory in directories:
        path = Path(directory).expanduser().resolve()
        if not path.is_dir():
            raise CitrusVError(f"{ALLOW_FLAG} {directory}: no such folder")
        resolved.append(str(path))
    return tuple(resolved)


def read_local_image(text: str, folders: tuple[str, ...], max_bytes: int) -> Image.Image:
    if not folders:
        raise InputError(f"the image {text[:200]!r} is a file path; this server reads no files: send the image inline "
                         f"as a data URI (or start the server with {ALLOW_FLAG} DIR to allow paths inside DIR)")
    path = Path(text)
    real = (path if path.is_absolute() else Path.cwd() / path).resolve()  # links resolved: none leads outside
    if not any(real.is_relative_to(folder) for folder in folders):
        raise InputError(f"the image path {text[:200]!r} is outside the folders this server may read "
                         f"({', '.join(folders)})")
    try:
        descriptor = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise InputError(f"the image path {text[:200]!r}: no such file") from None
    except OSError as error:
        raise InputError(f"the image path {text[:200]!r}: cannot read it ({error.strerror})") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"the image path {text[:200]!r} is not a regular file")
        raise InputError(f"the image file {text[:200]!r} has {info.st_size:,} bytes, more than the {max_bytes:,} "
                         f"a request may carry")
    with os.fdopen(descriptor, "rb") as handle:
        data = handle.read(max_bytes + 1)
    return decode_image(data, f"the image {Path(text).name}")
