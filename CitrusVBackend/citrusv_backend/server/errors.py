"""Every error the service answers is JSON: {"error": {"type", "message", "request_id"}}.

Bad input is a 4xx with a message a user can act on; an unexpected failure is a 500 that says where to look
(the server log, by request id) and never carries a traceback.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CitrusVError, DependencyError, TooLargeError

log = logging.getLogger("citrusv.server")

STATUS_TYPES = {400: "invalid_input", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                408: "request_timeout", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
                422: "validation_error", 429: "queue_full", 431: "headers_too_large", 499: "client_closed_request",
                500: "internal_error", 503: "unavailable", 504: "timeout"}


class ApiError(StarletteHTTPException):
    """An answer with a status, an error type and a message. A Starlette HTTPException, so that FastAPI passes
    it through untouched even when it is raised while the request body is being read."""

    def __init__(self, status: int, message: str, type: str | None = None, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.type = type or STATUS_TYPES.get(status, "error")
        self.message = message


def request_id_of(request_or_scope) -> str | None:
    scope = request_or_scope if isinstance(request_or_scope, dict) else request_or_scope.scope
    return scope.get("state", {}).get("request_id")


def error_body(type: str, message: str, request_id: str | None = None, details: list | None = None) -> dict:
    error = {"type": type, "message": message, "request_id": request_id}
    if details:
        error["details"] = details
    return {"error": error}


def error_response(status: int, type: str, message: str, request_id: str | None = None,
                   headers: dict | None = None, details: list | None = None) -> JSONResponse:
    return JSONResponse(error_body(type, message, request_id, details), status_code=status, headers=headers)


def _location(loc) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def validation_details(errors) -> list[dict]:
    """Pydantic's errors without the offending input (it may be huge, or private)."""
    return [{"loc": _location(e.get("loc", ())), "msg": e.get("msg", "invalid")} for e in errors]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status_code, error.type, error.message, request_id_of(request), error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        status = error.status_code
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(status, str(error.detail))
        return error_response(status, STATUS_TYPES.get(status, "error"), message, request_id_of(request), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        errors = error.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            reason = next((e.get("ctx", {}).get("error") for e in errors if e.get("type") == "json_invalid"), "")
            return error_response(400, "malformed_json", f"the request body is not valid JSON ({reason})",
                                  request_id_of(request))
        details = validation_details(errors)
        message = "; ".join(f"{d['loc']}: {d['msg']}" for d in details[:5])
        return error_response(422, "validation_error", f"invalid request: {message}", request_id_of(request),
                              details=details)

    @app.exception_handler(DependencyError)
    async def missing_dependency(request: Request, error: DependencyError):
        return error_response(503, "unavailable", str(error), request_id_of(request))

    @app.exception_handler(TooLargeError)
    async def too_large(request: Request, error: TooLargeError):
        return error_response(413, "too_large", str(error), request_id_of(request))

    @app.exception_handler(CitrusVError)
    async def citrusv_error(request: Request, error: CitrusVError):
        return error_response(400, "invalid_input", str(error), request_id_of(request))


JOB_ERROR_STATUS = {"invalid_input": 400, "out_of_memory": 503, "shutdown": 503, "cancelled": 503}


def job_failure(job) -> ApiError:
    """The HTTP error of a synchronous request whose `jobs.Job` failed or was cancelled."""
    error = job.error or {"type": "cancelled", "message": "the request was cancelled"}
    return ApiError(JOB_ERROR_STATUS.get(error["type"], 500), error["message"], type=error["type"])
