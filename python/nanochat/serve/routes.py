"""The endpoints: each reads its request, asks :class:`~nanochat.serve.generation.Service` (``app.state.service``)
for the shared steps, and shapes the answer.

``GET /`` (the chat page), ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (OpenAI's shapes; ``n`` choices, ``stream: true`` = server-sent events with ``index`` on
each chunk), llama-server's ``GET /props``, ``POST /infill``, ``POST /tokenize`` and ``POST /detokenize``.
"""

from __future__ import annotations

import inspect
import re
import secrets
import time
import uuid
from importlib import resources
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from nanochat import __version__
from nanochat.data.tokenizer import ChatTemplateError
from nanochat.serve.backend import TokenLogprob, chat_template_of
from nanochat.serve.errors import APIError, error_responses
from nanochat.serve.generation import Service
from nanochat.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerationDefaults,
    InfillRequest,
    InfillResponse,
    ModelCard,
    ModelList,
    Props,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
    Usage,
)

router = APIRouter()

CSP = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
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
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion (`stream: false`), or server-sent events: `data: {chunk}` lines, then "
        '`data: [DONE]`; an error after the first event is sent as `data: {"error": ...}` before `[DONE]`',
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}},
    },
    **error_responses(400, 404, 408, 413, 500, 503),
}
INFILL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The middle (`stream: false`), or server-sent events `data: {content, stop: false}` per piece "
        "and a last `data: {...}` with `stop: true` (llama-server sends no [DONE])",
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}},
    },
    **error_responses(400, 404, 408, 413, 500, 503),
}
TOKEN_RESPONSES = error_responses(400, 408, 413, 500)
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"  # what llama-server puts before each input_extra chunk without FIM_SEP


def service(request: Request) -> Service:
    svc = request.app.state.service
    assert isinstance(svc, Service)
    return svc


