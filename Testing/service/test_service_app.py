"""The application in-process (no model): an unexpected error is a JSON 500 without a traceback, logged with its
request id, and the service goes on serving."""
from __future__ import annotations

import logging

import pytest
from starlette.testclient import TestClient

from citrusv_backend.server.app import ServiceConfig, ServiceState, create_app

pytestmark = pytest.mark.service

TOKEN = "in-process-token-0123456789"


@pytest.fixture
def app_client():
    app = create_app(ServiceState(engine=None, config=ServiceConfig(), token=TOKEN))

    def boom():
        raise RuntimeError("secret internals")

    app.add_api_route("/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def test_an_unexpected_error_is_a_json_500_and_the_service_goes_on(app_client, caplog):
    with caplog.at_level(logging.ERROR, logger="citrusv.server"):
        response = app_client.get("/v1/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_error" and "boom-1" in error["message"] and error["request_id"] == "boom-1"
    assert "secret internals" not in response.text and "Traceback" not in response.text
    assert any(getattr(r, "fields", {}).get("request_id") == "boom-1" for r in caplog.records)
    assert app_client.get("/healthz").json() == {"status": "ok", "worker_alive": True}
    assert app_client.get("/v1/jobs/x").status_code == 404
