"""The HTTP app: ``create_app(backend, settings)`` builds a FastAPI app serving one model in OpenAI's API shape.

The app is wired from modules that each read on their own:
- :mod:`.errors`: :class:`~nanochat.serve.errors.APIError` (OpenAI's error shape) and the exception handlers
  (validation errors are 400, unknown paths 404, unexpected exceptions a logged 500; the server keeps serving);
- :mod:`.middleware`: request log and metrics, API key, body size and time limits (pure ASGI: streams pass);
- :mod:`.generation`: :class:`~nanochat.serve.generation.Service`, the app's state: slots and the bounded queue,
  worker threads, tokenization off the event loop, streaming, disconnects and graceful shutdown;
- :mod:`.routes`: the endpoints (the chat page, /health, /metrics, /v1/models, /v1/chat/completions,
  /v1/completions, llama-server's /infill, /tokenize and /detokenize);
- :mod:`.backend`: the generation backend protocol and its ``nanochat.engine`` implementation.

Here: the lifespan, the middleware order, and the OpenAPI spec, which says what the server answers (400 rather
than FastAPI's 422; with an API key, 401 and a bearer scheme on every path but the open ones). Swagger UI at
``/docs`` only with ``Settings.docs``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from nanochat import __version__
from nanochat.serve.backend import Backend
from nanochat.serve.errors import error_responses, install_error_handlers
from nanochat.serve.generation import Service
from nanochat.serve.middleware import OPEN_PATHS, ApiKeyMiddleware, BodyLimitMiddleware, RequestLogMiddleware
from nanochat.serve.routes import chat_page, router
from nanochat.serve.settings import Settings


def create_app(backend: Backend, settings: Settings | None = None) -> FastAPI:
    """A FastAPI app serving ``backend`` (see the module docstring). ``app.state`` holds ``service``,
    ``backend``, ``settings``, ``metrics`` and ``begin_shutdown`` (called by :mod:`nanochat.serve.server`)."""
    settings = settings or Settings()
    svc = Service(backend, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        svc.close()

    app = FastAPI(
        title="nanochat",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.service = svc
    app.state.backend = backend
    app.state.settings = settings
    app.state.metrics = svc.metrics
    app.state.begin_shutdown = svc.begin_shutdown
    app.state.page = chat_page()
    install_error_handlers(app)
    # last added = outermost: log -> api key -> body limit -> app
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestLogMiddleware, metrics=svc.metrics, enabled=settings.log_requests)
    app.include_router(router)

    def openapi() -> dict[str, Any]:
        """FastAPI's spec, minus its 422 (validation errors are 400 here) and the schemas only that 422 used; with
        a key, the 401 and the bearer scheme on every path behind it."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for ops in spec.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            schemas = spec.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            if settings.api_key:
                spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                unauthorized = error_responses(401)[401]
                for path, ops in spec.get("paths", {}).items():
                    if path not in OPEN_PATHS:
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
                            op.setdefault("responses", {})["401"] = _schema_ref(spec, unauthorized)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _schema_ref(spec: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A ``responses`` entry for ``entry`` (``{"model", "description"}``) written as FastAPI writes one."""
    name = entry["model"].__name__
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    if name not in schemas:
        schemas[name] = entry["model"].model_json_schema(ref_template="#/components/schemas/{model}")
    return {
        "description": entry["description"],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
    }
