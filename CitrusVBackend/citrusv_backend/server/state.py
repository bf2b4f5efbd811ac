"""What one running service holds: its configuration (`ServiceConfig`, as `citrusv serve` sets it) and its state
(`ServiceState`: the loaded engine, the volume store, the job queue and its worker, the refinement sessions).
The routers read it from `request.app.state.service`; app.py wires it into the application."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ..inference.engine import CitrusVEngine
from .config import MiB, REFERENCE_MODEL_NAME, VOLUME_UPLOAD_PATH, ServiceConfig  # noqa: F401  (re-exported)
from .conversations import ConversationStore
from .exports import ExportStore
from .jobs import GpuWorker, JobQueue
from .sessions import RefineSessions
from .volumes import VolumeStore

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
        self.exports = ExportStore(config.result_ttl_s)   # DICOM exports of a client's segments
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
