"""Errors in OpenAI's shape: the :class:`APIError` every layer raises, the standard ones, and the app's handlers.

Notable choices:
- One exception type for every answer that is not a success: ``APIError(status, message, type, param, code)``
  renders ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with its status and headers.
- FastAPI's 422 validation errors become 400 with ``param`` naming the field as OpenAI writes it
  (``messages[0].role``); unknown paths are 404, wrong methods 405, an unexpected exception a logged 500.
- A backend's ``ValueError`` is the request's fault (400); anything else it raises is the server's (500).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.serve.schemas import ErrorResponse, error_json

log = logging.getLogger("nanochat.serve")

RETRY_AFTER_S = 2  # what a 503 "queue full" asks clients to wait before retrying


class APIError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

        self.headers: dict[str, str] = dict(headers or {})
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def response(self) -> JSONResponse:
        return JSONResponse(error_json(self.message, self.type, self.param, self.code), self.status, self.headers)


def shutting_down_error() -> APIError:
    return APIError(
        503,
        "The server is shutting down; retry on another instance or once it is back.",
        type_="server_error",
        code="server_shutting_down",
        headers={"Connection": "close"},
    )


def queue_full_error(max_concurrent: int, max_queue: int) -> APIError:
    return APIError(
        503,
        f"The server is overloaded: {max_concurrent} generations are running and {max_queue} requests are waiting. "
        f"Retry after {RETRY_AFTER_S} seconds.",
        type_="server_error",
        code="server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class ClientDisconnected(Exception):
    """The client went away while its request waited."""


class QueueFull(Exception):
    """Every slot is taken and ``max_queue`` requests are already waiting."""


def _param_of(loc: Iterable[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``; pydantic's union-member tags are dropped."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part) in {"str", "int", "float", "bool", "list", "dict", "none"}:
            continue  # e.g. "list[str]": which union member failed
        else:
            out += ("." if out else "") + str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "Invalid request body", code="invalid_request")
    first = errors[0]
    param = _param_of(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(
            400, f"We could not parse the JSON body of your request: {detail}".rstrip(": "), code="invalid_json"
        )
    if kind == "missing":
        if param is None:
            return APIError(400, "The request body is missing (expected a JSON object)", code="invalid_request")
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if param is None:
        return APIError(
            400, f"Invalid request body: {first.get('msg', '')} (expected a JSON object)", code="invalid_request"
        )
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" ({len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return APIError(400, f"Invalid value for '{param}': {msg}.{more}", param=param, code="invalid_value")


def backend_error(e: BaseException) -> APIError:
    """What a generation's exception answers: itself (an APIError), 400 (a ValueError: the backend refused the
    request's values) or a logged 500."""
    if isinstance(e, APIError):  # e.g. the server is shutting down
        return e
    if isinstance(e, ValueError):
        return APIError(400, str(e), code="invalid_value")
    log.error("generation failed", exc_info=(type(e), e, e.__traceback__))
    return APIError(500, f"Generation failed: {type(e).__name__}: {e}", type_="server_error", code="generation_error")


ERROR_DESCRIPTIONS = {
    400: "Invalid request (OpenAI's error shape; `param` names the field)",
    401: "Missing or wrong API key (only when the server has one)",
    404: "Unknown model (`code`: `model_not_found`)",
    408: "The request body did not arrive in time",
    413: "Request body too large",
    500: "Unexpected server error",
    503: "Overloaded (queue full, with `Retry-After`) or shutting down",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries in OpenAI's error shape for ``codes``."""
    return {c: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[c]} for c in codes}


async def _on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc).response()


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        msg, code = f"Unknown request URL: {request.method} {request.url.path}.", "not_found"
    elif exc.status_code == 405:
        msg, code = f"Method {request.method} is not allowed for {request.url.path}.", "method_not_allowed"
    else:
        msg, code = str(exc.detail), None
    return APIError(exc.status_code, msg, code=code).response()


async def _on_unexpected(_: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, "The server had an error while processing your request.", type_="server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can meet, answered in OpenAI's shape."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
