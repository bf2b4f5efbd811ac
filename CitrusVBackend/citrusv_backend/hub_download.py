"""A model's files from a Hugging Face hub, as a step of its own: planned, checked for disk space, resumable,
checksummed, reported as it goes.

huggingface_hub does the talking: `HfApi.model_info(files_metadata=True)` lists the files with their sizes and
the hub's checksums (an LFS file's sha256, a small file's git blob id), `get_hf_file_metadata` asks the
`resolve` URL (HEAD: the commit, `X-Linked-Etag` / `X-Linked-Size`, a CDN redirect) and `http_get` streams
the bytes with a `Range` request from where a file stopped. The partial file is ours: huggingface_hub 2.x
keeps its own `.incomplete` file only for the retries of one call and deletes it when the process stops, so
a Cancel would lose a whole 5 GB shard; here `<file>.citrusv-part` stays until the file is complete and
verified, and the next run continues it. A finished file is placed where `snapshot_download` would put it
(the cache's `blobs/<etag>` + `snapshots/<commit>/<name>` link + `refs/<revision>`), or into `--to DIR`.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, CitrusVError, DiskFullError
from .model.hub import CHECKPOINT_FILE_PATTERNS, hub_failure, use_ca_bundle
from .paths import writable_folder

GB = 1e9
PART_SUFFIX = ".citrusv-part"


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    sha256: str | None   # LFS files: the hub's sha256 of the content
    blob_id: str | None  # every file: the git blob id (sha1 of "blob <size>\0" + content)

    @property
    def etag(self) -> str:
        """The name huggingface_hub's cache gives the file's blob (the hub's ETag / X-Linked-Etag)."""
        return self.sha256 or self.blob_id or self.name.replace("/", "_")


@dataclass
class DownloadPlan:
    repo_id: str
    revision: str
    commit: str
    files: list[HubFile]
    destination: "Destination"

    @property
    def bytes_total(self) -> int:
        return sum(file.size for file in self.files)

    def bytes_present(self) -> int:
        """Bytes already here: complete files and the parts of interrupted ones."""
        return sum(file.size if self.destination.is_complete(file) else self.destination.partial_bytes(file)
                   for file in self.files)


class Destination:
    """Where a file's bytes accumulate (`partial`) and where a verified file goes (`place`)."""

    def __init__(self, root: Path):
        self.root = root

    def final_path(self, file: HubFile) -> Path:
        raise NotImplementedError

    def partial_path(self, file: HubFile) -> Path:
        raise NotImplementedError

    def place(self, file: HubFile, partial: Path) -> None:
        raise NotImplementedError

    @property
    def result_path(self) -> Path:
        raise NotImplementedError

    def is_complete(self, file: HubFile) -> bool:
        path = self.final_path(file)
        return path.is_file() and path.stat().st_size == file.size

    def partial_bytes(self, file: HubFile) -> int:
        path = self.partial_path(file)
        return path.stat().st_size if path.is_file() else 0


class FolderDestination(Destination):
    """`--to DIR`: the files as the repository has them; parts in DIR/.citrusv-download/."""

    def final_path(self, file: HubFile) -> Path:
        return self.root / file.name

    def partial_path(self, file: HubFile) -> Path:
        return self.root / ".citrusv-download" / (file.name + PART_SUFFIX)

    def place(self, file: HubFile, partial: Path) -> None:
        target = self.final_path(file)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)

    @property
    def result_path(self) -> Path:
        return self.root


