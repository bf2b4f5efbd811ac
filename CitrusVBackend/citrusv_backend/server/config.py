"""`citrusv serve`'s configuration, declared once: `ServeSettings` (where and how it listens) and `ServiceConfig`
(the service's limits), whose fields carry the command line's help, bounds and units (option_fields.py); the
`serve` options are derived from them. Light: `citrusv --help` imports it without torch or FastAPI."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import option_types as types
from ..errors import CitrusVError
from ..option_fields import from_args, option
from ..volume.options import DEFAULT_MAX_VOXELS

MiB = 2**20
VOLUME_UPLOAD_PATH = "/v1/volumes"
REFERENCE_MODEL_NAME = "CitrusV_8B"  # the reference deployment's --served_model_name: its clients send it
REFERENCE_PORT = 8000  # the reference deployment's --port, which its demo clients call
PIXEL_ENV = ("MIN_PIXELS", "MAX_PIXELS")  # read by ms-swift's deploy too


@dataclass
class ServiceConfig:
    """The service's limits. `cli=False` fields are fixed here (no user has needed to change them)."""

    served_model_name: str = option(REFERENCE_MODEL_NAME, "the model name of the OpenAI-compatible endpoints "
                                                          "(default: the reference's)", advanced=True)
    max_upload_bytes: int = option(1024 * MiB, "largest volume upload accepted (MiB)", flag="--max-upload-mb",
                                   scale=MiB, ge=1e-6, advanced=True)
    max_request_bytes: int = option(256 * MiB, "any other request body (images, chat, jobs)", cli=False)
    max_voxels: int = option(DEFAULT_MAX_VOXELS, "largest volume accepted (voxels)", ge=1, advanced=True)
    volume_budget_bytes: int = option(4096 * MiB, "memory for uploaded volumes; the least recently used are "
                                                  "evicted beyond it (MiB)", flag="--volume-budget-mb", scale=MiB,
                                      ge=1e-6)
    volume_ttl_s: float = option(3600.0, "evict a volume unused for this long (s)", flag="--volume-ttl", ge=1e-9,
                                 advanced=True)
    result_ttl_s: float = option(3600.0, "keep a finished job's result this long (s)", flag="--result-ttl", ge=1e-9,
                                 advanced=True)
    max_queued_jobs: int = option(256, "the most jobs waiting", cli=False)
    request_timeout_s: float = option(600.0, "longest wait for a synchronous 2D or chat request (s)",
                                      flag="--request-timeout", ge=1e-9, advanced=True)
    read_timeout_s: float = option(60.0, "drop a request whose body stalls this long (s)", flag="--read-timeout",
                                   ge=1e-9, advanced=True)
    max_new_tokens: int = option(4096, "the most tokens one answer may ask for", ge=1, advanced=True)
    max_header_bytes: int = option(64 * 1024, "a request's headers (431 beyond)", cli=False)
    header_timeout_s: float = option(10.0, "drop a connection whose request headers take longer than this to "
                                           "arrive (s)", flag="--header-timeout", ge=1e-9, advanced=True)
    max_connections: int = option(256, "the most open connections; one more is answered 503 and closed", ge=1,
                                  advanced=True)
    min_pixels: int | None = option(None, "image-size budget of the 2D and chat routes, as ms-swift's MIN_PIXELS "
                                          "(default: $MIN_PIXELS, else each task's own)",
                                    check=types.check_pixel_budget, advanced=True)
    max_pixels: int | None = option(None, "as --min-pixels, for MAX_PIXELS (the reference's Streamlit demo "
                                          "expects 1003520)", check=types.check_pixel_budget, advanced=True)
    local_image_dirs: tuple[str, ...] = option((), "let chat requests name image files inside DIR (repeatable); by "
                                                   "default no file is read", flag="--allow-local-images",
                                               metavar="DIR", append=True)
    chat_image_tags: str = option("text", "chat requests with an image part and an <image> typed in the text: "
                                          "'text' (default) puts the image at the typed tag; 'swift' keeps "
                                          "ms-swift's rule (image at the part, tag as text)",
                                  choices=("text", "swift"), advanced=True)
    refine_cache_bytes: int = option(2048 * MiB, "memory for the SAM2 features of slices kept for refinement "
                                                 "clicks, all sessions (MiB)", flag="--refine-cache-mb", scale=MiB,
                                     ge=1e-6, advanced=True)
    max_refine_sessions: int = option(64, "refinement sessions kept at once", cli=False)

    def check(self) -> None:
        try:
            types.check_pixel_budget_order(self.min_pixels, self.max_pixels)
        except ValueError as error:
            raise CitrusVError(str(error)) from None

    def pixel_budget(self) -> tuple[int | None, int | None]:
        """(min, max) pixels for the 2D routes; with one bound set the other is qwen_vl_utils' default, as in
        `swift deploy` with only MIN_PIXELS or MAX_PIXELS in its environment."""
        from ..model.processor import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

        if self.min_pixels is None and self.max_pixels is None:
            return None, None
        return self.min_pixels or QWEN_MIN_PIXELS, self.max_pixels or QWEN_MAX_PIXELS

    def body_limit(self, path: str) -> int:
        return self.max_upload_bytes if path == VOLUME_UPLOAD_PATH else min(self.max_request_bytes, self.max_upload_bytes)

    def limits(self) -> dict:
        return asdict(self) | {"max_request_bytes": self.body_limit("")}


