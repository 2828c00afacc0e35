"""Generation plumbing between the event loop and the backend: slots, worker threads, streaming, shutdown.

:class:`Service` is the app's state (one per app, at ``app.state.service``); the routes call it. Notable choices
(after llama-cpp-python's server, minus its event-loop-blocking generation):
- Nothing proportional to the input runs on the event loop: tokenization (a 1 MiB prompt takes seconds) runs in a
  small thread pool (:meth:`Service.off_loop`), after a free check that rejects prompts that cannot fit the context
  whatever they tokenize to (a token holds at most ``max_token_bytes`` bytes). Generation runs in worker threads (a
  pool of ``max_concurrent``) that hand deltas to the loop through an ``asyncio.Queue``, so ``/health`` and every
  running stream keep answering meanwhile.
- Slots: at most ``max_concurrent`` choices generate at once (a request with ``n`` choices takes ``n``); up to
  ``max_queue`` requests wait in a FIFO queue (:class:`SlotPool`), and beyond that a request gets a 503 with
  ``Retry-After`` at once (an unbounded queue only turns a burst into minutes of waiting). Slots are given back
  when the worker thread has *finished*, not when the response ends, so a cancelled generation still holds its slot
  until it has actually stopped (checked before every token). With
  :class:`~nanochat.serve.backend.EngineBackend` the running generations share one batched decode step per token
  (continuous batching), so ``max_concurrent`` is also the largest batch.
- The first delta is read before a stream's response starts, so an error up to the first token (prefill) is a
  proper HTTP error, not a 200 with a broken stream.
- A client that goes away stops its generation: while waiting (queue, prefill, a non-streamed reply) the request
  polls ``request.is_disconnected()``; during a stream Starlette cancels the response, and
  :class:`GenerationStream` sets the cancel event unless the stream was delivered in full.
- Shutdown (:meth:`Service.begin_shutdown`, called by :mod:`nanochat.serve.server` on SIGTERM before uvicorn
  stops): queued and new requests get an OpenAI-shaped 503 at once; running generations get ``shutdown_grace``
  seconds, then a stream ends with an error event and ``[DONE]`` (a non-streamed request with a 503).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from nanochat.engine.sampling import SamplingParams
from nanochat.serve.backend import Backend, Delta, GenerationParams, TokenLogprob, TokenTexts, model_kind
from nanochat.serve.errors import (
    APIError,
    ClientDisconnected,
    QueueFull,
    backend_error,
    queue_full_error,
    shutting_down_error,
)
from nanochat.serve.metrics import Metrics
from nanochat.serve.middleware import SCOPE_NOTE, SCOPE_T0, SCOPE_TOKENS
from nanochat.serve.schemas import (
    ChatCompletionRequest,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    ModelKind,
    PromptTokensDetails,
    SamplingRequest,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    error_json,
)
from nanochat.serve.settings import Settings

log = logging.getLogger("nanochat.serve")
T = TypeVar("T")

DISCONNECT_POLL_S = 0.2  # how often a waiting request checks whether its client is still there
CLIENT_CLOSED = 499  # nginx's "client closed request": logged for requests whose client left before a response
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TOKENIZER_THREADS = 2  # tokenization off the event loop (the tokenizer releases the GIL)


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
    """One request's generation (its ``n`` choices): the backend's blocking stream in a worker thread, deltas out
    through a queue."""

    def __init__(
        self, backend: Backend, prompt_ids: list[int], params: GenerationParams, metrics: Metrics, t0: float
    ) -> None:
        self.backend, self.prompt_ids, self.params, self.metrics, self.t0 = backend, prompt_ids, params, metrics, t0
        self.cancel = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.completion_tokens = 0  # counted on the loop side, from the deltas consumed (all choices)
        self.cached_tokens = 0  # prompt tokens the backend reused from its prompt cache
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(params.n)]  # per choice, of the deltas consumed
        self.delivered = False  # the response reached its end (last event sent, or the error reported)

    def run(self) -> None:
        """Worker thread body."""
        last: float | None = None
        finished = 0
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
                    finished += 1
                    if finished == self.params.n:
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
        self.cached_tokens = max(self.cached_tokens, item.cached_tokens)
        if item.logprob is not None:
            self.logprobs[item.index].append(item.logprob)
        return item

    async def collect(self) -> tuple[list[str], list[str]]:
        """Every choice's whole text and finish reason."""
        parts: list[list[str]] = [[] for _ in range(self.params.n)]
        finish: list[str | None] = [None] * self.params.n
        while any(f is None for f in finish):
            d = await self.next()
            parts[d.index].append(d.text)
            if d.finish_reason is not None:
                if d.finish_reason == "cancelled":  # cancelled from our side, without an abort: shutting down
                    raise shutting_down_error()
                finish[d.index] = d.finish_reason
        return ["".join(p) for p in parts], [f or "stop" for f in finish]

    def usage(self) -> Usage:
        p, c = len(self.prompt_ids), self.completion_tokens
        details = PromptTokensDetails(cached_tokens=self.cached_tokens)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, prompt_tokens_details=details)


