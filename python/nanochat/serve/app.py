"""The HTTP app: ``create_app(backend, settings)`` builds a FastAPI app serving one model in OpenAI's API shape.

Endpoints: ``GET /`` (the chat page), ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true`` = server-sent events; ``logprobs``,
penalties and ``logit_bias`` included), llama-server's ``POST /tokenize`` and ``POST /detokenize``,
``GET /openapi.json`` (and Swagger UI at ``/docs`` with ``Settings.docs``).

Notable choices (after llama-cpp-python's server, minus its event-loop-blocking generation):
- Nothing proportional to the input runs on the event loop: tokenization (a 1 MiB prompt takes seconds) runs in a
  small thread pool, after a free check that rejects prompts that cannot fit the context whatever they tokenize to
  (a token holds at most ``max_token_bytes`` bytes). Generation runs in worker threads (a pool of
  ``max_concurrent``) that hand deltas to the loop through an ``asyncio.Queue``. ``/health`` and every running
  stream keep answering meanwhile.
- Slots: at most ``max_concurrent`` generations run; up to ``max_queue`` more wait in a FIFO queue
  (:class:`SlotPool`), and beyond that a request gets a 503 with ``Retry-After`` at once (an unbounded queue only
  turns a burst into minutes of waiting). A slot is given back when the worker thread has *finished*, not when the
  response ends, so a cancelled generation still holds its slot until it has actually stopped (checked before every
  token). With :class:`~nanochat.serve.backend.EngineBackend` the running generations share one batched decode step
  per token (continuous batching), so ``max_concurrent`` is also the largest batch.
- The first delta is read before a stream's response starts, so an error up to the first token (prefill) is a
  proper HTTP error, not a 200 with a broken stream.
- A client that goes away stops its generation: while waiting (queue, prefill, a non-streamed reply) the request
  polls ``request.is_disconnected()``; during a stream Starlette cancels the response, and the response's
  ``finally`` sets the cancel event unless the stream was delivered in full. The worker checks it before every
  token; with the batching backend the sequence leaves the batch at the next step.
- Shutdown (``app.state.begin_shutdown()``, called by :mod:`nanochat.serve.server` on SIGTERM before uvicorn stops):
  queued and new requests get an OpenAI-shaped 503 at once; running generations get ``shutdown_grace`` seconds, then
  a stream ends with an error event and ``[DONE]`` (a non-streamed request with a 503), so no client sees a cut.
- Errors are OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with 4xx codes: FastAPI's 422
  validation errors become 400 (and the OpenAPI spec says so), unknown paths 404, bad keys 401, large bodies 413,
  slow bodies 408. An unexpected exception is a 500 in the same shape, logged with its traceback; the server keeps
  serving.
- Pure ASGI middlewares (no BaseHTTPMiddleware, which buffers streams): request log + request metrics (outermost),
  API key check (everything but ``/``, ``/health`` and ``/metrics``; several Authorization headers are a 400),
  body size and time limits (by Content-Length, then by bytes actually received, within ``body_timeout``).
- The chat page's Content-Security-Policy allows only its own inline script and style, by a per-response nonce:
  a second barrier behind the page's escaping (it inserts model text with ``textContent`` only).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanochat import __version__
from nanochat.serve.backend import Backend, Delta, SamplingParams, TokenLogprob, TokenTexts
from nanochat.serve.metrics import Metrics, endpoint_label
from nanochat.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobEntry,
    TokenPiece,
    TopLogprob,
    Usage,
    error_json,
)
from nanochat.serve.settings import Settings

log = logging.getLogger("nanochat.serve")
T = TypeVar("T")

SCOPE_T0 = "nanochat.t0"  # request start (perf_counter), set by the log middleware
SCOPE_TOKENS = "nanochat.tokens"  # (prompt, completion) tokens, set by the generation endpoints
SCOPE_NOTE = "nanochat.note"  # e.g. "client gone", for the log line
DISCONNECT_POLL_S = 0.2  # how often a waiting request checks whether its client is still there
CLIENT_CLOSED = 499  # nginx's "client closed request": logged for requests whose client left before a response
CSP = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_OPEN_TAG = re.compile(r"^<(script|style)>$", re.MULTILINE)  # the page's own elements, each on a line of its own
SSE_EVENT_SCHEMA = {  # one server-sent event, as OpenAPI 3.2's itemSchema describes the items of a stream
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk, a JSON error object, or [DONE]"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
OPEN_PATHS = frozenset({"/", "/health", "/metrics"})  # never behind the API key: the page, probes, scrapers
RETRY_AFTER_S = 2  # what a 503 "queue full" asks clients to wait before retrying
TOKENIZER_THREADS = 2  # tokenization off the event loop (the tokenizer releases the GIL)


# --------------------------------------------------------------------------- errors


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


def _validation_error(exc: RequestValidationError) -> APIError:
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


# --------------------------------------------------------------------------- middlewares


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


# --------------------------------------------------------------------------- generation plumbing


class QueueFull(Exception):
    """Every slot is taken and ``max_queue`` requests are already waiting."""


class SlotPool:
    """``n`` generation slots handed out in arrival order (an exact FIFO, unlike a bare lock), with at most
    ``max_queue`` waiters (``None``: unbounded); :meth:`acquire` raises :class:`QueueFull` beyond that."""

    def __init__(self, n: int, max_queue: int | None = None) -> None:
        self.free = n
        self.max_queue = max_queue
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    @property
    def full(self) -> bool:
        """A request arriving now would be refused."""
        return (
            not (self.free > 0 and not self.waiting) and self.max_queue is not None and self.waiting >= self.max_queue
        )

    def try_acquire(self) -> bool:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return True
        return False

    def fail_waiters(self, exc: BaseException) -> None:
        """Every waiting :meth:`acquire` raises ``exc`` (shutdown); later callers are not affected."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        if self.full:
            raise QueueFull()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: pass the slot on
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class Generation:
    """One request's generation: the backend's blocking stream in a worker thread, deltas out through a queue."""

    def __init__(self, backend: Backend, prompt_ids: list[int], params: SamplingParams, metrics: Metrics, t0: float):
        self.backend, self.prompt_ids, self.params, self.metrics, self.t0 = backend, prompt_ids, params, metrics, t0
        self.cancel = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.completion_tokens = 0  # counted on the loop side, from the deltas consumed
        self.logprobs: list[TokenLogprob] = []  # of the deltas consumed, when the request asked for them
        self.delivered = False  # the response reached its end (last event sent, or the error reported)

    def run(self) -> None:
        """Worker thread body."""
        last: float | None = None
        try:
            for d in self.backend.stream(self.prompt_ids, self.params, self.cancel):
                if d.token_id is not None:
                    now = time.perf_counter()
                    if last is None:
                        self.metrics.time_to_first_token.observe(now - self.t0)
                    else:
                        self.metrics.time_per_output_token.observe(now - last)
                    last = now
                    self.metrics.generated_tokens.inc()
                self._put(d)
                if d.finish_reason is not None:
                    return
            self._put(RuntimeError("the backend's stream ended without a finish reason"))
        except BaseException as e:  # handed to the request, which answers with an error
            self._put(e)

    def _put(self, item: Delta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.cancel.set()  # the loop is closed: the server is shutting down

    def abort(self, err: BaseException) -> None:
        """End this generation now, from the loop: the reader gets ``err`` next, without waiting for the worker
        (which may be inside a long prefill); the worker stops before its next token."""
        self.cancel.set()
        self.queue.put_nowait(err)

    async def next(self) -> Delta:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.token_id is not None:
            self.completion_tokens += 1
        if item.logprob is not None:
            self.logprobs.append(item.logprob)
        return item

    async def collect(self) -> tuple[str, Delta]:
        """The whole text and the last delta."""
        parts: list[str] = []
        while True:
            d = await self.next()
            parts.append(d.text)
            if d.finish_reason is not None:
                return "".join(parts), d


async def _unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw``, polling the client; raise :class:`ClientDisconnected` (cancelling ``aw``) if it leaves."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if task in done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()


def _backend_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):  # e.g. the server is shutting down
        return e
    if isinstance(e, ValueError):  # the backend refused the request's values
        return APIError(400, str(e), code="invalid_value")
    log.error("generation failed", exc_info=(type(e), e, e.__traceback__))
    return APIError(500, f"Generation failed: {type(e).__name__}: {e}", type_="server_error", code="generation_error")


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# --------------------------------------------------------------------------- the app


