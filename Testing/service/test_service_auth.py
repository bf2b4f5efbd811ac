"""Bearer-token auth, the ready line, and what the logs may (request ids, timings) and may not (the token) hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from citrusv_backend.server.launch import Token, resolve_token
from service_helpers import log_lines

pytestmark = pytest.mark.service


def test_the_ready_line_says_where_and_what(server):
    ready = server.ready
    assert ready["event"] == "ready" and ready["host"] == "127.0.0.1" and ready["port"] > 0
    assert ready["token_source"] == "generated" and ready["device"] == "cpu" and ready["random_weights"] is True
    token_file = ready["token_file"]
    assert os.stat(token_file).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(token_file)).st_mode & 0o077 == 0
    assert server.token not in json.dumps(ready)


def test_every_route_but_healthz_needs_the_token(server):
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    for method, path in [("GET", "/v1/info"), ("GET", "/v1/models"), ("POST", "/v1/volumes"), ("POST", "/v1/jobs"),
                         ("GET", "/v1/jobs/x"), ("DELETE", "/v1/volumes/x"), ("POST", "/v1/images/infer"),
                         ("POST", "/v1/chat/completions"), ("GET", "/v1/openapi.json"), ("GET", "/v1/no-such-route")]:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {server.token}"},
                        {"Authorization": f"Bearer {server.token[:-1]}"}, {"Authorization": "Bearer"}):
            response = httpx.request(method, f"{server.url}{path}", headers=headers)
            assert response.status_code == 401, (method, path, headers.keys(), response.text)
            error = response.json()["error"]
            assert error["type"] == "unauthorized" and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/v1/info", headers=server.headers).status_code == 200


def test_info_reports_model_versions_and_limits(client):
    info = client.get("/v1/info").json()
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["random_weights"] is True and info["gpu"] is None
    assert {"citrusv", "torch", "transformers", "sam2"} <= set(info["versions"])
    assert info["limits"]["max_upload_bytes"] == 1024 * 2**20 and info["limits"]["max_voxels"] == 1024**3


def test_logs_are_json_lines_with_request_ids_and_never_the_token(server, session_dir):
    request_id = "trace-me-0001"
    httpx.get(f"{server.url}/v1/info", headers=server.headers | {"X-Request-ID": request_id})
    httpx.get(f"{server.url}/v1/info", headers={"Authorization": f"Bearer {server.token}x"})
    httpx.get(f"{server.url}/v1/info?token={server.token}", headers=server.headers)
    time.sleep(0.3)
    log_path = session_dir / "server.log"
    text = log_path.read_text()
    assert server.token not in text
    lines = log_lines(log_path)
    assert all("unparsed" not in line for line in lines), [line for line in lines if "unparsed" in line][:3]
    ours = [line for line in lines if line.get("request_id") == request_id]
    assert ours and ours[0]["path"] == "/v1/info" and ours[0]["status"] == 200 and ours[0]["ms"] >= 0
    assert any(line.get("status") == 401 and line.get("auth") == "wrong" for line in lines)


def test_a_token_file_or_the_environment_give_the_token(tmp_path):
    path = tmp_path / "token"
    path.write_text("  from-a-file-0123456789  \n")
    assert (resolve_token(path).value, resolve_token(path).source) == ("from-a-file-0123456789", "file")
    env_token = resolve_token(None, {"CITRUSV_TOKEN": "from-the-environment-012345"})
    assert (env_token.value, env_token.source) == ("from-the-environment-012345", "env")
    generated = resolve_token(None, {})
    assert generated.source == "generated" and len(generated.value) >= 32
    assert generated.value not in repr(generated) and isinstance(generated, Token)


def test_listening_beyond_loopback_needs_an_explicit_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CITRUSV_TOKEN"}
    run = subprocess.run([sys.executable, "-m", "citrusv_backend.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                          "--model", str(tmp_path / "no-model-needed")], capture_output=True, encoding="utf-8", timeout=120,
                         env=env)
    assert run.returncode == 2 and "refusing to listen on 0.0.0.0" in run.stderr
    failed = json.loads(run.stdout)  # the launcher's one line: why it did not start
    assert failed["event"] == "failed" and failed["reason"] == "other" and "refusing to listen" in failed["message"]
    assert "loading model" not in run.stderr
