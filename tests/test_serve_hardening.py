"""The server under hostile load (issue 12): each test sends what a hostile or careless client sent and checks the
server's answer.

- sampling is numerically safe for every accepted value (tiny temperature = greedy, tiny top_p = the top token),
  against a plain float64 reference of the distribution; a sequence that cannot be sampled fails alone in a batch;
  poisoned requests in a batch of good streams leave every stream complete;
- 4xx (never 500) for an empty token prompt, lone surrogates, out-of-range seeds; a schemathesis run over
  ``/openapi.json`` (when schemathesis is installed) finds no server error and nothing undocumented;
- tokenization off the event loop (``/health`` answers while a prompt is being tokenized) and prompts that cannot
  fit refused before tokenizing;
- a bounded queue: 503 with ``Retry-After`` and OpenAI's error shape, counted in /metrics;
- slow clients (idle, slow headers, slow body, slow headers on a kept-alive connection) are cut off, on raw sockets
  against a real server on 127.0.0.1;
- shutdown: queued and new requests get a 503, running streams an error event and ``[DONE]``, before the process
  exits on SIGTERM;
- the OpenAPI spec documents 400 (not 422) and 404 ``model_not_found``; /docs is off by default and behind the key;
  several Authorization headers are a 400; a non-ASCII key is refused at start; the chat page's CSP has no
  'unsafe-inline';
- logprobs (chat ``logprobs``/``top_logprobs``, completions ``logprobs: N``) against the KV-cache-free reference
  loop, token bytes against the text they spell, streamed chunks against the whole answer.

Every loop is bounded in count and time; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from serve_fakes import (
    FakeBackend,
    FakeTokenizer,
    ReferenceBackend,
    ServerThread,
    build_tiny_model,
    free_port,
    gp,
    iter_sse,
    parse_metrics,
)

from nanochat.engine.sampling import MIN_TEMPERATURE, filter_logits, make_generator, sample
from nanochat.serve import EngineBackend, Settings, create_app
from nanochat.serve.backend import TokenTexts

CTX = 256
LONG_CTX = 8192
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG: list[dict[str, Any]] = [{"role": "user", "content": "write a function that adds two numbers"}]
ERROR_KEYS = {"message", "type", "param", "code"}


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds passed (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics", timeout=10).text)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_payloads(r: httpx.Response) -> list[str]:
    return list(iter_sse(r.iter_lines()))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("hard") / "tiny.gguf", seq_len=CTX)


@pytest.fixture(scope="module")
def tiny_backend(tiny_model: Path) -> EngineBackend:
    return EngineBackend.from_path(tiny_model, threads=1)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8192 tokens of context: a long generation outlasts everything a test does meanwhile."""
    return build_tiny_model(tmp_path_factory.mktemp("hard-long") / "long.gguf", seq_len=LONG_CTX)


# ============================================================================ 1. sampling and isolation


