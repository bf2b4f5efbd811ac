"""The application: `create_app(state)` wires the routers, middleware and error handlers around one
`ServiceState` (the loaded engine, the volume store, the job queue and its worker). No module-level state:
everything a request needs comes from `request.app.state.service`."""
from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI

from ..inference.engine import CitrusVEngine
from ..model.processor import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS
from ..volume.io import DEFAULT_MAX_VOXELS
from .errors import install_error_handlers
from .conversations import ConversationStore
from .jobs import GpuWorker, JobQueue
from .middleware import AccessLog, BearerAuth, BodyLimit, LoopbackOpenAccess
from .sessions import RefineSessions
from .volumes import VolumeStore

MiB = 2**20
VOLUME_UPLOAD_PATH = "/v1/volumes"
REFERENCE_MODEL_NAME = "CitrusV_8B"  # the reference deployment's --served_model_name: its clients send it


@dataclass
class ServiceConfig:
    served_model_name: str = REFERENCE_MODEL_NAME
    max_upload_bytes: int = 1024 * MiB        # a volume upload (POST /v1/volumes)
    max_request_bytes: int = 256 * MiB        # any other request body (images, chat, jobs)
    max_voxels: int = DEFAULT_MAX_VOXELS
    volume_budget_bytes: int = 4096 * MiB     # all stored volumes together (as `citrusv serve` defaults)
    volume_ttl_s: float = 3600.0              # a volume unused this long is evicted
    result_ttl_s: float = 3600.0              # a finished job is kept this long
    max_queued_jobs: int = 256
    request_timeout_s: float = 600.0          # a synchronous 2D / chat request waits at most this long
    read_timeout_s: float = 60.0              # a request body that stalls this long is dropped
    max_new_tokens: int = 4096
    max_header_bytes: int = 64 * 1024         # a request's headers (431 beyond)
    header_timeout_s: float = 10.0            # a request's headers must arrive within this (408)
    max_connections: int = 256                # open connections; one more is answered 503 and closed
    min_pixels: int | None = None             # the 2D routes' image-size budget (serve --min-pixels, $MIN_PIXELS);
    max_pixels: int | None = None             # None for both: each task's own
    local_image_dirs: tuple[str, ...] = ()    # chat requests may name image files inside these (--allow-local-images)
    chat_image_tags: str = "text"             # "swift": a typed <image> beside an image part stays text, as in swift
    refine_cache_bytes: int = 2048 * MiB      # SAM2 features of slices kept for refinement clicks (all sessions)
    max_refine_sessions: int = 64

    def pixel_budget(self) -> tuple[int | None, int | None]:
        """(min, max) pixels for the 2D routes; with one bound set the other is qwen_vl_utils' default, as in
        `swift deploy` with only MIN_PIXELS or MAX_PIXELS in its environment."""
        if self.min_pixels is None and self.max_pixels is None:
            return None, None
        return self.min_pixels or QWEN_MIN_PIXELS, self.max_pixels or QWEN_MAX_PIXELS

    def body_limit(self, path: str) -> int:
        return self.max_upload_bytes if path == VOLUME_UPLOAD_PATH else min(self.max_request_bytes, self.max_upload_bytes)

    def limits(self) -> dict:
        return asdict(self) | {"max_request_bytes": self.body_limit("")}


def free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ServiceState:
    """`token` None: no authentication (the reference-compatible launch: loopback names only)."""

    def __init__(self, engine: CitrusVEngine, config: ServiceConfig, token: str | None, model_name: str | None = None):
        self.engine = engine
        self.config = config
        self.token = token
        self.model_name = model_name or config.served_model_name
        self.volumes = VolumeStore(config.volume_budget_bytes, config.volume_ttl_s)
        self.jobs = JobQueue(config.max_queued_jobs, config.result_ttl_s)
        self.worker = GpuWorker(self.jobs, free_memory=free_accelerator_memory)
        self.refine = RefineSessions(engine, config.refine_cache_bytes, config.max_refine_sessions, config.volume_ttl_s)
        self.volumes.on_evict.append(self.refine.drop_volume)
        self.conversations = ConversationStore()
        self.started_at = time.time()
        self.tmp_dir: Path | None = None

    def start(self) -> None:
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="citrusv-serve-uploads-"))
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


def create_app(state: ServiceState) -> FastAPI:
    from .routers import conversations, health, images, jobs, openai, refine, volumes

    @asynccontextmanager
    async def lifespan(_app):
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="CitrusV backend", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/v1/openapi.json")
    app.state.service = state
    install_error_handlers(app)
    for router in (health.router, volumes.router, jobs.router, images.router, openai.router, refine.router):
        app.include_router(router)
    app.include_router(conversations.router)
    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(BodyLimit, limit_for=state.config.body_limit, read_timeout_s=state.config.read_timeout_s)
    if state.token is None:
        app.add_middleware(LoopbackOpenAccess)
    else:
        app.add_middleware(BearerAuth, token=state.token)
    app.add_middleware(AccessLog)
    return app


def _version() -> str:
    from .. import __version__

    return __version__