class CacheDestination(Destination):
    """The Hugging Face cache, in the layout `snapshot_download` reads (so `--model REPO_ID` finds it offline)."""

    def __init__(self, cache_dir: Path, repo_id: str, revision: str, commit: str):
        from huggingface_hub.file_download import repo_folder_name

        super().__init__(cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model"))
        self.revision, self.commit = revision, commit

    def final_path(self, file: HubFile) -> Path:
        return self.result_path / file.name

    def partial_path(self, file: HubFile) -> Path:
        return self.root / "blobs" / (file.etag + PART_SUFFIX)

    def place(self, file: HubFile, partial: Path) -> None:
        blob = self.root / "blobs" / file.etag
        os.replace(partial, blob)
        link = self.final_path(file)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks (Windows without developer mode): the file itself, as huggingface_hub does
            os.replace(blob, link)
        if self.revision != self.commit:
            refs = self.root / "refs" / self.revision
            refs.parent.mkdir(parents=True, exist_ok=True)
            refs.write_text(self.commit)

    @property
    def result_path(self) -> Path:
        return self.root / "snapshots" / self.commit


def plan_download(repo_id: str, revision: str | None = None, to: Path | None = None,
                  endpoint: str | None = None) -> DownloadPlan:
    """Ask the hub which files the checkpoint has, their sizes and checksums (hub errors become user errors)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import filter_repo_objects

    revision = revision or "main"
    use_ca_bundle()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as error:
        raise hub_failure(repo_id, error) from None
    siblings = list(filter_repo_objects(info.siblings or [], allow_patterns=list(CHECKPOINT_FILE_PATTERNS),
                                        key=lambda sibling: sibling.rfilename))
    files = [HubFile(sibling.rfilename, int(sibling.size or 0), sibling.lfs.sha256 if sibling.lfs else None,
                     sibling.blob_id) for sibling in siblings]
    if not any(file.name.endswith(".safetensors") for file in files):
        raise CheckpointError(f"{repo_id} on the hub has no .safetensors weights: it is not a Citrus-V checkpoint")
    destination = FolderDestination(to) if to is not None else \
        CacheDestination(Path(constants.HF_HUB_CACHE), repo_id, revision, info.sha)
    return DownloadPlan(repo_id, revision, info.sha, files, destination)


def free_bytes(path: Path) -> int:
    """Free space where `path` is (or would be made)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk_space(plan: DownloadPlan, free: Callable[[Path], int] = free_bytes) -> None:
    needed = plan.bytes_total - plan.bytes_present()
    available = free(plan.destination.root)
    if needed > available:
        raise DiskFullError(f"The weights need {needed / GB:.1f} GB more and {plan.destination.root} has "
                            f"{available / GB:.1f} GB free: free some space, or choose another folder "
                            f"(--to DIR, or HF_HOME for the Hugging Face cache)",
                            needed_gb=round(needed / GB, 3), available_gb=round(available / GB, 3))


class Progress:
    """Bytes done of the whole download, the rate over the last seconds and the time left; `emit` receives a
    dict at most every `interval` seconds (and at the end of each file)."""

    def __init__(self, total: int, present: int, emit: Callable[[dict], None], interval: float = 0.5,
                 window: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.emit, self.interval, self.window, self.clock = total, present, emit, interval, window, clock
        self.samples = collections.deque([(clock(), present)])
        self.last_emit = float("-inf")
        self.file = ""

    def advance(self, count: int, force: bool = False) -> None:
        self.done += count
        now = self.clock()
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.window:
            self.samples.popleft()
        if force or now - self.last_emit >= self.interval:
            self.last_emit = now
            self.emit(self.event(now))

    def event(self, now: float) -> dict:
        (start, done_then), (_, done_now) = self.samples[0], self.samples[-1]
        rate = (done_now - done_then) / (now - start) if now > start else 0.0
        left = max(self.total - self.done, 0)
        return {"event": "download", "file": self.file, "bytes_done": self.done, "bytes_total": self.total,
                "rate_bps": round(rate, 1), "eta_s": round(left / rate, 1) if rate > 0 else (0.0 if not left else None)}

    def bar_class(self):
        """A tqdm-shaped class for `http_get`: it counts into this progress instead of drawing a bar."""
        progress = self

        class Bar:
            def __init__(self, **_):
                pass

            def update(self, count: int = 1) -> None:
                progress.advance(count)

            def close(self) -> None:
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                pass

        return Bar


def file_digest(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    digest = hashlib.new(algorithm)
    digest.update(prefix)
    with open(path, "rb") as handle:
        while block := handle.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def verify(file: HubFile, path: Path) -> None:
    """The file's size and checksum against the hub's; a mismatch deletes it (the next run downloads it anew)."""
    size = path.stat().st_size
    if file.sha256:
        expected, actual, kind = file.sha256, file_digest(path, "sha256"), "sha256"
    elif file.blob_id:
        expected, actual, kind = file.blob_id, file_digest(path, "sha1", b"blob %d\0" % size), "git blob id"
    else:
        expected = actual = kind = None
    if size != file.size or expected != actual:
        path.unlink(missing_ok=True)
        found = f"{size} bytes" if size != file.size else f"{kind} {actual}"
        wanted = f"{file.size} bytes" if size != file.size else f"{kind} {expected}"
        raise CheckpointError(f"{file.name}: the downloaded file does not match the hub's ({found}, expected "
                              f"{wanted}); it was deleted. Run the download again; if it happens again, something "
                              f"between here and the hub (a proxy?) changes the files")


def fetch_file(plan: DownloadPlan, file: HubFile, progress: Progress, endpoint: str | None = None) -> None:
    """One file into its partial file (continuing it), verified, then placed."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    destination = plan.destination
    progress.file = file.name
    url = hf_hub_url(plan.repo_id, file.name, revision=plan.commit, endpoint=endpoint)
    try:
        metadata = get_hf_file_metadata(url, endpoint=endpoint)
    except Exception as error:
        raise hub_failure(plan.repo_id, error) from None
    partial = destination.partial_path(file)
    partial.parent.mkdir(parents=True, exist_ok=True)
    present = destination.partial_bytes(file)
    if present > file.size:  # not this file's bytes: start over
        partial.unlink()
        progress.done -= present
        present = 0
    try:
        with open(partial, "ab") as handle:
            http_get(metadata.location, handle, resume_size=present, headers=build_hf_headers(),
                     expected_size=file.size, displayed_filename=file.name, tqdm_class=progress.bar_class())
    except OSError as error:
        if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise DiskFullError(f"The disk holding {partial.parent} filled up while downloading {file.name}; free "
                                f"some space and run the download again (it continues where it stopped)",
                                needed_gb=round((plan.bytes_total - progress.done) / GB, 3),
                                available_gb=round(free_bytes(partial.parent) / GB, 3)) from None
        if error.errno is not None and error.filename is not None:  # this machine's file system, not the hub
            raise CitrusVError(f"{error.filename}: cannot write the download there ({error.strerror})") from None
        raise hub_failure(plan.repo_id, error) from None
    except Exception as error:  # the connection lost for good after http_get's own resumed retries
        raise hub_failure(plan.repo_id, error) from None
    verify(file, partial)
    destination.place(file, partial)
    progress.advance(0, force=True)


def download(plan: DownloadPlan, emit: Callable[[dict], None], endpoint: str | None = None,
             free: Callable[[Path], int] = free_bytes) -> Path:
    """Every file of `plan` not yet complete; returns the checkpoint folder."""
    writable_folder(plan.destination.root, option="the download's folder")  # before anything is fetched
    check_disk_space(plan, free)
    progress = Progress(plan.bytes_total, plan.bytes_present(), emit)
    for file in plan.files:
        if not plan.destination.is_complete(file):
            fetch_file(plan, file, progress, endpoint)
    with contextlib.suppress(OSError):  # the folder of parts, empty now (--to DIR)
        (plan.destination.root / ".citrusv-download").rmdir()
    return plan.destination.result_path
