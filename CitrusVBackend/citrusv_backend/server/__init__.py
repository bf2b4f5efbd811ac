"""The backend HTTP service (`citrusv serve`): FastAPI + uvicorn around one loaded model.

`create_app(state)` builds the application around a `ServiceState`; `launch.serve` runs it; `process.start_server`
starts it as a child process and waits for its ready line. The protocol is documented in the README
("Backend service").
"""
from .app import ServiceConfig, ServiceState, create_app

__all__ = ["ServiceConfig", "ServiceState", "create_app"]