async def unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
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


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Chunk(Protocol):
    """Builds one SSE chunk: ``chunk(text, finish_reason, logprobs, index)`` (``None``: no event)."""

    def __call__(
        self, text: str | None, finish: str | None, lps: list[TokenLogprob], index: int, /
    ) -> dict[str, Any] | None: ...


class Whole(Protocol):
    """Builds a non-streamed answer: ``whole(texts, finish_reasons, usage, logprobs)``, one entry per choice."""

    def __call__(
        self, texts: list[str], finish: list[str], usage: Usage, lps: list[list[TokenLogprob]], /
    ) -> dict[str, Any]: ...


class GenerationStream(StreamingResponse):
    """SSE response that stops its generation if it ends undelivered: Starlette cancels a stream whose client went
    away, possibly before the body iterator ever started (so its own ``finally`` would never run)."""

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
                gen.metrics.cancelled.inc()
                scope[SCOPE_NOTE] = "client gone"


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


class Service:
    """The app's state and the generation steps every endpoint shares (see the module docstring)."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend, self.settings = backend, settings
        self.metrics = Metrics(backend.model_id, backend.context_length, settings.max_concurrent, settings.max_queue)
        self.slots = SlotPool(settings.max_concurrent, settings.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=settings.max_concurrent, thread_name_prefix="nanochat-gen")
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="nanochat-tok")
        self.active: set[Generation] = set()
        self.created = int(time.time())
        ctx = backend.context_length
        self.tokens_limit = min(settings.max_tokens_limit or ctx, ctx)  # the largest max_tokens accepted
        self.max_token_bytes = _max_token_bytes(backend.tokenizer)
        self.token_texts = TokenTexts(backend.tokenizer)
        # base or chat: a backend says (EngineBackend reads the file's declaration), or its tokenizer tells
        self.kind: ModelKind = getattr(backend, "kind", None) or model_kind(backend.tokenizer)
        self.stopping = False  # set once by begin_shutdown

    def close(self) -> None:
        """The app's lifespan ended: cancel what still runs, stop the pools."""
        for g in list(self.active):
            g.cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def begin_shutdown(self) -> None:
        """Stop taking work (called on the loop when the server begins to stop, before it waits for connections):
        queued requests get a 503 now, running ones after ``shutdown_grace`` seconds."""
        if self.stopping:
            return
        self.stopping = True
        log.info(
            "shutting down: %d queued requests refused, %d running get %gs",
            self.slots.waiting,
            len(self.active),
            self.settings.shutdown_grace,
        )
        self.metrics.rejected.labels(reason="shutting_down").inc(self.slots.waiting)
        self.slots.fail_waiters(shutting_down_error())

        def cut() -> None:
            for g in list(self.active):
                g.abort(shutting_down_error())

        asyncio.get_running_loop().call_later(self.settings.shutdown_grace, cut)

    # ---------------------------------------------------------------- checks before any work
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.backend.model_id:
            raise APIError(
                404,
                f"The model '{name}' does not exist. This server serves '{self.backend.model_id}'.",
                param="model",
                code="model_not_found",
            )

    def admit(self) -> None:
        """Refuse at once what would be refused later anyway (before any tokenizing)."""
        if self.stopping:
            self.metrics.rejected.labels(reason="shutting_down").inc()
            raise shutting_down_error()
        if self.slots.full:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise queue_full_error(self.settings.max_concurrent, self.settings.max_queue)

    def too_long(self, tokens: int, what: str, at_least: bool = False) -> APIError:
        ctx = self.backend.context_length
        return APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your {what} is "
            f"{'at least ' if at_least else ''}{tokens} tokens (at least one token must be left for the completion). "
            "Please shorten it.",
            param=what if what in ("messages", "prompt", "input_prefix") else "prompt",
            code="context_length_exceeded",
        )

    def check_chars(self, chars: int, specials: int, what: str) -> None:
        """A prompt of ``chars`` characters (plus ``specials`` special tokens) that cannot fit, whatever it
        tokenizes to, is refused before tokenizing (see :func:`_max_token_bytes`)."""
        if self.max_token_bytes is None:
            return
        lower = -(-chars // self.max_token_bytes) + specials
        if lower >= self.backend.context_length:
            raise self.too_long(lower, what, at_least=True)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (tokenization: time proportional to the input) in the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    def max_tokens(self, asked: int | None, prompt_len: int, default: int, what: str) -> int:
        """The completion budget: ``asked`` if it fits the context and the server's cap, else a 400; ``default``
        (clamped to what is left of the context) when not asked."""
        ctx = self.backend.context_length
        if prompt_len >= ctx:
            raise self.too_long(prompt_len, what)
        if asked is None:
            return max(1, min(default, self.tokens_limit, ctx - prompt_len))
        if asked > self.tokens_limit:
            raise APIError(
                400,
                f"max_tokens is too large: {asked}. This server allows at most {self.tokens_limit} completion tokens.",
                param="max_tokens",
                code="invalid_value",
            )
        if prompt_len + asked > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, you requested {prompt_len + asked} "
                f"tokens ({prompt_len} in the {what}, {asked} in the completion). Please reduce the length of the "
                f"{what} or the completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def check_n(self, n: int) -> None:
        if n > self.settings.max_concurrent:
            raise APIError(
                400,
                f"n is too large: {n}. This server generates at most {self.settings.max_concurrent} sequences at once.",
                param="n",
                code="invalid_value",
            )

    def generation_params(
        self, req: SamplingRequest, asked: int | None, prompt_len: int, default: int, what: str
    ) -> GenerationParams:
        """An OpenAI request's :class:`GenerationParams`, checked against the model (400s name the field)."""
        max_tokens = self.max_tokens(asked, prompt_len, default, what)
        self.check_n(req.n)
        bias = req.logit_bias_items()
        vocab = self.backend.tokenizer.vocab_size
        outside = [i for i, _ in bias if i >= vocab]
        if outside:
            raise APIError(400, f"logit_bias names token {outside[0]}, outside the vocabulary [0, {vocab}).",
                           param="logit_bias", code="invalid_value")  # fmt: skip
        json_object = req.json_object()
        if json_object and not getattr(self.backend, "constrained_decoding", False):
            raise APIError(400, "response_format JSON is not supported by this backend (no constrained decoding)",
                           param="response_format", code="invalid_value")  # fmt: skip
        if json_object and req.stop_list():
            raise APIError(400, "stop cannot be combined with a JSON response_format: a stop string could cut the "
                           "JSON value short", param="stop", code="invalid_value")  # fmt: skip
        sampling = SamplingParams(
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_k=req.top_k or None,
            top_p=None if req.top_p is None or req.top_p >= 1.0 else float(req.top_p),
            seed=req.seed,
        )
        return GenerationParams(
            max_tokens=max_tokens,
            sampling=sampling,
            stop=req.stop_list(),
            stop_token_ids=frozenset() if req.ignore_eos else self.backend.stop_token_ids,
            logprobs=req.logprobs_k() if isinstance(req, ChatCompletionRequest | CompletionRequest) else None,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            logit_bias=bias,
            n=req.n,
            json_object=json_object,
            json_schema=req.json_schema() if json_object else None,
        )

    # ---------------------------------------------------------------- running a generation
    async def start(self, request: Request, prompt_ids: list[int], params: GenerationParams) -> Generation:
        """Wait for ``n`` slots (FIFO, bounded), then start the worker; the slots are given back when the worker is
        done."""
        m = self.metrics
        if self.stopping:
            m.rejected.labels(reason="shutting_down").inc()
            raise shutting_down_error()
        gen = Generation(self.backend, prompt_ids, params, m, request.scope.get(SCOPE_T0, time.perf_counter()))
        held = 0
        try:
            while held < params.n:
                if not self.slots.try_acquire():
                    m.queued.inc()
                    try:
                        await unless_disconnected(request, self.slots.acquire())
                    finally:
                        m.queued.dec()
                held += 1
        except QueueFull:
            self._release(held)
            m.rejected.labels(reason="queue_full").inc()
            raise queue_full_error(self.settings.max_concurrent, self.settings.max_queue) from None
        except BaseException:
            self._release(held)
            raise
        m.in_flight.inc()
        m.prompt_tokens.inc(len(prompt_ids))
        self.active.add(gen)
        try:
            fut = gen.loop.run_in_executor(self.executor, gen.run)
        except RuntimeError:  # executor shut down: the server is stopping
            m.in_flight.dec()
            self.active.discard(gen)
            self._release(held)
            raise shutting_down_error() from None

        def done(_: object) -> None:
            m.in_flight.dec()
            self.active.discard(gen)
            self._release(held)

        fut.add_done_callback(done)
        return gen

    def _release(self, n: int) -> None:
        for _ in range(n):
            self.slots.release()

    def client_gone(self, request: Request, gen: Generation | None) -> Response:
        if gen is not None:
            gen.cancel.set()
        self.metrics.cancelled.inc()
        request.scope[SCOPE_NOTE] = "client gone"
        return Response(status_code=CLIENT_CLOSED)

    async def generate(
        self,
        request: Request,
        prompt_ids: list[int],
        params: GenerationParams,
        stream: bool,
        chunk: Chunk,
        whole: Whole,
        opening: Callable[[int], dict[str, Any]] | None = None,
        usage_chunk: Callable[[Usage], dict[str, Any]] | None = None,
        done_event: bool = True,
    ) -> Response:
        """Run a generation and answer it whole (``whole(texts, finish_reasons, usage, logprobs)``) or as SSE
        events: ``opening(i)`` per choice (if given), ``chunk(text, None, logprobs, i)`` per delta with text,
        ``chunk(None, finish_reason, logprobs, i)`` per choice, ``usage_chunk(usage)`` (if given), then ``[DONE]``
        (unless ``done_event`` is false, as llama-server's own endpoints have it). Each chunk carries the logprobs of
        its choice's tokens consumed since the previous one."""
        gen: Generation | None = None
        try:
            gen = await self.start(request, prompt_ids, params)
            if not stream:
                texts, finish = await unless_disconnected(request, gen.collect())
            else:
                first = await unless_disconnected(request, gen.next())
        except ClientDisconnected:
            return self.client_gone(request, gen)
        except APIError:
            raise
        except Exception as e:
            raise backend_error(e) from e
        request.scope[SCOPE_TOKENS] = (len(prompt_ids), gen.completion_tokens)
        if not stream:
            return JSONResponse(whole(texts, finish, gen.usage(), gen.logprobs))
        if first.finish_reason == "cancelled":
            raise shutting_down_error()
        return GenerationStream(gen, self._events(gen, first, chunk, opening, usage_chunk, done_event))

    async def _events(
        self,
        gen: Generation,
        first: Delta,
        chunk: Chunk,
        opening: Callable[[int], dict[str, Any]] | None,
        usage_chunk: Callable[[Usage], dict[str, Any]] | None,
        done_event: bool,
    ) -> AsyncIterator[bytes]:
        n = gen.params.n
        sent = [0] * n  # logprobs already sent, per choice

        def unsent(i: int) -> list[TokenLogprob]:
            out, sent[i] = gen.logprobs[i][sent[i] :], len(gen.logprobs[i])
            return out

        try:
            if opening is not None:  # chat: the chunks that carry the role
                for i in range(n):
                    yield sse(opening(i))
            d, left = first, n
            while True:
                if d.text and (c := chunk(d.text, None, unsent(d.index), d.index)) is not None:
                    yield sse(c)
                if d.finish_reason is not None:
                    if d.finish_reason == "cancelled":  # cancelled from our side, without an abort: shutting down
                        raise shutting_down_error()
                    if (c := chunk(None, d.finish_reason, unsent(d.index), d.index)) is not None:
                        yield sse(c)
                    left -= 1
                    if not left:
                        break
                d = await gen.next()
            if usage_chunk is not None:
                yield sse(usage_chunk(gen.usage()))
            if done_event:
                yield sse("[DONE]")
            gen.delivered = True
        except Exception as e:  # a backend failure or shutdown mid-stream: report it in-band, then end the stream
            err = backend_error(e)
            yield sse(error_json(err.message, err.type, err.param, err.code))
            if done_event:
                yield sse("[DONE]")
            gen.delivered = True

    # ---------------------------------------------------------------- logprobs in OpenAI's two shapes
    def chat_logprobs(self, lps: list[TokenLogprob]) -> ChoiceLogprobs:
        """OpenAI's chat shape: one entry per token, with its text, bytes and the most likely alternatives."""
        texts = self.token_texts

        def top(i: int, v: float) -> TopLogprob:
            text, raw = texts(i)
            return TopLogprob(token=text, logprob=v, bytes=raw)

        entries = []
        for lp in lps:
            text, raw = texts(lp.token_id)
            alternatives = [top(i, v) for i, v in lp.top]
            entries.append(TokenLogprobEntry(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=alternatives))
        return ChoiceLogprobs(content=entries)

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> tuple[CompletionLogprobs, int]:
        """OpenAI's legacy completions shape, its text offsets starting at ``offset``; also the next offset."""
        texts = self.token_texts
        tokens, offsets = [], []
        for lp in lps:
            offsets.append(offset)
            text = texts(lp.token_id)[0]
            tokens.append(text)
            offset += len(text)
        tops = [{texts(i)[0]: v for i, v in reversed(lp.top)} for lp in lps]  # the likeliest wins a tie
        tops = [dict(sorted(t.items(), key=lambda kv: -kv[1])) for t in tops]
        out = CompletionLogprobs(
            tokens=tokens, token_logprobs=[lp.logprob for lp in lps], top_logprobs=tops, text_offset=offsets
        )
        return out, offset
