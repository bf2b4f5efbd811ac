"""GET /healthz (open, for launchers and load balancers) and GET /v1/info (what is loaded, versions, limits)."""
from __future__ import annotations

import importlib.metadata
import platform
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from . import Service

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(state: Service):
    alive = state.worker.alive
    return JSONResponse({"status": "ok" if alive else "unhealthy", "worker_alive": alive},
                        status_code=200 if alive else 503)


@router.get("/v1/info")
def info(state: Service) -> dict:
    loaded = state.engine.loaded
    described = loaded.describe()
    return {"model": state.model_name, "model_info": described, "checkpoint": described["checkpoint"],
            "dtype": described["dtype"], "device": described["device"],
            "random_weights": described["random_weights"], "gpu": gpu_info(loaded.device), "versions": versions(),
            "limits": state.config.limits(), "volumes": state.volumes.stats(), "jobs": state.jobs.stats(),
            "refine": state.refine.stats(),
            "uptime_s": round(time.time() - state.started_at, 1)}


def gpu_info(device) -> dict | None:
    import torch

    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return {"name": properties.name, "index": index, "total_mb": round(properties.total_memory / 2**20),
            "allocated_mb": round(torch.cuda.memory_allocated(index) / 2**20),
            "reserved_mb": round(torch.cuda.memory_reserved(index) / 2**20)}


def versions() -> dict:
    from ... import __version__

    found = {"citrusv": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "sam2", "fastapi", "uvicorn", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found