def chat_page() -> str:
    return resources.files("nanochat.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


def with_nonce(page: str, nonce: str) -> str:
    """The page with ``nonce`` on its (only) ``<script>`` and ``<style>`` elements, for a CSP without
    'unsafe-inline'."""
    return _OPEN_TAG.sub(lambda m: f'<{m.group(1)} nonce="{nonce}">', page)


# --------------------------------------------------------------------------- the page, probes, models


@router.get("/", include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    nonce = secrets.token_urlsafe(18)
    return HTMLResponse(
        with_nonce(request.app.state.page, nonce),
        headers={
            "Content-Security-Policy": CSP.format(nonce=nonce),
            "Cache-Control": "no-store",  # a nonce is good for one response only
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.get("/health", responses={503: {"description": "Shutting down"}})
async def health(request: Request) -> JSONResponse:
    svc = service(request)
    body: dict[str, Any] = {
        "status": "shutting_down" if svc.stopping else "ok",
        "model": svc.backend.model_id,
        "engine": str(getattr(svc.backend, "mode", type(svc.backend).__name__)),
        "in_flight": len(svc.active),
        "queued": svc.slots.waiting,
        "max_concurrent": svc.settings.max_concurrent,
        "max_queue": svc.settings.max_queue,
    }
    cache = getattr(getattr(svc.backend, "batcher", None), "cache", None)
    if cache is not None:  # prompt tokens not prefilled again thanks to the prompt cache
        body["prompt_cache"] = {"size": cache.size, "hits": cache.hits, "reused_tokens": cache.reused_tokens}
    return JSONResponse(body, status_code=503 if svc.stopping else 200)


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request) -> Response:
    body, content_type = service(request).metrics.render()
    return Response(body, media_type=content_type)


def _card(svc: Service) -> ModelCard:
    b = svc.backend
    return ModelCard(id=b.model_id, created=svc.created, context_length=b.context_length,
                     max_completion_tokens=svc.tokens_limit, kind=svc.kind)  # fmt: skip


@router.get("/props", response_model=Props)
async def props(request: Request) -> Props:
    """What is loaded, as llama-server's ``/props`` says it: the model's kind (base or chat), its chat template and
    context length, the slots; the chat page opens in completion mode for a base model."""
    svc = service(request)
    b = svc.backend
    template = chat_template_of(b.tokenizer) or ""
    fim_ids = getattr(b.tokenizer, "fim_ids", None)
    return Props(
        model=b.model_id,
        model_kind=svc.kind,
        chat_template=template,
        has_chat_template=bool(template),
        context_length=b.context_length,
        max_completion_tokens=svc.tokens_limit,
        default_generation_settings=GenerationDefaults(n_ctx=b.context_length),
        total_slots=svc.settings.max_concurrent,
        fim=fim_ids is not None and fim_ids() is not None,
        build_info=f"nanochat {__version__}",
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(service(request))])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=error_responses(404))
async def get_model(model: str, request: Request) -> ModelCard:
    svc = service(request)
    svc.check_model(model)
    return _card(svc)


# --------------------------------------------------------------------------- OpenAI's generation endpoints


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=GENERATION_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    svc = service(request)
    svc.check_model(body.model)
    svc.admit()
    tok = svc.backend.tokenizer
    messages = [{"role": m.template_role(), "content": m.text()} for m in body.messages]
    svc.check_chars(sum(len(m["content"]) for m in messages), 2 * len(messages) + 2, "messages")
    try:
        prompt_ids = list(await svc.off_loop(tok.render_chat, messages))
    except ChatTemplateError as e:  # a base model without a usable chat template: use /v1/completions
        raise APIError(400, f"{e}", param="messages", code="chat_unsupported") from None
    params = svc.generation_params(body, body.requested_max_tokens(), len(prompt_ids), svc.backend.context_length,
                                   "messages")  # fmt: skip
    rid, now, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), svc.backend.model_id
    wants_logprobs = params.logprobs is not None

    def chunk(text: str | None, finish: str | None, lps: list[TokenLogprob], index: int,
              delta: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        delta = delta if delta is not None else ({} if text is None else {"content": text})
        wanted = wants_logprobs and (text is not None or lps)  # content chunks, or leftovers
        logprobs = svc.chat_logprobs(lps).model_dump() if wanted else None
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                "system_fingerprint": None, "choices": [choice]}  # fmt: skip

    def whole(texts: list[str], finish: list[str], use: Usage, lps: list[list[TokenLogprob]]) -> dict[str, Any]:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=t),
                finish_reason=f,  # type: ignore[arg-type]
                logprobs=svc.chat_logprobs(lps[i]) if wants_logprobs else None,
            )  # fmt: skip
            for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ]
        return ChatCompletion(id=rid, created=now, model=model, choices=choices, usage=use).model_dump()

    def opening(i: int) -> dict[str, Any]:
        return chunk(None, None, [], i, {"role": "assistant", "content": ""})

    def usage_chunk(use: Usage) -> dict[str, Any]:
        return {**chunk(None, None, [], 0), "choices": [], "usage": use.model_dump()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await svc.generate(request, prompt_ids, params, body.stream, chunk, whole, opening,
                              usage_chunk if include_usage else None)  # fmt: skip


@router.post("/v1/completions", response_model=Completion, responses=GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Response:
    svc = service(request)
    svc.check_model(body.model)
    svc.admit()
    tok = svc.backend.tokenizer
    prompt = body.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        if len(prompt) >= svc.backend.context_length:  # before the scan below: its time grows with the body
            raise svc.too_long(len(prompt), "prompt")
        vocab = tok.vocab_size
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is outside the vocabulary [0, {vocab}).", param="prompt",
                           code="invalid_value")  # fmt: skip
        prompt_ids = [int(t) for t in prompt]
    else:
        text = prompt if isinstance(prompt, str) else str(prompt[0])
        svc.check_chars(len(text), 1, "prompt")
        prompt_ids = [tok.bos_id, *await svc.off_loop(tok.encode, text)]  # documents start with <|bos|>
    params = svc.generation_params(body, body.requested_max_tokens(), len(prompt_ids), 16, "prompt")
    rid, now, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), svc.backend.model_id
    offsets = [0] * params.n  # text_offset of each choice's next token, across a stream's chunks

    def comp_logprobs(lps: list[TokenLogprob], index: int) -> dict[str, Any] | None:
        if params.logprobs is None:
            return None
        out, offsets[index] = svc.completion_logprobs(lps, offsets[index])
        return out.model_dump()

    def chunk(text: str | None, finish: str | None, lps: list[TokenLogprob], index: int) -> dict[str, Any]:
        choice = {"index": index, "text": text or "", "logprobs": comp_logprobs(lps, index), "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": now, "model": model,
                "system_fingerprint": None, "choices": [choice]}  # fmt: skip

    def whole(texts: list[str], finish: list[str], use: Usage, lps: list[list[TokenLogprob]]) -> dict[str, Any]:
        choices = [
            CompletionChoice(
                index=i,
                text=t,
                finish_reason=f,  # type: ignore[arg-type]
                logprobs=cast(Any, comp_logprobs(lps[i], i)),  # a dict pydantic validates into CompletionLogprobs
            )
            for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ]
        return Completion(id=rid, created=now, model=model, choices=choices, usage=use).model_dump()

    def usage_chunk(use: Usage) -> dict[str, Any]:
        return {**chunk(None, None, [], 0), "choices": [], "usage": use.model_dump()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await svc.generate(request, prompt_ids, params, body.stream, chunk, whole, None,
                              usage_chunk if include_usage else None)  # fmt: skip


# --------------------------------------------------------------------------- llama-server's endpoints


def infill_ids(
    fim: tuple[int, int, int],
    bos: int,
    prefix: list[int],
    suffix: list[int],
    extra: list[list[int]],
    prompt: list[int],
    budget: int,
) -> tuple[list[int], bool]:
    """``<|bos|> extra P prefix S suffix M prompt`` in at most ``budget`` tokens, and whether anything was cut.

    As llama-server does it: the suffix keeps its head (at most a quarter of the room), the prefix its tail (the
    rest), and the extra chunks only what is left over, the last (nearest the cursor, in llama.vim) first."""
    pre, suf, mid = fim
    room = budget - 4 - len(prompt)
    if room < 2:
        raise APIError(400, f"The prompt leaves no room for the prefix and suffix in the context ({budget} tokens).",
                       param="prompt", code="context_length_exceeded")  # fmt: skip
    n_suffix = min(len(suffix), room // 4)
    n_prefix = min(len(prefix), room - n_suffix)
    left = room - n_suffix - n_prefix
    flat = [t for chunk in extra for t in chunk]
    n_extra = min(len(flat), left)
    cut = n_suffix < len(suffix) or n_prefix < len(prefix) or n_extra < len(flat)
    ids = [bos, *flat[len(flat) - n_extra :], pre, *prefix[len(prefix) - n_prefix :], suf, *suffix[:n_suffix], mid,
           *prompt]  # fmt: skip
    return ids, cut


@router.post("/infill", response_model=InfillResponse, responses=INFILL_RESPONSES)
async def infill(body: InfillRequest, request: Request) -> Response:
    """Fill in the middle, in llama-server's schema (llama.vim and llama.vscode work unchanged)."""
    from nanochat.engine.sampling import SamplingParams
    from nanochat.serve.backend import GenerationParams

    svc = service(request)
    svc.check_model(body.model)
    tok = svc.backend.tokenizer
    fim_ids = getattr(tok, "fim_ids", None)
    fim = fim_ids() if fim_ids is not None else None
    if fim is None:
        raise APIError(400, "This model has no fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, "
                       "<|fim_middle|>): its tokenizer was trained before FIM support, so /infill cannot serve it. "
                       "Use /v1/completions with the text before the cursor.", code="fim_unsupported")  # fmt: skip
    svc.admit()
    ctx = svc.backend.context_length
    if body.n_predict > svc.tokens_limit:
        raise APIError(400, f"n_predict is too large: {body.n_predict}. This server allows at most "
                       f"{svc.tokens_limit} completion tokens.", param="n_predict", code="invalid_value")  # fmt: skip
    reserve = body.n_predict if body.n_predict >= 0 else min(svc.tokens_limit, ctx // 4)
    budget = ctx - max(1, reserve)
    # cut the texts before tokenizing: a token holds at most max_token_bytes characters, so this many characters
    # always make more tokens than fit (what is cut here would be cut after tokenizing anyway)
    chars = (budget + 1) * (svc.max_token_bytes or 1 << 30)
    prefix, suffix = body.input_prefix[-chars:], body.input_suffix[:chars]
    extra = [SNIPPET_SEPARATOR + c.text for c in body.input_extra]

    def encode_all() -> tuple[list[int], list[int], list[list[int]], list[int]]:
        return tok.encode(prefix), tok.encode(suffix), [tok.encode(t[-chars:]) for t in extra], tok.encode(body.prompt)

    p_ids, s_ids, e_ids, m_ids = await svc.off_loop(encode_all)
    prompt_ids, truncated = infill_ids(fim, tok.bos_id, p_ids, s_ids, e_ids, m_ids, budget)
    max_tokens = min(svc.tokens_limit, ctx - len(prompt_ids)) if body.n_predict < 0 else body.n_predict
    seed = None if body.seed == -1 else body.seed
    params = GenerationParams(
        max_tokens=max_tokens,
        sampling=SamplingParams(body.temperature, body.top_k or None, body.top_p if body.top_p < 1.0 else None, seed),
        stop=tuple(body.stop),
        stop_token_ids=frozenset({*svc.backend.stop_token_ids, getattr(tok, "eos_id", tok.bos_id), tok.bos_id, *fim}),
    )
    model = svc.backend.model_id
    t0 = time.perf_counter()
    first_text: list[float] = []  # when the first piece of text went out
    finished: list[str] = []  # the streamed finish reason, for the last event

    def final(text: str, finish: str, use: Usage) -> dict[str, Any]:
        now = time.perf_counter()
        t1 = first_text[0] if first_text else now
        timings = {"prompt_n": len(prompt_ids), "predicted_n": use.completion_tokens, "prompt_ms": (t1 - t0) * 1e3,
                   "predicted_ms": (now - t1) * 1e3}  # fmt: skip
        return InfillResponse(content=text, model=model, tokens_predicted=use.completion_tokens,
                              tokens_evaluated=len(prompt_ids), truncated=truncated,
                              tokens_cached=use.prompt_tokens_details.cached_tokens,
                              stop_type="eos" if finish == "stop" else "limit",
                              timings=timings).model_dump()  # type: ignore[arg-type]  # fmt: skip

    def chunk(text: str | None, finish: str | None, lps: list[TokenLogprob], index: int) -> dict[str, Any] | None:
        if finish is not None:
            finished.append(finish)
            return None  # the last event (below) carries it, with the counts
        if not first_text:
            first_text.append(time.perf_counter())
        return {"content": text or "", "stop": False}

    def last_event(use: Usage) -> dict[str, Any]:
        return final("", finished[0] if finished else "stop", use)

    def whole(texts: list[str], finish: list[str], use: Usage, lps: list[list[TokenLogprob]]) -> dict[str, Any]:
        return final(texts[0], finish[0], use)

    return await svc.generate(request, prompt_ids, params, body.stream, chunk, whole, None, last_event,
                              done_event=False)  # fmt: skip


@router.post("/tokenize", response_model=TokenizeResponse, responses=TOKEN_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of ``content`` (llama-server's schema); off the event loop, like every tokenization."""
    svc = service(request)
    tok = svc.backend.tokenizer
    parses_special = "allow_special" in inspect.signature(tok.encode).parameters

    def encode() -> list[int]:
        if parses_special:
            return list(tok.encode(body.content, allow_special=body.parse_special))  # type: ignore[call-arg]
        return list(tok.encode(body.content))

    ids = await svc.off_loop(encode)
    if body.add_special:
        ids = [tok.bos_id, *ids]
    if not body.with_pieces:
        return TokenizeResponse(tokens=ids)
    special_text = {i: t for t, i in getattr(tok, "special_ids", {}).items()}

    def piece(i: int) -> str | list[int]:
        """llama-server's piece: the token's text, its bytes when they are not UTF-8 on their own."""
        if i in special_text:
            return special_text[i]
        text, raw = svc.token_texts(i)
        try:
            return text if bytes(raw).decode("utf-8") == text else raw
        except UnicodeDecodeError:
            return raw

    return TokenizeResponse(tokens=[TokenPiece(id=i, piece=piece(i)) for i in ids])


@router.post("/detokenize", response_model=DetokenizeResponse, responses=TOKEN_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    svc = service(request)
    tok = svc.backend.tokenizer
    vocab = tok.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"Token id {bad[0]} is outside the vocabulary [0, {vocab}).", param="tokens",
                       code="invalid_value")  # fmt: skip
    return DetokenizeResponse(content=await svc.off_loop(tok.decode, body.tokens))
