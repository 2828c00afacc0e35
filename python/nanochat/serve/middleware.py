"""The app's pure ASGI middlewares (no ``BaseHTTPMiddleware``, which buffers streams), outermost first.

- :class:`RequestLogMiddleware`: one log line and the request metrics per request, once its response (a stream
  included) has ended; generation endpoints put their token counts and a note ("client gone") in the scope.
- :class:`ApiKeyMiddleware`: with a key, everything but :data:`OPEN_PATHS` needs ``Authorization: Bearer <key>``,
  checked before the body is read and in constant time; several Authorization headers are a 400.
- :class:`BodyLimitMiddleware`: body size (by Content-Length, then by bytes actually received) and body time
  limits, so a slow or huge upload never reaches the app.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanochat.serve.errors import APIError
from nanochat.serve.metrics import Metrics, endpoint_label

log = logging.getLogger("nanochat.serve")

SCOPE_T0 = "nanochat.t0"  # request start (perf_counter), set by the log middleware
SCOPE_TOKENS = "nanochat.tokens"  # (prompt, completion) tokens, set by the generation endpoints
SCOPE_NOTE = "nanochat.note"  # e.g. "client gone", for the log line
OPEN_PATHS = frozenset({"/", "/health", "/metrics"})  # never behind the API key: the page, probes, scrapers


class RequestLogMiddleware:
    """One log line and the request metrics per request, once the response (stream included) has ended."""

    def __init__(self, app: ASGIApp, metrics: Metrics, enabled: bool = True) -> None:
        self.app, self.metrics, self.enabled = app, metrics, enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope[SCOPE_T0] = t0
        status = 500  # if the app raises before starting a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            dt = time.perf_counter() - t0
            endpoint = endpoint_label(scope.get("path", ""))
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.request_duration.labels(endpoint=endpoint).observe(dt)
            if self.enabled:
                tokens = scope.get(SCOPE_TOKENS)
                tok = f" tokens={tokens[0]}+{tokens[1]}" if tokens else ""
                note = f" ({scope[SCOPE_NOTE]})" if scope.get(SCOPE_NOTE) else ""
                client = scope.get("client") or ("-", 0)
                log.info(
                    "%s %s %s %d%s %.3fs%s", client[0], scope.get("method"), scope.get("path"), status, tok, dt, note
                )


class ApiKeyMiddleware:
    """With a key, everything but :data:`OPEN_PATHS` needs ``Authorization: Bearer <key>`` (checked before the body
    is read; the key is compared in constant time). Several Authorization headers are a 400, not "the last wins"."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode("ascii") if api_key else None  # Settings refuses non-ASCII keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope.get("headers", []) if name == b"authorization"]
        scheme, _, token = (values[0] if values else b"").partition(b" ")
        if len(values) > 1:
            err = APIError(
                400, f"{len(values)} Authorization headers were sent; send exactly one.", code="invalid_request"
            )
        elif not values:
            err = APIError(
                401,
                "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.",
                code="invalid_api_key",
            )
        elif scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        else:
            await self.app(scope, receive, send)
            return
        await err.response()(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: at once by Content-Length, else while receiving (chunked uploads); 408
    (and the connection closed) for a body not received in full within ``timeout`` seconds (a slow-body client).

    The body is buffered here (it is at most ``max_bytes``) and replayed to the app; later ``receive`` calls go to
    the server, so disconnect detection still works.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    def _too_large(self, size: int | None) -> APIError:
        got = f" ({size} bytes)" if size is not None else ""
        return APIError(
            413, f"Request body too large{got}: the limit is {self.max_bytes} bytes.", code="request_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await APIError(400, "Invalid Content-Length header.", code="invalid_request").response()(
                        scope, receive, send
                    )
                    return
                if declared > self.max_bytes:
                    await self._too_large(declared).response()(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                err = APIError(
                    408,
                    f"The request body was not received within {self.timeout:g} seconds.",
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
                await err.response()(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(None).response()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
