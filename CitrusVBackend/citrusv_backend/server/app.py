"""The application: `create_app(state)` wires the routers, middleware and error handlers around one
`ServiceState` (state.py: the loaded engine, the volume store, the job queue and its worker). No module-level state:
everything a request needs comes from `request.app.state.service`."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from .errors import install_error_handlers
from .middleware import AccessLog, BearerAuth, BodyLimit, LoopbackOpenAccess
from .routers import conversations, exports, health, images, jobs, openai, refine, volumes
from .state import (MiB, REFERENCE_MODEL_NAME, VOLUME_UPLOAD_PATH, ServiceConfig,  # noqa: F401  (their home was here)
                    ServiceState, free_accelerator_memory)


def create_app(state: ServiceState) -> FastAPI:
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
    for router in (health.router, volumes.router, jobs.router, images.router, openai.router, refine.router,
                   exports.router, conversations.router):
        app.include_router(router)
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