class Chunk(Protocol):
    """Builds one SSE chunk: ``chunk(text, finish_reason, logprobs)``."""

    def __call__(self, text: str | None, finish: str | None, lps: list[TokenLogprob], /) -> dict[str, Any]: ...


def _chat_page() -> str:
    return resources.files("nanochat.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


def _with_nonce(page: str, nonce: str) -> str:
    """The page with ``nonce`` on its (only) ``<script>`` and ``<style>`` elements, for a CSP without
    'unsafe-inline'."""
    return _OPEN_TAG.sub(lambda m: f'<{m.group(1)} nonce="{nonce}">', page)


def _max_token_bytes(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes one token decodes to, if the tokenizer can say (``token_bytes()``), else ``None``.

    Every character is at least one byte, so a text of ``n`` characters is at least ``n / max_token_bytes`` tokens:
    a bound checked before tokenizing, for free."""
    table = getattr(tokenizer, "token_bytes", None)
    if table is None:
        return None
    try:
        return max(1, int(max(table())))
    except Exception:  # an unusual tokenizer: no bound, just tokenize
        log.warning("cannot read the tokenizer's token lengths: prompts are tokenized before the size check")
        return None


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries in OpenAI's error shape for ``codes``."""
    what = {
        400: "Invalid request (OpenAI's error shape; `param` names the field)",
        401: "Missing or wrong API key (only when the server has one)",
        404: "Unknown model (`code`: `model_not_found`)",
        408: "The request body did not arrive in time",
        413: "Request body too large",
        500: "Unexpected server error",
        503: "Overloaded (queue full, with `Retry-After`) or shutting down",
    }
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}


def create_app(backend: Backend, settings: Settings | None = None) -> FastAPI:
    """A FastAPI app serving ``backend`` (see the module docstring)."""
    settings = settings or Settings()
    metrics = Metrics(backend.model_id, backend.context_length, settings.max_concurrent, settings.max_queue)
    slots = SlotPool(settings.max_concurrent, settings.max_queue)
    executor = ThreadPoolExecutor(max_workers=settings.max_concurrent, thread_name_prefix="nanochat-gen")
    tokenizer_pool = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="nanochat-tok")
    active: set[Generation] = set()
    created = int(time.time())
    page = _chat_page()
    tokens_limit = min(settings.max_tokens_limit or backend.context_length, backend.context_length)
    max_token_bytes = _max_token_bytes(backend.tokenizer)
    token_texts = TokenTexts(backend.tokenizer)
    stopping = False  # set once by begin_shutdown

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for g in list(active):
            g.cancel.set()
        executor.shutdown(wait=False, cancel_futures=True)
        tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="nanochat",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.backend = backend
    app.state.settings = settings
    app.state.metrics = metrics

    def begin_shutdown() -> None:
        """Stop taking work (called on the loop when the server begins to stop, before it waits for connections):
        queued requests get a 503 now, running ones after ``shutdown_grace`` seconds."""
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info(
            "shutting down: %d queued requests refused, %d running get %gs",
            slots.waiting,
            len(active),
            settings.shutdown_grace,
        )
        metrics.rejected.labels(reason="shutting_down").inc(slots.waiting)
        slots.fail_waiters(shutting_down_error())

        def cut() -> None:
            for g in list(active):
                g.abort(shutting_down_error())

        asyncio.get_running_loop().call_later(settings.shutdown_grace, cut)

    app.state.begin_shutdown = begin_shutdown

    # ---------------------------------------------------------------- error handlers
    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc).response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            msg, code = f"Unknown request URL: {request.method} {request.url.path}.", "not_found"
        elif exc.status_code == 405:
            msg, code = f"Method {request.method} is not allowed for {request.url.path}.", "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        return APIError(exc.status_code, msg, code=code).response()

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
        return APIError(500, "The server had an error while processing your request.", type_="server_error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)

    # last added = outermost: log -> api key -> body limit -> app
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestLogMiddleware, metrics=metrics, enabled=settings.log_requests)

    # ---------------------------------------------------------------- helpers
    def check_model(name: str | None) -> None:
        if name is not None and name != backend.model_id:
            raise APIError(
                404,
                f"The model '{name}' does not exist. This server serves '{backend.model_id}'.",
                param="model",
                code="model_not_found",
            )

    def admit() -> None:
        """Refuse at once what would be refused later anyway (before any tokenizing)."""
        if stopping:
            metrics.rejected.labels(reason="shutting_down").inc()
            raise shutting_down_error()
        if slots.full:
            metrics.rejected.labels(reason="queue_full").inc()
            raise queue_full_error(settings.max_concurrent, settings.max_queue)

    def too_long(tokens: int, what: str, at_least: bool = False) -> APIError:
        ctx = backend.context_length
        return APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your {what} is "
            f"{'at least ' if at_least else ''}{tokens} tokens (at least one token must be left for the completion). "
            "Please shorten it.",
            param="messages" if what == "messages" else "prompt",
            code="context_length_exceeded",
        )

    def check_chars(chars: int, specials: int, what: str) -> None:
        """A prompt of ``chars`` characters (plus ``specials`` special tokens) that cannot fit, whatever it
        tokenizes to, is refused before tokenizing (see :func:`_max_token_bytes`)."""
        if max_token_bytes is None:
            return
        lower = -(-chars // max_token_bytes) + specials
        if lower >= backend.context_length:
            raise too_long(lower, what, at_least=True)

    async def off_loop(fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (tokenization: time proportional to the input) in the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(tokenizer_pool, fn, *args)

    def sampling_params(
        req: SamplingRequest, asked: int | None, prompt_len: int, default: int, what: str
    ) -> SamplingParams:
        ctx = backend.context_length
        if prompt_len >= ctx:
            raise too_long(prompt_len, what)
        if asked is None:
            max_tokens = max(1, min(default, tokens_limit, ctx - prompt_len))
        elif asked > tokens_limit:
            raise APIError(
                400,
                f"max_tokens is too large: {asked}. This server allows at most {tokens_limit} completion tokens.",
                param="max_tokens",
                code="invalid_value",
            )
        elif prompt_len + asked > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, you requested {prompt_len + asked} "
                f"tokens ({prompt_len} in the {what}, {asked} in the completion). Please reduce the length of the "
                f"{what} or the completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        else:
            max_tokens = asked
        bias = req.logit_bias_items()
        vocab = backend.tokenizer.vocab_size
        outside = [i for i, _ in bias if i >= vocab]
        if outside:
            raise APIError(400, f"logit_bias names token {outside[0]}, outside the vocabulary [0, {vocab}).",
                           param="logit_bias", code="invalid_value")  # fmt: skip
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=req.top_k or 0,
            stop=req.stop_list(),
            stop_token_ids=frozenset() if req.ignore_eos else backend.stop_token_ids,
            seed=req.seed,
            logprobs=req.logprobs_k() if isinstance(req, ChatCompletionRequest | CompletionRequest) else None,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            logit_bias=bias,
        )

    async def start(request: Request, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Wait for a slot (FIFO, bounded), then start the worker; the slot is given back when the worker is done."""
        if stopping:
            metrics.rejected.labels(reason="shutting_down").inc()
            raise shutting_down_error()
        gen = Generation(backend, prompt_ids, params, metrics, request.scope.get(SCOPE_T0, time.perf_counter()))
        if not slots.try_acquire():
            metrics.queued.inc()
            try:
                await _unless_disconnected(request, slots.acquire())
            except QueueFull:
                metrics.rejected.labels(reason="queue_full").inc()
                raise queue_full_error(settings.max_concurrent, settings.max_queue) from None
            finally:
                metrics.queued.dec()
        metrics.in_flight.inc()
        metrics.prompt_tokens.inc(len(prompt_ids))
        active.add(gen)
        try:
            fut = gen.loop.run_in_executor(executor, gen.run)
        except RuntimeError:  # executor shut down: the server is stopping
            metrics.in_flight.dec()
            active.discard(gen)
            slots.release()
            raise shutting_down_error() from None

        def done(_: object) -> None:
            metrics.in_flight.dec()
            active.discard(gen)
            slots.release()

        fut.add_done_callback(done)
        return gen

    def chat_logprobs(lps: list[TokenLogprob]) -> ChoiceLogprobs:
        """OpenAI's chat shape: one entry per token, with its text, bytes and the most likely alternatives."""

        def top(i: int, v: float) -> TopLogprob:
            text, raw = token_texts(i)
            return TopLogprob(token=text, logprob=v, bytes=raw)

        entries = []
        for lp in lps:
            text, raw = token_texts(lp.token_id)
            alternatives = [top(i, v) for i, v in lp.top]
            entries.append(TokenLogprobEntry(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=alternatives))
        return ChoiceLogprobs(content=entries)

    def completion_logprobs(lps: list[TokenLogprob], offset: int) -> tuple[CompletionLogprobs, int]:
        """OpenAI's legacy completions shape, its text offsets starting at ``offset``; also the next offset."""
        tokens, offsets = [], []
        for lp in lps:
            offsets.append(offset)
            text = token_texts(lp.token_id)[0]
            tokens.append(text)
            offset += len(text)
        tops = [{token_texts(i)[0]: v for i, v in reversed(lp.top)} for lp in lps]  # the likeliest wins a tie
        tops = [dict(sorted(t.items(), key=lambda kv: -kv[1])) for t in tops]
        out = CompletionLogprobs(
            tokens=tokens, token_logprobs=[lp.logprob for lp in lps], top_logprobs=tops, text_offset=offsets
        )
        return out, offset

    def client_gone(request: Request, gen: Generation | None) -> Response:
        if gen is not None:
            gen.cancel.set()
        metrics.cancelled.inc()
        request.scope[SCOPE_NOTE] = "client gone"
        return Response(status_code=CLIENT_CLOSED)

    def usage(gen: Generation) -> Usage:
        p, c = len(gen.prompt_ids), gen.completion_tokens
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    async def generate(
        request: Request,
        req: SamplingRequest,
        prompt_ids: list[int],
        params: SamplingParams,
        chunk: Chunk,
        whole: Callable[[str, str, Usage, list[TokenLogprob]], dict[str, Any]],
        opening: dict[str, Any] | None = None,
    ) -> Response:
        """Run a generation and answer it whole (``whole(text, finish_reason, usage, logprobs)``) or as SSE events:
        ``opening`` (if any), ``chunk(text, None, logprobs)`` per delta with text, ``chunk(None, finish_reason,
        logprobs)``, [DONE]; each chunk carries the logprobs of the tokens consumed since the previous one."""
        gen: Generation | None = None
        try:
            gen = await start(request, prompt_ids, params)
            if not req.stream:
                text, last = await _unless_disconnected(request, gen.collect())
            else:
                last = await _unless_disconnected(request, gen.next())
        except ClientDisconnected:
            return client_gone(request, gen)
        except APIError:
            raise
        except Exception as e:
            raise _backend_error(e) from e
        request.scope[SCOPE_TOKENS] = (len(prompt_ids), gen.completion_tokens)
        if last.finish_reason == "cancelled":
            raise shutting_down_error()
        if not req.stream:
            return JSONResponse(whole(text, last.finish_reason or "stop", usage(gen), gen.logprobs))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return GenerationStream(gen, stream_events(gen, last, chunk, opening, include_usage))

    async def stream_events(
        gen: Generation,
        first: Delta,
        chunk: Chunk,
        opening: dict[str, Any] | None,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        try:
            if opening is not None:  # chat: the chunk that carries the role
                yield _sse(opening)
            d = first
            sent = 0  # logprobs already sent

            def unsent() -> list[TokenLogprob]:
                nonlocal sent
                out, sent = gen.logprobs[sent:], len(gen.logprobs)
                return out

            while True:
                if d.text:
                    yield _sse(chunk(d.text, None, unsent()))
                if d.finish_reason is not None:
                    break
                d = await gen.next()
            if d.finish_reason == "cancelled":  # cancelled from our side, without an abort: shutting down
                raise shutting_down_error()
            yield _sse(chunk(None, d.finish_reason, unsent()))
            if include_usage:
                yield _sse({**chunk(None, None, []), "choices": [], "usage": usage(gen).model_dump()})
            yield _sse("[DONE]")
            gen.delivered = True
        except Exception as e:  # a backend failure or shutdown mid-stream: report it in-band, then end the stream
            err = _backend_error(e)
            yield _sse(error_json(err.message, err.type, err.param, err.code))
            yield _sse("[DONE]")
            gen.delivered = True

    class GenerationStream(StreamingResponse):
        """SSE response that stops its generation if it ends undelivered: Starlette cancels a stream whose client
        went away, possibly before the body iterator ever started (so its own ``finally`` would never run)."""

        def __init__(self, gen: Generation, events: AsyncIterator[bytes]) -> None:
            super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
            self.gen = gen

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                gen = self.gen
                scope[SCOPE_TOKENS] = (len(gen.prompt_ids), gen.completion_tokens)
                if not gen.delivered and not gen.cancel.is_set():
                    gen.cancel.set()  # the client went away: stop generating (the worker sees it before its next token)
                    metrics.cancelled.inc()
                    scope[SCOPE_NOTE] = "client gone"

    # ---------------------------------------------------------------- routes
    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        nonce = secrets.token_urlsafe(18)
        return HTMLResponse(
            _with_nonce(page, nonce),
            headers={
                "Content-Security-Policy": CSP.format(nonce=nonce),
                "Cache-Control": "no-store",  # a nonce is good for one response only
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    @app.get("/health", responses={503: {"description": "Shutting down"}})
    async def health() -> JSONResponse:
        body = {
            "status": "shutting_down" if stopping else "ok",
            "model": backend.model_id,
            "engine": str(getattr(backend, "mode", type(backend).__name__)),
            "in_flight": len(active),
            "queued": slots.waiting,
            "max_concurrent": settings.max_concurrent,
            "max_queue": settings.max_queue,
        }
        return JSONResponse(body, status_code=503 if stopping else 200)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def card() -> ModelCard:
        return ModelCard(
            id=backend.model_id,
            created=created,
            context_length=backend.context_length,
            max_completion_tokens=tokens_limit,
        )

    key_errors = (401,) if settings.api_key else ()

    @app.get("/v1/models", response_model=ModelList, responses=_error_responses(*key_errors))
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=_error_responses(*key_errors, 404))
    async def get_model(model: str) -> ModelCard:
        check_model(model)
        return card()

    generation_responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "The completion (`stream: false`), or server-sent events: `data: {chunk}` lines, then "
            '`data: [DONE]`; an error after the first event is sent as `data: {"error": ...}` before `[DONE]`',
            "content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}},
        },
        **_error_responses(400, *key_errors, 404, 408, 413, 500, 503),
    }

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=generation_responses)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        admit()
        messages = [{"role": m.template_role(), "content": m.text()} for m in body.messages]
        check_chars(sum(len(m["content"]) for m in messages), 2 * len(messages) + 2, "messages")
        prompt_ids = list(await off_loop(backend.tokenizer.render_chat, messages))
        params = sampling_params(body, body.requested_max_tokens(), len(prompt_ids), backend.context_length, "messages")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(
            text: str | None, finish: str | None, lps: list[TokenLogprob], delta: dict[str, Any] | None = None
        ) -> dict[str, Any]:
            delta = delta if delta is not None else ({} if text is None else {"content": text})
            wanted = params.logprobs is not None and (text is not None or lps)  # content chunks, or leftovers
            logprobs = chat_logprobs(lps).model_dump() if wanted else None
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": backend.model_id,
                    "system_fingerprint": None, "choices": [choice]}  # fmt: skip

        def whole(text: str, finish: str, use: Usage, lps: list[TokenLogprob]) -> dict[str, Any]:
            logprobs = chat_logprobs(lps) if params.logprobs is not None else None
            choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
            return ChatCompletion(id=rid, created=now, model=backend.model_id, choices=[choice], usage=use).model_dump()

        opening = chunk(None, None, [], {"role": "assistant", "content": ""})
        return await generate(request, body, prompt_ids, params, chunk, whole, opening)

    @app.post("/v1/completions", response_model=Completion, responses=generation_responses)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        admit()
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            if len(prompt) >= backend.context_length:  # before the scan below: its time grows with the body
                raise too_long(len(prompt), "prompt")
            vocab = backend.tokenizer.vocab_size
            bad = [t for t in prompt if not 0 <= int(t) < vocab]
            if bad:
                raise APIError(400, f"Token id {bad[0]} is outside the vocabulary [0, {vocab}).", param="prompt",
                               code="invalid_value")  # fmt: skip
            prompt_ids = [int(t) for t in prompt]
        else:
            text = prompt if isinstance(prompt, str) else str(prompt[0])
            check_chars(len(text), 1, "prompt")
            # documents start with <|bos|>
            prompt_ids = [backend.tokenizer.bos_id, *await off_loop(backend.tokenizer.encode, text)]
        params = sampling_params(body, body.requested_max_tokens(), len(prompt_ids), 16, "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        offset = 0  # text_offset of the next token, across a stream's chunks

        def comp_logprobs(lps: list[TokenLogprob]) -> dict[str, Any] | None:
            nonlocal offset
            if params.logprobs is None:
                return None
            out, offset = completion_logprobs(lps, offset)
            return out.model_dump()

        def chunk(text: str | None, finish: str | None, lps: list[TokenLogprob]) -> dict[str, Any]:
            choice = {"index": 0, "text": text or "", "logprobs": comp_logprobs(lps), "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": now, "model": backend.model_id,
                    "system_fingerprint": None, "choices": [choice]}  # fmt: skip

        def whole(text: str, finish: str, use: Usage, lps: list[TokenLogprob]) -> dict[str, Any]:
            logprobs = comp_logprobs(lps)
            choice = CompletionChoice(text=text, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
            return Completion(id=rid, created=now, model=backend.model_id, choices=[choice], usage=use).model_dump()

        return await generate(request, body, prompt_ids, params, chunk, whole)

    # ---------------------------------------------------------------- llama-server's token endpoints
    parses_special = "allow_special" in inspect.signature(backend.tokenizer.encode).parameters
    special_text = {i: t for t, i in getattr(backend.tokenizer, "special_ids", {}).items()}

    def encode_for_tokenize(text: str, parse_special: bool) -> list[int]:
        if parses_special:
            return list(backend.tokenizer.encode(text, allow_special=parse_special))  # type: ignore[call-arg]
        return list(backend.tokenizer.encode(text))

    def piece(i: int) -> str | list[int]:
        """llama-server's piece: the token's text, its bytes when they are not UTF-8 on their own."""
        if i in special_text:
            return special_text[i]
        text, raw = token_texts(i)
        try:
            return text if bytes(raw).decode("utf-8") == text else raw
        except UnicodeDecodeError:
            return raw

    token_responses = _error_responses(400, *key_errors, 408, 413, 500)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=token_responses)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of ``content`` (llama-server's schema); off the event loop, like every tokenization."""
        ids = await off_loop(encode_for_tokenize, body.content, body.parse_special)
        if body.add_special:
            ids = [backend.tokenizer.bos_id, *ids]
        if not body.with_pieces:
            return TokenizeResponse(tokens=ids)
        return TokenizeResponse(tokens=[TokenPiece(id=i, piece=piece(i)) for i in ids])

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=token_responses)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        vocab = backend.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is outside the vocabulary [0, {vocab}).", param="tokens",
                           code="invalid_value")  # fmt: skip
        return DetokenizeResponse(content=await off_loop(backend.tokenizer.decode, body.tokens))

    # ---------------------------------------------------------------- the spec says what the server answers
    def openapi() -> dict[str, Any]:
        """FastAPI's spec, minus its 422 (validation errors are 400 here) and the schemas only that 422 used."""
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
                for path, ops in spec.get("paths", {}).items():
                    if path not in OPEN_PATHS:
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