@dataclass
class ServeSettings:
    host: str = option("127.0.0.1", "address to listen on (default loopback; any other needs --token-file or "
                                    "$CITRUSV_TOKEN)")
    port: int | None = option(None, "TCP port; 0 (default) picks a free one (see the ready line); 8000 with "
                                    "--reference-compatible", ge=0, le=65535)
    token_file: Path | None = option(None, "file holding the bearer token (else $CITRUSV_TOKEN, else a random one "
                                           "written to a 0600 file)", parse=Path)
    config: ServiceConfig = field(default_factory=ServiceConfig)
    reference_compatible: bool = option(False, "run the reference's demo clients unchanged: port 8000, ANY bearer "
                                               "token accepted, loopback only (see docs/compatibility.md first)")
    no_download: bool = option(False, "never download the model: one not on this machine fails at once "
                                      "(see `citrusv download`)")

    @classmethod
    def from_args(cls, args, environ=os.environ) -> "ServeSettings":
        """The settings of a parsed `citrusv serve` command line; the pixel budget falls back on $MIN_PIXELS and
        $MAX_PIXELS as ms-swift's deploy does."""
        from .local_images import allowed_folders

        settings = from_args(cls, args)
        if settings.reference_compatible and settings.token_file:
            raise CitrusVError("--reference-compatible accepts any bearer token; it takes no --token-file")
        min_pixels, max_pixels = (_pixels(getattr(args, name.lower()), name, environ) for name in PIXEL_ENV)
        settings.config = from_args(ServiceConfig, args, min_pixels=min_pixels, max_pixels=max_pixels,
                                    local_image_dirs=allowed_folders(args.local_image_dirs))
        settings.config.check()
        if settings.port is None:
            settings.port = REFERENCE_PORT if settings.reference_compatible else 0
        return settings


def _pixels(given: int | None, env_name: str, environ) -> int | None:
    """--min-pixels / --max-pixels (checked when parsed), else $MIN_PIXELS / $MAX_PIXELS, checked by the same rule."""
    if given is not None or not environ.get(env_name, "").strip():
        return given
    try:
        return types.check_pixel_budget(int(environ[env_name]))
    except ValueError as error:
        reason = "is not a whole number of pixels" if not environ[env_name].strip().lstrip("-").isdigit() else error
        raise CitrusVError(f"${env_name}={environ[env_name]!r} {reason}") from None