def reference_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The sampling distribution in plain float64 Python: softmax(l / T) over the top-k logits (ties at the k-th
    kept), then the smallest prefix of that sorted distribution reaching top_p (the first token always), renormalised."""
    n = len(logits)
    m = max(logits)
    w = [math.exp((x - m) / temperature) for x in logits]
    keep = set(range(n))
    if 0 < top_k < n:
        kth = sorted(logits, reverse=True)[top_k - 1]
        keep = {i for i in range(n) if logits[i] >= kth}
    total = sum(w[i] for i in keep)
    cum, nucleus = 0.0, set()
    for i in sorted(keep, key=lambda i: -w[i]):
        if nucleus and cum >= top_p:
            break
        nucleus.add(i)
        cum += w[i] / total
    z = sum(w[i] for i in nucleus)
    return [w[i] / z if i in nucleus else 0.0 for i in range(n)]


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(
    # hundredths: no two tokens tie, so the order of the sorted distribution is defined
    logits=st.lists(st.integers(-800, 800), min_size=2, max_size=12, unique=True).map(lambda xs: [x / 100 for x in xs]),
    temperature=st.floats(0.25, 2.0),
    top_k=st.integers(0, 14),
    top_p=st.floats(0.05, 1.0),
)
def test_filtered_distribution_matches_a_float64_reference(
    logits: list[float], temperature: float, top_k: int, top_p: float
) -> None:
    scaled = filter_logits(np.array(logits, dtype=np.float32), temperature, top_k, top_p)
    got = (np.exp(scaled) / np.exp(scaled).sum()).tolist()
    want = reference_distribution(logits, temperature, top_k, top_p)
    # a token at the nucleus boundary (cumulative mass within rounding of top_p) may go either way in float32
    support_got = {i for i, p in enumerate(got) if p > 0}
    support_want = {i for i, p in enumerate(want) if p > 0}
    if support_got != support_want:
        assert len(support_got ^ support_want) == 1
        return
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5


@pytest.mark.parametrize("temperature", [1e-40, 1e-46, 5e-324, MIN_TEMPERATURE / 2, MIN_TEMPERATURE, 1e-30, 1e-6])
def test_a_tiny_temperature_is_greedy(temperature: float) -> None:
    g = make_generator(0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        logits = rng.standard_normal(500).astype(np.float32) * 3
        assert sample(logits, temperature, None, None, g) == int(np.argmax(logits))
        assert sample(logits, temperature, 40, 0.5, g) == int(np.argmax(logits))


@pytest.mark.parametrize("top_p", [1e-46, 5e-324, 1e-300, 1e-9])
def test_a_tiny_top_p_keeps_the_top_token(top_p: float) -> None:
    g = make_generator(1)
    rng = np.random.default_rng(1)
    for temperature in (0.3, 1.0, 2.0):
        logits = rng.standard_normal(500).astype(np.float32)
        assert sample(logits, temperature, None, top_p, g) == int(np.argmax(logits))


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(
    logits=st.lists(st.floats(width=32), min_size=1, max_size=16).filter(lambda xs: any(math.isfinite(x) for x in xs)),
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.floats(0.0, 1e-30), st.just(math.inf)),
    top_k=st.integers(0, 20),
    top_p=st.one_of(st.floats(5e-324, 1.0), st.just(1e-46)),
    seed=st.integers(0, 2**32),
)
def test_sampling_never_raises_and_never_picks_nan_or_minus_inf(
    logits: list[float], temperature: float, top_k: int, top_p: float, seed: int
) -> None:
    t = np.array(logits, dtype=np.float32)
    tok = sample(t, temperature, top_k, top_p, make_generator(seed))
    assert 0 <= tok < len(logits)
    chosen = logits[tok]
    assert not math.isnan(chosen) and chosen != -math.inf
    if math.inf in logits:
        assert chosen == math.inf  # +inf logits take all the probability


def test_a_row_with_nothing_finite_is_a_clear_error() -> None:
    for row in ([math.nan] * 4, [-math.inf] * 4, [math.nan, -math.inf]):
        for temperature in (0.0, 1.0):
            with pytest.raises(ValueError, match="no finite value"):
                sample(np.array(row, dtype=np.float32), temperature)


def test_a_sequence_that_cannot_be_sampled_fails_alone_in_its_batch(
    long_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model returns NaN logits for one prompt (a test double around the real engine's prefill): that request
    fails, and the good ones batched with it generate exactly what they generate alone."""
    backend = EngineBackend.from_path(long_model, threads=1)
    assert backend.batcher is not None
    engine = backend.batcher.engine
    poison = [backend.tokenizer.bos_id, 60, 61, 62, 63]
    real_prefill = engine.backend.prefill_batch

    def prefill(sessions: Any, prompts: Any) -> np.ndarray:
        out = real_prefill(sessions, prompts)
        for i, p in enumerate(prompts):
            if list(p) == poison:
                out[i] = float("nan")
        return out

    monkeypatch.setattr(engine.backend, "prefill_batch", prefill)
    prompts = [backend.tokenizer.render_chat([{"role": "user", "content": f"task {i}"}]) for i in range(3)]
    params = [gp(max_tokens=600, temperature=0.8, seed=i) for i in range(3)]
    streams = [backend.stream(p, q, threading.Event()) for p, q in zip(prompts, params, strict=True)]
    firsts = [next(s) for s in streams]  # all three are live in the batch now, 600 tokens to go
    with pytest.raises(RuntimeError, match="no finite logit"):
        list(backend.stream(poison, gp(max_tokens=50, temperature=0.8, seed=9), threading.Event()))
    together = ["".join(d.text for d in [first, *s]) for first, s in zip(firsts, streams, strict=True)]
    assert backend.batcher.max_batch >= 3
    alone = ["".join(d.text for d in backend.stream(p, q, threading.Event())) for p, q in zip(prompts, params)]
    assert together == alone and all(together)


def test_poisoned_requests_leave_a_batch_of_good_streams_complete(long_model: Path) -> None:
    """`top_p: 1e-46` and `temperature: 1e-40` join a batch of running streams: every stream completes, and the
    poisoned requests answer what greedy decoding answers (their exact meaning)."""
    backend = EngineBackend.from_path(long_model, threads=1)
    good = {"messages": MSG, "max_tokens": 800, "temperature": 0.9, "ignore_eos": True, "stream": True}
    poisoned = [
        (CHAT, {"messages": MSG, "top_p": 1e-46, "max_tokens": 24, "ignore_eos": True}),
        (COMP, {"prompt": "def add(a, b):", "temperature": 1e-40, "max_tokens": 24, "ignore_eos": True}),
        (CHAT, {"messages": MSG, "top_p": 1e-46, "temperature": 1e-40, "max_tokens": 24, "ignore_eos": True}),
    ]
    with ServerThread(create_app(backend, Settings(max_concurrent=8))) as srv, httpx.Client(timeout=120) as c:
        cms = [c.stream("POST", srv.url + CHAT, json={**good, "seed": i}) for i in range(3)]
        responses = [cm.__enter__() for cm in cms]
        try:
            events = [iter_sse(r.iter_lines()) for r in responses]
            for r, ev in zip(responses, events, strict=True):
                assert r.status_code == 200
                next(ev), next(ev)  # the role chunk and a first token: the three are generating
            with ThreadPoolExecutor(len(poisoned)) as pool:
                futures = [
                    pool.submit(c.post, srv.url + path, json={**body, "stream": True}) for path, body in poisoned
                ]
                bad = [f.result(timeout=120) for f in futures]
            rest = [list(ev) for ev in events]
        finally:
            for cm in cms:
                cm.__exit__(None, None, None)
        assert backend.batcher is not None and backend.batcher.max_batch >= 4  # the poison shared a step
        for payloads in rest:
            assert payloads[-1] == "[DONE]"
            chunks = [json.loads(p) for p in payloads[:-1]]
            assert not any("error" in ch for ch in chunks), chunks[-1]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        for (path, body), r in zip(poisoned, bad, strict=True):
            assert r.status_code == 200, r.text
            payloads = list(iter_sse(iter(r.text.splitlines())))
            assert payloads[-1] == "[DONE]"
            chunks = [json.loads(p) for p in payloads[:-1]]
            assert not any("error" in ch for ch in chunks)
            key = "text" if path == COMP else "content"
            streamed = "".join(
                (ch["choices"][0].get("text") or "")
                if key == "text"
                else (ch["choices"][0]["delta"].get("content") or "")
                for ch in chunks
                if ch["choices"]
            )
            greedy = c.post(srv.url + path, json={**body, "temperature": 0, "top_p": 1.0}).json()
            want = greedy["choices"][0]["text"] if key == "text" else greedy["choices"][0]["message"]["content"]
            assert streamed == want and streamed


