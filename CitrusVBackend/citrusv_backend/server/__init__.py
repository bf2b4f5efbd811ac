"""The backend HTTP service (`citrusv serve`): FastAPI + uvicorn around one loaded model.

`config` declares its settings (light: the command line reads them); `app.create_app(state)` builds the
application around a `state.ServiceState`; `launch.serve` runs it; `process.start_server` starts it as a child
process and waits for its ready line. The protocol is documented in docs/http-api.md.
"""