# ============================================================================ 2. 4xx, never 500


BAD_BODIES: list[tuple[str, str, bytes, str]] = [
    # (id, path, raw JSON body, param)
    ("empty-token-prompt", COMP, b'{"prompt": []}', "prompt"),
    ("surrogate-in-content", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (
        "surrogate-in-part",
        CHAT,
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
        "messages[0].content",
    ),
    ("surrogate-in-prompt", COMP, b'{"prompt": "x\\ud800"}', "prompt"),
    ("surrogate-in-prompt-list", COMP, b'{"prompt": ["\\ud800"]}', "prompt"),
    ("surrogate-in-stop", CHAT, b'{"messages": [{"role": "user", "content": "a"}], "stop": ["\\ud800"]}', "stop"),
    ("surrogate-in-model", CHAT, b'{"model": "\\ud800", "messages": [{"role": "user", "content": "a"}]}', "model"),
    (
        "seed-beyond-int64",
        CHAT,
        b'{"messages": [{"role": "user", "content": "a"}], "seed": 36893488147419103232}',
        "seed",
    ),
]


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_are_4xx_in_openais_shape(tiny_backend: EngineBackend, case: tuple[str, str, bytes, str]) -> None:
    _, path, body, param = case
    with ServerThread(create_app(tiny_backend, Settings(log_requests=False))) as srv:
        r = httpx.post(srv.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert_error(r, 400, param=param)
        ok = httpx.post(srv.url + CHAT, json={"messages": MSG, "max_tokens": 1}, timeout=60)
        assert ok.status_code == 200


def test_a_real_surrogate_pair_is_fine(tiny_backend: EngineBackend) -> None:
    with ServerThread(create_app(tiny_backend)) as srv:
        body = b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}'
        r = httpx.post(srv.url + CHAT, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text


def test_schemathesis_finds_no_server_error_and_nothing_undocumented(tiny_backend: EngineBackend) -> None:
    """Generated requests (valid and invalid) against /openapi.json: no 500, every status and body as documented.
    Bounded: 50 examples per operation and mode, replies of at most 4 tokens."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    app = create_app(tiny_backend, Settings(max_tokens_limit=4, max_concurrent=2, log_requests=False))
    with ServerThread(app) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/models", "/v1/models/{model}", CHAT, COMP, "/health"}
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(
                    max_examples=50,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case: Any) -> None:
                    response = case.call(base_url=srv.url, timeout=60)
                    case.validate_response(response, checks=checks)

                try:
                    run()
                except Unsatisfiable:
                    assert mode == GenerationMode.NEGATIVE  # nothing to make invalid (no parameters, no body)


# ============================================================================ 3. nothing proportional to the input on the loop


class GatedTokenizer(FakeTokenizer):
    """A tokenizer that holds every ``encode`` until ``gate`` is set (a slow tokenization, without timing)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def encode(self, text: str) -> list[int]:
        self.entered.set()
        if not self.gate.wait(60):
            raise TimeoutError("test gate never opened")
        return super().encode(text)


def test_health_answers_while_a_prompt_is_being_tokenized() -> None:
    tok = GatedTokenizer()
    backend = FakeBackend(tokenizer=tok)
    with ServerThread(create_app(backend)) as srv, ThreadPoolExecutor(1) as pool:
        try:
            fut = pool.submit(httpx.post, srv.url + CHAT, json={"messages": MSG, "temperature": 0}, timeout=60)
            assert tok.entered.wait(30)
            h = httpx.get(srv.url + "/health", timeout=10)  # the loop is free while the tokenizer works
            assert h.status_code == 200 and h.json()["status"] == "ok"
        finally:
            tok.gate.set()
        r = fut.result(timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == backend.reply


def test_prompts_that_cannot_fit_are_refused_before_tokenizing(
    tiny_backend: EngineBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = tiny_backend.tokenizer
    calls: list[int] = []
    real_encode = tok.encode

    def counting(text: str, *a: Any, **kw: Any) -> list[int]:
        calls.append(len(text))
        return real_encode(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", counting)
    widest = int(max(tok.token_bytes()))  # a token is at most this many bytes, a character at least one
    with ServerThread(create_app(tiny_backend)) as srv:
        huge = "x" * (CTX * widest + 1)
        r = httpx.post(srv.url + CHAT, json={"messages": [{"role": "user", "content": huge}]}, timeout=60)
        assert_error(r, 400, param="messages", code="context_length_exceeded")
        assert "at least" in r.json()["error"]["message"]
        r = httpx.post(srv.url + COMP, json={"prompt": huge}, timeout=60)
        assert_error(r, 400, param="prompt", code="context_length_exceeded")
        assert calls == []  # refused for free
        r = httpx.post(srv.url + COMP, json={"prompt": "def f(x): return x\n" * 40}, timeout=60)  # must be tokenized
        assert_error(r, 400, param="prompt", code="context_length_exceeded")
        assert len(calls) == 1
        exact = len(tok.encode("def f(x): return x\n" * 40)) + 1
        assert f"is {exact} tokens" in r.json()["error"]["message"]  # the true count, not a bound


# ============================================================================ 4. a bounded queue


def _open_stream(client: httpx.Client, url: str) -> tuple[Any, Iterator[str]]:
    cm = client.stream("POST", url + CHAT, json={"messages": MSG, "stream": True})
    r = cm.__enter__()
    assert r.status_code == 200
    events = iter_sse(r.iter_lines())
    next(events)  # the role chunk: the generation holds its slot
    return cm, events


def test_a_full_queue_answers_503_with_retry_after() -> None:
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    with (
        ServerThread(create_app(backend, Settings(max_concurrent=1, max_queue=2))) as srv,
        httpx.Client(timeout=60) as c,
        ThreadPoolExecutor(2) as pool,
    ):
        cm, events = _open_stream(c, srv.url)
        try:
            waiting = [pool.submit(httpx.post, srv.url + CHAT, json={"messages": MSG}, timeout=60) for _ in range(2)]
            assert wait_until(lambda: metrics(srv.url)["nanochat_requests_queued"] == 2)
            r = httpx.post(srv.url + CHAT, json={"messages": MSG}, timeout=30)
            assert_error(r, 503, code="server_overloaded")
            assert int(r.headers["retry-after"]) >= 1
            r = httpx.post(srv.url + COMP, json={"prompt": "x"}, timeout=30)
            assert_error(r, 503, code="server_overloaded")
            m = metrics(srv.url)
            assert m['nanochat_requests_rejected_total{reason="queue_full"}'] == 2
            assert m["nanochat_queue_capacity"] == 2 and m["nanochat_slots"] == 1
            h = httpx.get(srv.url + "/health", timeout=10).json()
            assert h["queued"] == 2 and h["max_queue"] == 2 and h["in_flight"] == 1
            gate.set()
            assert list(events)[-1] == "[DONE]"
            assert all(f.result(timeout=60).status_code == 200 for f in waiting)  # the queued ones were served
        finally:
            gate.set()
            cm.__exit__(None, None, None)
        assert httpx.post(srv.url + CHAT, json={"messages": MSG}, timeout=30).status_code == 200


def test_max_queue_zero_means_no_waiting() -> None:
    gate = threading.Event()
    with (
        ServerThread(create_app(FakeBackend(gate=gate), Settings(max_concurrent=1, max_queue=0))) as srv,
        httpx.Client(timeout=60) as c,
    ):
        cm, events = _open_stream(c, srv.url)
        try:
            assert_error(httpx.post(srv.url + CHAT, json={"messages": MSG}, timeout=30), 503, code="server_overloaded")
        finally:
            gate.set()
            cm.__exit__(None, None, None)


# ============================================================================ 5. slow clients (raw sockets)

TIMEOUT_S = 0.5  # the server's header/body/keep-alive timeouts in these tests
BOUND_S = 15.0  # how long a test waits for the server to close, at most


def _read_until_closed(sock: socket.socket, bound: float = BOUND_S) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``bound``."""
    sock.settimeout(bound)
    data = b""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            break
        if not chunk:
            return data
        data += chunk
    pytest.fail(f"the server kept the connection open for {bound}s (got {data[:200]!r})")


def _trickle(sock: socket.socket, payload: bytes, interval: float = 0.05) -> bytes:
    """Send ``payload`` a byte at a time until the server closes (returns what it said); bounded by BOUND_S."""
    deadline = time.monotonic() + BOUND_S
    for i in range(len(payload)):
        if time.monotonic() > deadline:
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            return _read_until_closed(sock)
        try:
            sock.sendall(payload[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return _read_until_closed(sock)
    pytest.fail("the server never cut off a client trickling its request")


@pytest.fixture(scope="module")
def strict_server() -> Iterator[ServerThread]:
    timeouts = Settings(header_timeout=TIMEOUT_S, body_timeout=TIMEOUT_S, keep_alive_timeout=TIMEOUT_S)
    with ServerThread(create_app(FakeBackend(), timeouts)) as srv:
        yield srv


def test_an_idle_connection_is_closed(strict_server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=BOUND_S) as sock:
        assert _read_until_closed(sock) == b""  # nothing sent, nothing to answer: just closed


def test_slow_headers_are_cut_off_with_a_408(strict_server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=BOUND_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        said = _trickle(sock, b"X-Slow: " + b"a" * 2000 + b"\r\n\r\n")
        assert said.startswith(b"HTTP/1.1 408"), said[:200]
        assert json.loads(said.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_a_slow_body_is_cut_off_with_a_408(strict_server: ServerThread) -> None:
    body = json.dumps({"messages": MSG}).encode() + b" " * 3000
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=BOUND_S) as sock:
        sock.sendall(head.encode())
        said = _trickle(sock, body)
        assert said.startswith(b"HTTP/1.1 408"), said[:200]
        err = json.loads(said.split(b"\r\n\r\n", 1)[1])["error"]
        assert set(err) == ERROR_KEYS and err["code"] == "request_timeout"


def test_slow_headers_on_a_kept_alive_connection_are_cut_off(strict_server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=BOUND_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"status"' not in first:
            chunk = sock.recv(65536)
            assert chunk, "closed before answering"
            first += chunk
        assert first.startswith(b"HTTP/1.1 200")
        # any byte resets uvicorn's keep-alive timer; the header deadline does not move
        said = _trickle(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 2000 + b"\r\n\r\n")
        assert said == b"" or said.startswith(b"HTTP/1.1 408"), said[:200]


def test_a_normal_client_is_not_affected(strict_server: ServerThread) -> None:
    with httpx.Client(base_url=strict_server.url, timeout=30) as c:
        for _ in range(3):  # one kept-alive connection
            assert c.get("/health").status_code == 200
            assert c.post(CHAT, json={"messages": MSG, "temperature": 0}).status_code == 200


# ============================================================================ 6. shutdown


def test_new_requests_during_shutdown_get_an_openai_shaped_503() -> None:
    async def run() -> None:
        app = create_app(FakeBackend(), Settings(shutdown_grace=0.1))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.post(CHAT, json={"messages": MSG})).status_code == 200
            app.state.begin_shutdown()
            r = await c.post(CHAT, json={"messages": MSG})
            assert_error(r, 503, code="server_shutting_down")
            assert r.headers["connection"] == "close"
            assert_error(await c.post(COMP, json={"prompt": "x"}), 503, code="server_shutting_down")
            h = await c.get("/health")
            assert h.status_code == 503 and h.json()["status"] == "shutting_down"

    asyncio.run(run())


SERVER_SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})  # the test doubles live in tests/
from serve_fakes import FakeBackend
from nanochat.serve import Settings, create_app
from nanochat.serve.server import make_server
settings = Settings(port=int(sys.argv[1]), max_concurrent=1, shutdown_grace=float(sys.argv[2]), log_requests=False)
backend = FakeBackend(reply="word " * 4000, token_delay=0.01)  # 20000 tokens: ~200 s, far beyond the test
make_server(create_app(backend, settings), settings, log_level="warning").run()
"""


def test_sigterm_answers_queued_requests_and_ends_running_streams_before_exiting(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(port), "1.0"], stdout=log, stderr=subprocess.STDOUT
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, timeout=60), (tmp_path / "server.log").read_text()
        with httpx.Client(timeout=60) as c, ThreadPoolExecutor(1) as pool:
            with c.stream("POST", url + CHAT, json={"messages": MSG, "stream": True, "temperature": 0}) as r:
                assert r.status_code == 200
                events = iter_sse(r.iter_lines())
                next(events), next(events)  # the role and a first token: running, holding the only slot
                queued = pool.submit(httpx.post, url + CHAT, json={"messages": MSG}, timeout=60)
                assert wait_until(lambda: httpx.get(url + "/health", timeout=5).json()["queued"] == 1)
                proc.send_signal(signal.SIGTERM)
                r_queued = queued.result(timeout=60)
                assert_error(r_queued, 503, code="server_shutting_down")
                rest = list(events)  # the stream goes on through the grace, then ends properly
            assert rest[-1] == "[DONE]"
            last = json.loads(rest[-2])
            assert set(last) == {"error"} and last["error"]["code"] == "server_shutting_down"
            assert all("choices" in json.loads(p) for p in rest[:-2])  # tokens until the grace ran out
        proc.wait(timeout=60)
        assert b"Traceback" not in (tmp_path / "server.log").read_bytes()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# ============================================================================ 7, 8. the spec, docs and keys


def test_the_spec_documents_400_and_model_not_found_not_422() -> None:
    with ServerThread(create_app(FakeBackend())) as srv:
        spec = httpx.get(srv.url + "/openapi.json", timeout=10).json()
    assert '"422"' not in json.dumps(spec) and "HTTPValidationError" not in json.dumps(spec)
    error_ref = "#/components/schemas/ErrorResponse"
    for path in (CHAT, COMP):
        responses = spec["paths"][path]["post"]["responses"]
        for code in ("400", "404", "413", "500", "503"):
            assert responses[code]["content"]["application/json"]["schema"]["$ref"] == error_ref
        assert "text/event-stream" in responses["200"]["content"]
    assert "404" in spec["paths"]["/v1/models/{model}"]["get"]["responses"]
    assert "model_not_found" in json.dumps(spec["paths"]["/v1/models/{model}"]["get"]["responses"]["404"])
    assert "401" not in spec["paths"][CHAT]["post"]["responses"]  # no key, no 401


def test_docs_are_off_by_default_and_everything_but_the_open_paths_is_behind_the_key() -> None:
    with ServerThread(create_app(FakeBackend())) as srv:
        assert httpx.get(srv.url + "/docs", timeout=10).status_code == 404
    with ServerThread(create_app(FakeBackend(), Settings(api_key="k3y", docs=True))) as srv:
        key = {"Authorization": "Bearer k3y"}
        for path in ("/docs", "/openapi.json", "/v1/models", "/no/such/path"):
            assert_error(httpx.get(srv.url + path, timeout=10), 401, code="invalid_api_key")
        assert httpx.get(srv.url + "/docs", headers=key, timeout=10).status_code == 200
        spec = httpx.get(srv.url + "/openapi.json", headers=key, timeout=10).json()
        assert "401" in spec["paths"][CHAT]["post"]["responses"]
        assert spec["paths"][CHAT]["post"]["security"] == [{"bearer": []}]
        for path in ("/", "/health", "/metrics"):  # what the README says stays open
            assert httpx.get(srv.url + path, timeout=10).status_code == 200


def test_several_authorization_headers_are_a_400() -> None:
    with ServerThread(create_app(FakeBackend(), Settings(api_key="k3y"))) as srv:
        two = [("Authorization", "Bearer k3y"), ("Authorization", "Bearer nope")]
        for headers in (two, list(reversed(two)), [two[0], two[0]]):
            r = httpx.post(srv.url + CHAT, json={"messages": MSG}, headers=headers, timeout=10)
            assert_error(r, 400, code="invalid_request")
        ok = httpx.post(srv.url + CHAT, json={"messages": MSG}, headers=[two[0]], timeout=30)
        assert ok.status_code == 200


def test_a_non_ascii_api_key_is_refused_at_start(tmp_path: Path) -> None:
    for bad in ("clé", "two words", "tab\tkey", "\u200bzero-width"):
        with pytest.raises(ValueError, match="printable ASCII"):
            Settings(api_key=bad)
    env = {**os.environ, "NANOCHAT_API_KEY": ""}
    missing = str(tmp_path / "m.gguf")  # refused before the model is even looked at
    r = subprocess.run([sys.executable, "-m", "nanochat.serve", "--model", missing, "--api-key", "clé"],
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert r.returncode == 2 and "printable ASCII" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "nanochat.serve", "--model", missing], capture_output=True, text=True,
                       timeout=120, env={**env, "NANOCHAT_API_KEY": "pässword"})  # fmt: skip
    assert r.returncode == 2 and "printable ASCII" in r.stderr, r.stderr


def test_the_chat_page_csp_allows_only_its_own_nonced_script_and_style() -> None:
    with ServerThread(create_app(FakeBackend())) as srv:
        pages = [httpx.get(srv.url + "/", timeout=10) for _ in range(2)]
    nonces = []
    for page in pages:
        csp = page.headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        nonce = directives["script-src"].removeprefix("'nonce-").removesuffix("'")
        assert directives["style-src"] == directives["script-src"] and len(nonce) >= 16
        assert page.text.count("<script") == 1 and f'<script nonce="{nonce}">' in page.text
        assert page.text.count("<style") == 1 and f'<style nonce="{nonce}">' in page.text
        assert " style=" not in page.text and "onclick" not in page.text  # nothing inline the CSP would block
        assert page.headers["cache-control"] == "no-store"
        nonces.append(nonce)
    assert nonces[0] != nonces[1]  # a fresh nonce per response


# ============================================================================ logprobs (issue 12, "must be built")


def test_token_texts_and_bytes_spell_the_text(tiny_backend: EngineBackend) -> None:
    tok = tiny_backend.tokenizer
    texts = TokenTexts(tok)
    for i in range(tok.vocab_size):
        text, raw = texts(i)
        if i in tok.special_ids.values():
            assert (text, raw) == ("", [])
        else:
            assert bytes(raw).decode("utf-8", errors="replace") == text == tok.decode([i])
    s = "héllo wörld ✓ def f(x):\n    return x  # 🙂"
    assert b"".join(bytes(texts(i)[1]) for i in tok.encode(s)) == s.encode()  # characters split across tokens too
    fake = TokenTexts(FakeTokenizer())
    assert b"".join(bytes(fake(i)[1]) for i in FakeTokenizer().encode(s)) == s.encode()


def _reference_logprobs(backend: EngineBackend, messages: Any, n: int, k: int) -> list[Any]:
    """Token logprobs of a greedy reply from the KV-cache-free reference loop (a full torch forward per token)."""
    reference = ReferenceBackend(backend.loaded)
    prompt = backend.tokenizer.render_chat(messages)
    params = gp(max_tokens=n, temperature=0.0, logprobs=k)
    return [d.logprob for d in reference.stream(prompt, params, threading.Event()) if d.logprob is not None]


def test_chat_logprobs_match_the_reference_model(tiny_backend: EngineBackend) -> None:
    body = {"messages": MSG, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3,
            "ignore_eos": True}  # fmt: skip
    texts = TokenTexts(tiny_backend.tokenizer)
    want = _reference_logprobs(tiny_backend, MSG, 12, 3)
    assert len(want) == 12
    with ServerThread(create_app(tiny_backend)) as srv, httpx.Client(timeout=60) as c:
        r = c.post(srv.url + CHAT, json=body).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert r["choices"][0]["logprobs"]["refusal"] is None
        assert "".join(e["token"] for e in content) == r["choices"][0]["message"]["content"]
        assert len(content) == r["usage"]["completion_tokens"] == 12
        for e, w in zip(content, want, strict=True):
            assert (e["token"], e["bytes"]) == (texts(w.token_id)[0], texts(w.token_id)[1])
            assert abs(e["logprob"] - w.logprob) < 1e-3
            assert [t["token"] for t in e["top_logprobs"]] == [texts(i)[0] for i, _ in w.top]
            assert all(abs(t["logprob"] - v) < 1e-3 for t, (_, v) in zip(e["top_logprobs"], w.top, strict=True))
            assert e["top_logprobs"][0]["logprob"] == e["logprob"]  # greedy: the chosen token is the likeliest
            values = [t["logprob"] for t in e["top_logprobs"]]
            assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-6
        with c.stream("POST", srv.url + CHAT, json={**body, "stream": True}) as s:
            chunks = [json.loads(p) for p in sse_payloads(s)[:-1]]
        streamed = [e for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                    for e in ch["choices"][0]["logprobs"]["content"]]  # fmt: skip
        assert streamed == content
        assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk
        plain = c.post(srv.url + CHAT, json={"messages": MSG, "max_tokens": 5}).json()
        assert plain["choices"][0]["logprobs"] is None  # not asked, not sent


def test_logprobs_do_not_change_what_is_sampled(tiny_backend: EngineBackend) -> None:
    body = {"messages": MSG, "max_tokens": 16, "temperature": 0.9, "seed": 5, "ignore_eos": True}
    with ServerThread(create_app(tiny_backend)) as srv, httpx.Client(timeout=60) as c:
        plain = c.post(srv.url + CHAT, json=body).json()["choices"][0]
        with_lp = c.post(srv.url + CHAT, json={**body, "logprobs": True, "top_logprobs": 1}).json()["choices"][0]
    assert with_lp["message"]["content"] == plain["message"]["content"]
    assert len(with_lp["logprobs"]["content"]) == 16
    for e in with_lp["logprobs"]["content"]:  # sampled, not always the likeliest, never likelier than it
        assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-6 and len(e["top_logprobs"]) == 1


def test_completion_logprobs_in_the_legacy_shape(tiny_backend: EngineBackend) -> None:
    body = {"prompt": "def add(a, b):", "max_tokens": 10, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    with ServerThread(create_app(tiny_backend)) as srv, httpx.Client(timeout=60) as c:
        choice = c.post(srv.url + COMP, json=body).json()["choices"][0]
        with c.stream("POST", srv.url + COMP, json={**body, "stream": True}) as s:
            chunks = [json.loads(p)["choices"][0] for p in sse_payloads(s)[:-1]]
        zero = c.post(srv.url + COMP, json={**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 10
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(10)]
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert 1 <= len(top) <= 2 and value == max(top.values())  # greedy
    merged: dict[str, list[Any]] = {k: [] for k in lp}
    for ch in chunks:
        if ch["logprobs"]:
            for k in merged:
                merged[k] += ch["logprobs"][k]
    assert merged == lp  # the stream's chunks add up to the whole, offsets included
    assert zero["token_logprobs"] == lp["token_logprobs"] and all(t == {} for t in zero["top_logprobs"])


BAD_LOGPROBS: list[tuple[str, str, dict[str, Any], str]] = [
    ("top-without-logprobs", CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ("top-too-many", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat-logprobs-number", CHAT, {"messages": MSG, "logprobs": 3}, "logprobs"),
    ("completion-too-many", COMP, {"prompt": "x", "logprobs": 6}, "logprobs"),
    ("completion-logprobs-bool", COMP, {"prompt": "x", "logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize("case", BAD_LOGPROBS, ids=[c[0] for c in BAD_LOGPROBS])
def test_bad_logprobs_values_are_400(case: tuple[str, str, dict[str, Any], str]) -> None:
    _, path, body, param = case
    with ServerThread(create_app(FakeBackend(), Settings(log_requests=False))) as srv:
        assert_error(httpx.post(srv.url + path, json=body, timeout=30), 400, param=param)


# ============================================================================ penalties, logit bias, refusals


def _greedy_with_penalties(
    backend: EngineBackend, prompt: list[int], n: int, presence: float, frequency: float
) -> tuple[list[int], list[float]]:
    """Greedy decoding with OpenAI's penalty formula, written out on the torch model's full forward; also each
    step's gap between the best and second-best adjusted logit (a near-tie may flip between engines)."""
    model = backend.loaded.torch_model()
    ids, out, gaps = list(prompt), [], []
    counts: dict[int, int] = {}
    for _ in range(n):
        with torch.inference_mode():
            logits = model(torch.tensor([ids]))[0, -1].float().tolist()
        adjusted = [x - frequency * counts.get(j, 0) - presence * (counts.get(j, 0) > 0) for j, x in enumerate(logits)]
        best = max(range(len(adjusted)), key=lambda j: adjusted[j])
        gaps.append(adjusted[best] - sorted(adjusted)[-2])
        out.append(best)
        ids.append(best)
        counts[best] = counts.get(best, 0) + 1
    return out, gaps


def test_penalties_follow_openais_formula(tiny_backend: EngineBackend) -> None:
    prompt = tiny_backend.tokenizer.render_chat(MSG)
    for presence, frequency in ((1.5, 0.0), (0.0, 0.8), (0.7, 1.2), (-1.0, 0.0)):
        params = gp(max_tokens=30, temperature=0.0, presence_penalty=presence, frequency_penalty=frequency)
        got = [d.token_id for d in tiny_backend.stream(prompt, params, threading.Event()) if d.token_id is not None]
        want, gaps = _greedy_with_penalties(tiny_backend, prompt, 30, presence, frequency)
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if first_diff is not None:  # only a near-tie may differ (engine and torch round differently)
            assert gaps[first_diff] < 1e-2, (presence, frequency, first_diff, gaps[first_diff])
        reference = ReferenceBackend(tiny_backend.loaded)
        slow = [d.token_id for d in reference.stream(prompt, params, threading.Event()) if d.token_id is not None]
        assert got == slow  # the batched engine and the reference loop apply them alike
    plain = gp(max_tokens=30, temperature=0.0)
    unpenalized = [d.token_id for d in tiny_backend.stream(prompt, plain, threading.Event()) if d.token_id]
    penalized = gp(max_tokens=30, temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    distinct = {d.token_id for d in tiny_backend.stream(prompt, penalized, threading.Event()) if d.token_id}
    assert len(distinct) > len(set(unpenalized))  # the point of penalties: less repetition


def test_logit_bias_over_http(tiny_backend: EngineBackend) -> None:
    tok = tiny_backend.tokenizer
    forced = tok.encode("x")[0]
    body = {"messages": MSG, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with ServerThread(create_app(tiny_backend)) as srv, httpx.Client(timeout=60) as c:
        r = c.post(srv.url + CHAT, json={**body, "logit_bias": {str(forced): 100}}).json()
        assert r["choices"][0]["message"]["content"] == "x" * 8
        greedy = c.post(srv.url + CHAT, json={**body, "logprobs": True}).json()["choices"][0]
        first = greedy["logprobs"]["content"][0]["token"]
        banned = [i for i in range(tok.vocab_size) if tok.decode([i]) == first]
        r = c.post(srv.url + CHAT, json={**body, "logit_bias": {str(i): -100 for i in banned}, "logprobs": True}).json()
        assert r["choices"][0]["logprobs"]["content"][0]["token"] != first
        # logprobs stay those of the model, not of the biased distribution
        assert abs(r["choices"][0]["logprobs"]["content"][0]["logprob"]) > 1
        r = c.post(srv.url + COMP, json={"prompt": "def", "max_tokens": 4, "temperature": 0,
                                          "logit_bias": {str(forced): 100}}).json()  # fmt: skip
        assert r["choices"][0]["text"] == "xxxx"


REFUSED: list[tuple[str, str, dict[str, Any], str]] = [
    ("tools", CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("tool-choice", CHAT, {"tool_choice": "auto"}, "tool_choice"),
    ("functions", CHAT, {"functions": [{"name": "f"}]}, "functions"),
    ("function-call", CHAT, {"function_call": {"name": "f"}}, "function_call"),
    ("json-object", CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    ("json-schema", CHAT, {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ("suffix", COMP, {"suffix": "return x"}, "suffix"),
    ("best-of", COMP, {"best_of": 3}, "best_of"),
    ("bias-key-not-an-id", CHAT, {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("bias-too-strong", CHAT, {"logit_bias": {"5": 101}}, "logit_bias"),
    ("bias-outside-vocab", CHAT, {"logit_bias": {"100000": 1}}, "logit_bias"),
    ("presence-too-high", CHAT, {"presence_penalty": 2.5}, "presence_penalty"),
    ("frequency-string", COMP, {"frequency_penalty": "1"}, "frequency_penalty"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_what_would_change_the_output_is_refused_not_ignored(case: tuple[str, str, dict[str, Any], str]) -> None:
    _, path, extra, param = case
    base = {"messages": MSG} if path == CHAT else {"prompt": "x"}
    with ServerThread(create_app(FakeBackend(), Settings(log_requests=False))) as srv:
        err = assert_error(httpx.post(srv.url + path, json={**base, **extra}, timeout=30), 400)
        assert err["param"] == param or err["param"].startswith(param + "."), err  # e.g. "logit_bias.5"


def test_harmless_defaults_of_refused_fields_are_fine() -> None:
    with ServerThread(create_app(FakeBackend())) as srv:
        for extra in ({"tool_choice": "none"}, {"tools": []}, {"response_format": {"type": "text"}},
                      {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}):  # fmt: skip
            assert httpx.post(srv.url + CHAT, json={"messages": MSG, **extra}, timeout=30).status_code == 200
        for extra in ({"suffix": ""}, {"best_of": 1}):
            assert httpx.post(srv.url + COMP, json={"prompt": "x", **extra}, timeout=30).status_code == 200


# ============================================================================ llama-server's /tokenize, /detokenize


def test_tokenize_and_detokenize(tiny_backend: EngineBackend) -> None:
    tok = tiny_backend.tokenizer
    text = "def f(x):\n    return 'é🙂'  # <|end|>"
    with ServerThread(create_app(tiny_backend)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        ids = c.post("/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
        assert ids == tok.encode(text)
        special = c.post("/tokenize", json={"content": text}).json()["tokens"]  # llama-server parses specials
        assert special == tok.encode(text, allow_special=True) and tok.end_id in special and tok.end_id not in ids
        assert c.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"][0] == tok.bos_id
        pieces = c.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
        assert [p["id"] for p in pieces] == special
        spelled = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
        assert spelled == text.encode()  # text pieces and byte pieces (a split character) spell the content
        assert any(isinstance(p["piece"], list) for p in pieces)  # the emoji spans tokens
        assert c.post("/detokenize", json={"tokens": special}).json()["content"] == text
        assert c.post("/detokenize", json={"tokens": []}).json()["content"] == ""
        assert_error(c.post("/detokenize", json={"tokens": [tok.vocab_size]}), 400, param="tokens")
        assert_error(c.post("/tokenize", json={"content": 5}), 400, param="content")
        lone = c.post("/tokenize", content=b'{"content": "\\ud800"}', headers={"Content-Type": "application/json"})
        assert_error(lone, 400, param="content")
    with ServerThread(create_app(tiny_backend, Settings(api_key="k3y"))) as srv:
        assert_error(httpx.post(srv.url + "/tokenize", json={"content": "x"}, timeout=30), 401)
