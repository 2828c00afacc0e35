"""Tests of ``nanochat.serve``: the OpenAI-compatible server, on loopback, with a tiny real model.

Layout:
- text helpers and sampling (stop strings across deltas, UTF-8 held back, finish reasons, seeded sampling);
- HTTP mechanics with the deterministic ``FakeBackend`` (a gate holds a generation open, so "health answers while
  generating", "a disconnect cancels and frees the slot" and "queued requests" are checked without timing);
- the real thing: ``python -m nanochat.serve`` in a subprocess serving a tiny GGUF model, driven by the official
  ``openai`` client (chat and completions, streamed and not, seeds, stop strings, concurrency, every malformed
  request), plus in-thread servers on the same model for the API key and the one-slot disconnect checks;
- the model's kind (base or chat) in /v1/models and llama-server's /props: base for the tiny GGUF and a third-party
  file without a chat template, chat for one with a template and for files that declare a chat stage;
- the CLI's no-model exit and run discovery.

Every polling loop is bounded by a deadline; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
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
import openai
import pytest
from serve_fakes import (
    FakeBackend,
    FakeTokenizer,
    ReferenceBackend,
    ServerProcess,
    ServerThread,
    build_tiny_model,
    deltas_from_tokens,
    gp,
    iter_sse,
    parse_metrics,
)
from test_gguf_thirdparty import CHATML, gpt2_like_tokenizer, make_model, write_converter_gguf

from nanochat.engine.sampling import SamplingParams, make_generator, sample
from nanochat.serve import EngineBackend, GenerationParams, Settings, create_app
from nanochat.serve.backend import CHAT_TRAINED_KEY, Delta, model_id_for
from nanochat.serve.cli import exposure_warning
from nanochat.serve.generation import SlotPool
from nanochat.serve.settings import find_latest_run, is_loopback_host

CTX = 256  # the tiny model's context
LONG_CTX = 8192  # the long-context twin's
TOKENS_LIMIT = 200  # --max-tokens-limit of the subprocess server
BODY_LIMIT = 65536  # --max-body-bytes of the subprocess server
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG: list[Any] = [{"role": "user", "content": "write a function that adds two numbers"}]
ERROR_KEYS = {"message", "type", "param", "code"}


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds passed (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def metrics(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def requests_count(m: dict[str, float], endpoint: str, status: int) -> float:
    return m.get(f'nanochat_requests_total{{endpoint="{endpoint}",status="{status}"}}', 0.0)


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


# ============================================================================ helpers and sampling


def _deltas(tokens: list[int], params: GenerationParams, cancel: threading.Event | None = None) -> list[Any]:
    tok = FakeTokenizer()
    return list(deltas_from_tokens(iter(tokens), tok.decode, params, cancel or threading.Event()))


def test_deltas_finish_reasons() -> None:
    tok = FakeTokenizer()
    ids = tok.encode("hello world")
    d = _deltas(ids, gp(max_tokens=5))
    assert "".join(x.text for x in d) == "hello" and d[-1].finish_reason == "length"
    assert sum(x.token_id is not None for x in d) == 5
    d = _deltas([*ids, tok.end_id, *ids], gp(max_tokens=50, stop_token_ids=frozenset({tok.end_id})))
    assert "".join(x.text for x in d) == "hello world" and d[-1].finish_reason == "stop"
    assert sum(x.token_id is not None for x in d) == len(ids)  # the stop token is not counted
    d = _deltas(ids, gp(max_tokens=50, stop=("o w",)))
    assert "".join(x.text for x in d) == "hell" and d[-1].finish_reason == "stop"
    d = _deltas(ids, gp(max_tokens=50))  # the token stream runs out (context full)
    assert "".join(x.text for x in d) == "hello world" and d[-1].finish_reason == "length"
    cancel = threading.Event()
    cancel.set()
    d = _deltas(ids, gp(max_tokens=50), cancel)
    assert [x.finish_reason for x in d] == ["cancelled"]


def test_sample_token() -> None:
    """The sampler the reference loop shares with the engine, called the way the server calls it."""
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    best = int(np.argmax(logits))
    assert sample(logits, 0.0, None, 1.0, None) == best
    assert sample(logits, 1.0, 1, 1.0, make_generator(1)) == best
    assert sample(logits, 1.0, None, 1e-6, make_generator(1)) == best
    g1, g2 = make_generator(7), make_generator(7)
    draws1 = [sample(logits, 1.0, None, 1.0, g1) for _ in range(20)]
    draws2 = [sample(logits, 1.0, None, 1.0, g2) for _ in range(20)]
    assert draws1 == draws2 and len(set(draws1)) > 1
    top5 = set(np.argsort(-logits)[:5].tolist())
    g = make_generator(3)
    assert {sample(logits, 2.0, 5, 1.0, g) for _ in range(200)} <= top5


def test_slot_pool_is_fifo_and_survives_cancellation() -> None:
    async def run() -> list[str]:
        pool = SlotPool(1)
        order: list[str] = []
        await pool.acquire()

        async def waiter(name: str) -> None:
            await pool.acquire()
            order.append(name)

        a = asyncio.ensure_future(waiter("a"))
        await asyncio.sleep(0)
        b = asyncio.ensure_future(waiter("b"))
        await asyncio.sleep(0)
        c = asyncio.ensure_future(waiter("c"))
        await asyncio.sleep(0)
        assert pool.waiting == 3
        b.cancel()  # b leaves the queue: its turn must not be lost
        await asyncio.sleep(0)
        assert pool.waiting == 2
        pool.release()
        await a
        pool.release()
        await c
        pool.release()
        assert pool.free == 1 and pool.waiting == 0
        return order

    assert asyncio.run(run()) == ["a", "c"]


def test_settings_and_hosts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("localhost") and is_loopback_host("::1")
    assert (
        not is_loopback_host("0.0.0.0") and not is_loopback_host("192.168.1.4") and not is_loopback_host("example.org")
    )
    assert exposure_warning(Settings(host="127.0.0.1")) is None
    assert exposure_warning(Settings(host="0.0.0.0", api_key="k")) is None
    warning = exposure_warning(Settings(host="0.0.0.0", port=9000))
    assert warning is not None and "without an API key" in warning and "9000" in warning
    monkeypatch.setenv("NANOCHAT_API_KEY", "from-env")
    assert Settings.resolve().api_key == "from-env"
    assert Settings.resolve(api_key="flag").api_key == "flag"
    with pytest.raises(ValueError):
        Settings(max_concurrent=0)
    assert model_id_for(tmp_path / "runs" / "d20-x" / "checkpoints" / "step_000100") == "d20-x"
    assert model_id_for(tmp_path / "runs" / "d20-x") == "d20-x"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert model_id_for(tmp_path / "m.gguf") == "m"
    assert find_latest_run(tmp_path / "runs") is None
    for i, name in enumerate(["b-old", "a-new", "c-nockpt"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        if name != "c-nockpt":
            (tmp_path / "runs" / name / "checkpoints").mkdir()
            os.utime(tmp_path / "runs" / name / "checkpoints", (1000 + i, 1000 + i))
    assert find_latest_run(tmp_path / "runs") == tmp_path / "runs" / "a-new"


# ============================================================================ HTTP mechanics (FakeBackend)


def _stream_first_chunk(client: httpx.Client, body: dict[str, Any]) -> tuple[Any, Iterator[str]]:
    """Open a stream, return (response context, payload iterator) after the first data event."""
    cm = client.stream("POST", CHAT, json={**body, "stream": True})
    r = cm.__enter__()
    assert r.status_code == 200, r.read()
    events = iter_sse(r.iter_lines())
    first = json.loads(next(events))
    assert first["choices"][0]["delta"]["role"] == "assistant"
    return cm, events


def test_health_and_metrics_answer_while_generation_is_held() -> None:
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    with (
        ServerThread(create_app(backend, Settings(max_concurrent=2))) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        cm, events = _stream_first_chunk(c, {"messages": MSG, "temperature": 0})
        try:
            # the worker thread is blocked inside the backend: the event loop must still answer
            h = httpx.get(srv.url + "/health", timeout=10)
            assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["in_flight"] == 1
            assert metrics(srv.url)["nanochat_requests_in_flight"] == 1
            assert httpx.get(srv.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "fake"
            gate.set()
            payloads = list(events)
        finally:
            cm.__exit__(None, None, None)
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
        assert text == backend.reply
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert wait_until(lambda: metrics(srv.url)["nanochat_requests_in_flight"] == 0)


def test_disconnect_mid_stream_cancels_and_frees_the_slot() -> None:
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    with ServerThread(create_app(backend, Settings(max_concurrent=1))) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            cm, _ = _stream_first_chunk(c, {"messages": MSG})
            cm.__exit__(None, None, None)  # hang up with the generation held open
        assert wait_until(lambda: backend.cancelled == 1)
        assert wait_until(lambda: metrics(srv.url)["nanochat_requests_in_flight"] == 0)
        m = metrics(srv.url)
        assert m["nanochat_requests_cancelled_total"] == 1
        gate.set()
        r = httpx.post(srv.url + CHAT, json={"messages": MSG, "temperature": 0}, timeout=30)  # the slot is free again
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == backend.reply


def test_queued_request_waits_then_runs_and_a_queued_disconnect_leaves_the_queue() -> None:
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    with (
        ServerThread(create_app(backend, Settings(max_concurrent=1))) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        cm, events = _stream_first_chunk(c, {"messages": MSG})  # holds the only slot
        try:
            # a queued client that gives up: it must leave the queue without taking a slot
            body = json.dumps({"messages": MSG}).encode()
            head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
                sock.sendall(head.encode() + b"\r\n\r\n" + body)
                assert wait_until(lambda: metrics(srv.url)["nanochat_requests_queued"] == 1)
            # (socket closed: the client is gone while queued)
            assert wait_until(lambda: metrics(srv.url)["nanochat_requests_queued"] == 0)
            assert backend.started == 1
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(httpx.post, srv.url + CHAT, json={"messages": MSG, "temperature": 0}, timeout=60)
                assert wait_until(lambda: metrics(srv.url)["nanochat_requests_queued"] == 1)
                assert not waiting.done()
                gate.set()
                assert [p for p in events][-1] == "[DONE]"
                r = waiting.result(timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == backend.reply
        finally:
            cm.__exit__(None, None, None)
        assert wait_until(lambda: metrics(srv.url)["nanochat_requests_in_flight"] == 0)
        assert metrics(srv.url)["nanochat_requests_cancelled_total"] == 1


def test_backend_failures_become_error_responses() -> None:
    with ServerThread(create_app(FakeBackend(fail_at=0))) as srv:
        r = httpx.post(srv.url + CHAT, json={"messages": MSG}, timeout=30)
        assert_error(r, 500)
        r = httpx.post(srv.url + CHAT, json={"messages": MSG, "stream": True}, timeout=30)
        assert_error(r, 500)  # failed before the first token: a real HTTP error, not a 200 stream
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    with ServerThread(create_app(FakeBackend(fail_at=5))) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("POST", CHAT, json={"messages": MSG, "stream": True}) as r:
            assert r.status_code == 200
            payloads = list(iter_sse(r.iter_lines()))
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["error"]["type"] == "server_error"  # reported in-band mid-stream
        assert_error(c.post(COMP, json={"prompt": "x", "max_tokens": 10}), 500)  # failed mid-way, not streamed
        assert c.post(COMP, json={"prompt": "x", "max_tokens": 3}).status_code == 200  # done before token 5
        assert metrics(srv.url)["nanochat_requests_in_flight"] == 0


def test_fake_backend_completions_and_seeds() -> None:
    with ServerThread(create_app(FakeBackend())) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        a = client.chat.completions.create(model="fake", messages=MSG, temperature=1.0, seed=1)
        b = client.chat.completions.create(model="fake", messages=MSG, temperature=1.0, seed=1)
        c = client.chat.completions.create(model="fake", messages=MSG, temperature=1.0, seed=2)
        assert a.choices[0].message.content == b.choices[0].message.content != c.choices[0].message.content
        comp = client.completions.create(model="fake", prompt="abc", max_tokens=5, temperature=0)
        assert comp.choices[0].text == "Hello" and comp.choices[0].finish_reason == "length"
        assert comp.usage is not None and comp.usage.prompt_tokens == 4  # <|bos|> + 3 bytes


# ============================================================================ the real server (tiny model)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("serve") / "tiny.gguf", seq_len=CTX)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ["--threads", "1", "--max-concurrent", "2", "--max-body-bytes", str(BODY_LIMIT),
            "--max-tokens-limit", str(TOKENS_LIMIT)]  # fmt: skip
    env = {"NANOCHAT_API_KEY": ""}  # an API key in the environment must not leak into this server
    with ServerProcess(tiny_model, args, log_path=log, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


@pytest.fixture(scope="module")
def real_backend(tiny_model: Path) -> EngineBackend:
    return EngineBackend.from_path(tiny_model, threads=1)  # in-process generation shares 2 cores with the server


# Streams requests that use every logit-side feature (sampling, penalties, bias, logprobs, n, JSON mode) through an
# EngineBackend on a GGUF in a fresh interpreter; prints their token ids and logprobs, and whether torch was imported.
SERVE_NO_TORCH = r"""
import json, sys, threading
from nanochat.engine.sampling import SamplingParams
from nanochat.serve import EngineBackend
from nanochat.serve.backend import GenerationParams
b = EngineBackend.from_path(sys.argv[1], threads=1)
out = []
for kw in json.loads(sys.argv[2]):
    s = SamplingParams(**kw.pop("sampling"))
    kw["logit_bias"] = tuple(map(tuple, kw.get("logit_bias", ())))
    ds = list(b.stream([1, 5, 9, 13], GenerationParams(sampling=s, **kw), threading.Event()))
    out.append([[d.index, d.token_id, d.text, d.logprob and d.logprob.logprob] for d in ds])
print(json.dumps({"torch": "torch" in sys.modules, "out": out}))
"""


def test_serving_a_gguf_imports_no_torch_and_samples_as_in_process(
    tiny_model: Path, real_backend: EngineBackend
) -> None:
    """Logit processing is numpy: penalties, bias, logprobs, ``n`` and JSON mode need no torch on the Rust engine, and
    a fresh torch-free process gives exactly the tokens and logprobs of this one (where torch is loaded)."""
    requests: list[dict[str, Any]] = [
        {"max_tokens": 12, "n": 2, "logprobs": 2, "presence_penalty": 0.7, "frequency_penalty": 0.3,
         "logit_bias": [[7, 3.0], [11, -50.0]], "sampling": {"temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 3}},
        {"max_tokens": 30, "json_object": True, "sampling": {"temperature": 0.7, "seed": 4}},
        {"max_tokens": 8, "logprobs": 0, "sampling": {"temperature": 0.0}},
    ]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-c", SERVE_NO_TORCH, str(tiny_model), json.dumps(requests)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["torch"] is False, "serving a GGUF imported torch"
    for req, sub in zip(requests, got["out"], strict=True):
        kw = dict(req)
        s = SamplingParams(**kw.pop("sampling"))
        kw["logit_bias"] = tuple(map(tuple, kw.get("logit_bias", ())))
        ds = list(real_backend.stream([1, 5, 9, 13], GenerationParams(sampling=s, **kw), threading.Event()))
        here = [[d.index, d.token_id, d.text, d.logprob and d.logprob.logprob] for d in ds]
        assert here == sub
        assert sum(1 for d in ds if d.token_id is not None) >= req["max_tokens"] // 2
    json_text = "".join(text for _, _, text, _ in got["out"][1])
    assert isinstance(json.loads(json_text), dict), json_text


@pytest.fixture(scope="session")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with an 8192-token context: a full-length generation takes seconds even on the fast
    engine, so "while it runs" and "it was cut short" are observable without timing assumptions."""
    return build_tiny_model(tmp_path_factory.mktemp("serve-long") / "long.gguf", seq_len=LONG_CTX)


@pytest.fixture(scope="module")
def long_backend(long_model: Path) -> EngineBackend:
    return EngineBackend.from_path(long_model, threads=1)


def _chat(client: openai.OpenAI, model: str, **kw: Any) -> tuple[str, str, Any]:
    r = client.chat.completions.create(model=model, messages=kw.pop("messages", MSG), **kw)
    assert r.object == "chat.completion" and r.model == model and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    return r.choices[0].message.content or "", r.choices[0].finish_reason, r.usage


def _chat_stream(client: openai.OpenAI, model: str, **kw: Any) -> tuple[str, str, Any]:
    chunks = list(
        client.chat.completions.create(
            model=model, messages=kw.pop("messages", MSG), stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [ch for ch in chunks if ch.choices]
    finishes = [ch.choices[0].finish_reason for ch in with_choice]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage: a last usage chunk
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choice)
    return text, finishes[-1], chunks[-1].usage


def test_models_and_page(server: ServerProcess, model_id: str) -> None:
    assert model_id == "tiny"
    m = httpx.get(server.url + f"/v1/models/{model_id}", timeout=10).json()
    assert m["id"] == model_id and m["object"] == "model" and m["context_length"] == CTX
    assert_error(httpx.get(server.url + "/v1/models/nope", timeout=10), 404, code="model_not_found")
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    for needed in ('id="prompt"', 'id="send"', 'id="stop"', 'id="new-chat"', 'id="temperature"', 'id="max-tokens"'):
        assert needed in html
    assert not re.search(r"https?://", html), "the page must not load anything from the network"
    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == model_id


def test_models_and_props_say_the_tiny_model_is_a_base_model(server: ServerProcess, model_id: str) -> None:
    """Our tiny GGUF has nanochat's chat tokens and template, like every trained model, but no chat training."""
    card = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["kind"] == "base"
    assert httpx.get(server.url + f"/v1/models/{model_id}", timeout=10).json()["kind"] == "base"
    props = httpx.get(server.url + "/props", timeout=10).json()
    assert props["model"] == model_id and props["model_kind"] == "base"
    assert props["context_length"] == CTX == props["default_generation_settings"]["n_ctx"]
    assert props["max_completion_tokens"] == TOKENS_LIMIT and props["total_slots"] == 2
    assert props["has_chat_template"] is True and "<|assistant|>" in props["chat_template"]  # the format, untrained
    assert props["fim"] is True
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert spec["paths"]["/props"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Props"
    }
    assert "kind" in spec["components"]["schemas"]["ModelCard"]["required"]
    assert spec["components"]["schemas"]["ModelCard"]["properties"]["kind"]["enum"] == ["base", "chat"]


def test_chat_streamed_equals_unstreamed(client: openai.OpenAI, model_id: str) -> None:
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 1234}, {"temperature": 1.0, "top_p": 0.9, "seed": 5}):
        text, finish, usage = _chat(client, model_id, max_tokens=24, **kw)
        s_text, s_finish, s_usage = _chat_stream(client, model_id, max_tokens=24, **kw)
        assert text and s_text == text and s_finish == finish
        assert usage.completion_tokens == s_usage.completion_tokens <= 24
        assert usage.prompt_tokens == s_usage.prompt_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    other, _, _ = _chat(client, model_id, max_tokens=24, temperature=0.9, seed=4321)
    again, _, _ = _chat(client, model_id, max_tokens=24, temperature=0.9, seed=1234)
    first, _, _ = _chat(client, model_id, max_tokens=24, temperature=0.9, seed=1234)
    assert again == first != other  # the seed decides


def test_max_tokens_gives_length(client: openai.OpenAI, model_id: str) -> None:
    text, finish, usage = _chat(
        client, model_id, max_tokens=7, temperature=0.7, seed=3, extra_body={"ignore_eos": True}
    )
    assert finish == "length" and usage.completion_tokens == 7 and text


def test_stop_strings(client: openai.OpenAI, model_id: str) -> None:
    full, _, _ = _chat(client, model_id, max_tokens=40, temperature=0.0, extra_body={"ignore_eos": True})
    assert len(full) > 12
    stop = full[8:11]
    expected = full[: full.index(stop)]
    for streamed in (False, True):
        fn = _chat_stream if streamed else _chat
        text, finish, _ = fn(client, model_id, max_tokens=40, temperature=0.0, stop=[stop, "\x00never"],
                             extra_body={"ignore_eos": True})  # fmt: skip
        assert text == expected and finish == "stop"


def test_completions(client: openai.OpenAI, model_id: str) -> None:
    kw: dict[str, Any] = {"model": model_id, "prompt": "def add(a, b):", "max_tokens": 20, "temperature": 0.8,
                          "seed": 99, "extra_body": {"ignore_eos": True}}  # fmt: skip
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 20
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(ch.object == "text_completion" for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    by_ids = client.completions.create(**{**kw, "prompt": [0, 50, 60, 70]})  # token ids are accepted too
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 4


def test_health_answers_during_a_long_generation(long_backend: EngineBackend) -> None:
    with ServerThread(create_app(long_backend, Settings(max_concurrent=2))) as srv:
        prompt_len = len(long_backend.tokenizer.render_chat(MSG))
        body = {"messages": MSG, "max_tokens": LONG_CTX - prompt_len, "temperature": 0.8, "ignore_eos": True}
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            cm, events = _stream_first_chunk(c, body)
            try:
                assert json.loads(next(events))["choices"][0]["delta"]["content"]  # tokens are flowing
                h = httpx.get(srv.url + "/health", timeout=10)
                assert h.status_code == 200 and h.json() == {**h.json(), "status": "ok", "in_flight": 1}
                m = metrics(srv.url)
                assert m["nanochat_requests_in_flight"] == 1
                assert m["nanochat_generated_tokens_total"] < LONG_CTX - prompt_len  # still generating
            finally:
                cm.__exit__(None, None, None)
        assert wait_until(lambda: metrics(srv.url)["nanochat_requests_in_flight"] == 0)


def test_eight_concurrent_streams_all_complete(client: openai.OpenAI, model_id: str, server: ServerProcess) -> None:
    def one(seed: int) -> tuple[str, str, Any]:
        return _chat_stream(
            client, model_id, max_tokens=16, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
        )

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))  # 8 clients, 2 slots: 6 of them queue
    for seed, (text, finish, usage) in enumerate(results):
        assert finish == "length" and usage.completion_tokens == 16 and text
        alone, _, _ = _chat(
            client, model_id, max_tokens=16, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
        )
        assert text == alone  # concurrency does not change a seeded generation
    assert len({r[0] for r in results}) > 1
    m = metrics(server.url)
    assert m["nanochat_requests_in_flight"] == 0 and m["nanochat_requests_queued"] == 0


def test_metrics_count_what_was_served(server: ServerProcess, client: openai.OpenAI, model_id: str) -> None:
    before = metrics(server.url)
    usages = [_chat(client, model_id, max_tokens=5 + i, temperature=0.5, seed=i)[2] for i in range(3)]
    usages.append(_chat_stream(client, model_id, max_tokens=6, temperature=0.5, seed=9)[2])
    r = httpx.post(server.url + CHAT, json={"messages": []}, timeout=10)
    assert r.status_code == 400
    after = metrics(server.url)
    assert requests_count(after, CHAT, 200) - requests_count(before, CHAT, 200) == 4
    assert requests_count(after, CHAT, 400) - requests_count(before, CHAT, 400) == 1
    generated = after["nanochat_generated_tokens_total"] - before["nanochat_generated_tokens_total"]
    assert generated == sum(u.completion_tokens for u in usages)
    prompt = after["nanochat_prompt_tokens_total"] - before["nanochat_prompt_tokens_total"]
    assert prompt == sum(u.prompt_tokens for u in usages)
    ttft = "nanochat_time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 4
    tpot = "nanochat_time_per_output_token_seconds_count"
    assert after[tpot] - before[tpot] == sum(u.completion_tokens - 1 for u in usages)
    assert after["nanochat_requests_in_flight"] == 0
    assert after[f'nanochat_model_info{{context_length="{CTX}",model="{model_id}"}}'] == 1


def test_one_log_line_per_request(server: ServerProcess, model_id: str) -> None:
    r = httpx.post(server.url + CHAT, json={"model": model_id, "messages": MSG, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    httpx.get(server.url + "/no/such/path", timeout=10)
    pattern = re.compile(r"POST /v1/chat/completions 200 tokens=\d+\+3 \d+\.\d+s")
    assert wait_until(lambda: bool(pattern.search(server.log_text())), timeout=10), server.log_text()[-2000:]
    assert wait_until(lambda: "GET /no/such/path 404" in server.log_text(), timeout=10)


LONG = "def f(x): return x + 1\n" * 200  # far more than CTX tokens
BAD_REQUESTS: list[tuple[str, str, Any, int, str | None, str | None]] = [
    # (id, path, body (dict, or raw bytes), status, param, code)
    ("invalid-json", CHAT, b'{"messages": [', 400, None, "invalid_json"),
    ("json-array", CHAT, b"[1, 2]", 400, None, None),
    ("no-body", CHAT, b"", 400, None, None),
    ("no-messages", CHAT, {"max_tokens": 5}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages", None),
    ("messages-string", CHAT, {"messages": "hi"}, 400, "messages", None),
    ("bad-role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
    ("content-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ("no-content", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    ("unknown-model", CHAT, {"model": "gpt-9", "messages": MSG}, 404, "model", "model_not_found"),
    ("temperature-negative", CHAT, {"messages": MSG, "temperature": -0.5}, 400, "temperature", None),
    ("temperature-too-high", CHAT, {"messages": MSG, "temperature": 2.5}, 400, "temperature", None),
    ("temperature-string", CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature", None),
    ("top-p-zero", CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p", None),
    ("top-p-above-one", CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p", None),
    ("max-tokens-zero", CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-negative", CHAT, {"messages": MSG, "max_tokens": -3}, 400, "max_tokens", None),
    ("max-tokens-string", CHAT, {"messages": MSG, "max_tokens": "10"}, 400, "max_tokens", None),
    ("max-tokens-bool", CHAT, {"messages": MSG, "max_tokens": True}, 400, "max_tokens", None),
    ("max-tokens-over-limit", CHAT, {"messages": MSG, "max_tokens": TOKENS_LIMIT + 1}, 400, "max_tokens", None),
    (
        "max-tokens-beyond-context",
        CHAT,
        {"messages": [{"role": "user", "content": LONG[:300]}], "max_tokens": 200},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),  # fmt: skip
    (
        "prompt-beyond-context",
        CHAT,
        {"messages": [{"role": "user", "content": LONG}]},
        400,
        "messages",
        "context_length_exceeded",
    ),  # fmt: skip
    ("n-too-many", CHAT, {"messages": MSG, "n": 17}, 400, "n", None),
    ("n-over-the-slots", CHAT, {"messages": MSG, "n": 16}, 400, "n", "invalid_value"),
    ("stop-empty", CHAT, {"messages": MSG, "stop": ""}, 400, "stop", None),
    ("stop-five", CHAT, {"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("stream-string", CHAT, {"messages": MSG, "stream": "yes"}, 400, "stream", None),
    ("seed-string", CHAT, {"messages": MSG, "seed": "1"}, 400, "seed", None),
    ("stream-bad-temperature", CHAT, {"messages": MSG, "stream": True, "temperature": -1}, 400, "temperature", None),
    ("completion-no-prompt", COMP, {"max_tokens": 3}, 400, "prompt", "missing_required_parameter"),
    ("completion-token-outside-vocab", COMP, {"prompt": [1, 10**6]}, 400, "prompt", None),
    ("completion-two-prompts", COMP, {"prompt": ["a", "b"]}, 400, "prompt", None),
    ("completion-prompt-beyond-context", COMP, {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("completion-ids-beyond-context", COMP, {"prompt": [50] * CTX}, 400, "prompt", "context_length_exceeded"),
    ("completion-empty-ids", COMP, {"prompt": []}, 400, "prompt", None),
    ("completion-echo", COMP, {"prompt": "a", "echo": True}, 400, "echo", None),
    ("completion-unknown-model", COMP, {"model": "nope", "prompt": "a"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(
    server: ServerProcess, model_id: str, case: tuple[str, str, Any, int, str | None, str | None]
) -> None:
    _, path, body, status, param, code = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(r, status, param, code)
    ok = httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_openai_client_sees_errors(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=MSG, temperature=-1)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSG)


def test_oversized_bodies_paths_and_methods(server: ServerProcess) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]}).encode()
    r = httpx.post(server.url + CHAT, content=big, headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(r, 413, code="request_too_large")  # rejected by Content-Length

    def chunked() -> Iterator[bytes]:  # no Content-Length: rejected by the bytes received
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(server.url + CHAT, content=chunked(), headers={"Content-Type": "application/json"}, timeout=30)
    assert "content-length" not in r.request.headers
    assert_error(r, 413, code="request_too_large")
    assert_error(httpx.get(server.url + "/v1/nothing", timeout=10), 404, code="not_found")
    assert_error(httpx.get(server.url + "/nothing", timeout=10), 404, code="not_found")
    assert_error(httpx.get(server.url + CHAT, timeout=10), 405, code="method_not_allowed")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_api_key(real_backend: EngineBackend) -> None:
    with ServerThread(create_app(real_backend, Settings(api_key="s3cret"))) as srv:
        body = {"messages": MSG, "max_tokens": 2}
        assert_error(httpx.post(srv.url + CHAT, json=body, timeout=30), 401, code="invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(httpx.post(srv.url + CHAT, json=body, headers=wrong, timeout=30), 401, code="invalid_api_key")
        assert_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Basic s3cret"}, timeout=30), 401)
        # checked before the body: a bad key with a bad body is still a 401
        assert_error(httpx.post(srv.url + CHAT, content=b"{", headers=wrong, timeout=30), 401)
        assert httpx.get(srv.url + "/", timeout=10).status_code == 200  # the page and health stay open
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        r = good.chat.completions.create(model=real_backend.model_id, messages=MSG, max_tokens=3)
        assert r.usage is not None and r.usage.completion_tokens >= 1


def test_real_disconnect_frees_the_only_slot(long_backend: EngineBackend) -> None:
    with ServerThread(create_app(long_backend, Settings(max_concurrent=1))) as srv:
        prompt_len = len(long_backend.tokenizer.render_chat(MSG))
        long_body = {"messages": MSG, "max_tokens": LONG_CTX - prompt_len, "temperature": 0.8, "ignore_eos": True}
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            cm, events = _stream_first_chunk(c, long_body)
            next(events)  # a content chunk: the generation is under way
            cm.__exit__(None, None, None)  # hang up long before the last token
        assert wait_until(lambda: metrics(srv.url)["nanochat_requests_cancelled_total"] == 1)
        assert wait_until(lambda: metrics(srv.url)["nanochat_requests_in_flight"] == 0)
        r = httpx.post(srv.url + CHAT, json={"messages": MSG, "max_tokens": 4, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4  # the only slot is free
        m = metrics(srv.url)
        assert m["nanochat_generated_tokens_total"] < LONG_CTX - prompt_len  # the long one was cut short


def test_engine_matches_the_reference_loop(tiny_model: Path, real_backend: EngineBackend) -> None:
    """The fast path (KV cache, Rust, batched) against its slow twin (a full torch forward per token)."""
    assert real_backend.mode.startswith("engine")
    reference = ReferenceBackend(real_backend.loaded)
    prompt = real_backend.tokenizer.render_chat(MSG)
    for temperature, seed in ((0.0, None), (0.9, 11)):
        params = gp(max_tokens=24, temperature=temperature, seed=seed)
        fast = list(real_backend.stream(prompt, params, threading.Event()))
        slow = list(reference.stream(prompt, params, threading.Event()))
        assert [d.token_id for d in fast if d.token_id is not None] == [
            d.token_id for d in slow if d.token_id is not None
        ]
        assert "".join(d.text for d in fast) == "".join(d.text for d in slow)
        assert fast[-1].finish_reason == slow[-1].finish_reason == "length"


def test_batched_requests_equal_solo_requests(real_backend: EngineBackend) -> None:
    prompts = [real_backend.tokenizer.render_chat([{"role": "user", "content": f"task {i}"}]) for i in range(4)]
    params = [gp(max_tokens=40 + 10 * i, temperature=0.8, top_k=50 * (i % 2), seed=i) for i in range(4)]

    batcher = real_backend.batcher

    def drain(deltas: Iterator[Delta]) -> str:
        return "".join(d.text for d in deltas)

    # all four submitted before any is read: the shortest needs 40 decode steps, and each step admits what waits
    batcher.max_batch = 0
    streams = [real_backend.stream(prompts[i], params[i], threading.Event()) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(drain, streams))
    assert batcher.max_batch == 4, f"the four requests were never stepped together (largest batch {batcher.max_batch})"
    batcher.max_batch = 0
    alone = [drain(real_backend.stream(prompts[i], params[i], threading.Event())) for i in range(4)]
    assert batcher.max_batch == 1  # one at a time: the twin really ran alone
    assert together == alone


# ============================================================================ the model's kind


@pytest.mark.parametrize("template", [None, CHATML], ids=["no-template", "chatml"])
def test_a_third_party_file_is_a_chat_model_when_it_ships_a_chat_template(tmp_path: Path, template: str | None) -> None:
    """A converter copies ``tokenizer.chat_template`` from the model's repository: an instruction-tuned model has one,
    a base model has none (and then chat is refused: the kind and the chat endpoint agree)."""
    path = write_converter_gguf(tmp_path / "m.gguf", make_model(), gpt2_like_tokenizer(), chat_template=template)
    expected = "base" if template is None else "chat"
    backend = EngineBackend.from_path(path, threads=1)
    assert backend.kind == expected
    with ServerThread(create_app(backend)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/v1/models").json()["data"][0]["kind"] == expected
        props = c.get("/props").json()
        assert props["model_kind"] == expected and props["model"] == "m"
        assert props["has_chat_template"] is (template is not None) and props["chat_template"] == (template or "")
        assert props["context_length"] == 64 and props["fim"] is False
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == (400 if template is None else 200), r.text


def test_a_file_that_declares_chat_training_is_a_chat_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's ``state.json`` or a GGUF key declares a chat stage; without it our files are base models."""
    import gguf

    assert EngineBackend.from_path(build_tiny_model(tmp_path / "pre"), threads=1).kind == "base"
    sft = build_tiny_model(tmp_path / "sft", state={"chat_trained": True})
    assert EngineBackend.from_path(sft, threads=1).kind == "chat"
    assert EngineBackend.from_path(
        build_tiny_model(tmp_path / "no", state={"chat_trained": "yes"}), threads=1
    ).kind == ("base")  # only a JSON true declares it

    add_name = gguf.GGUFWriter.add_name

    def add_name_and_declare(self: Any, name: str, value: bool = True) -> None:  # the key goes in before the seal
        add_name(self, name)
        self.add_bool(CHAT_TRAINED_KEY, value)

    monkeypatch.setattr(gguf.GGUFWriter, "add_name", add_name_and_declare)
    declared = build_tiny_model(tmp_path / "sft.gguf")
    monkeypatch.setattr(gguf.GGUFWriter, "add_name", lambda self, name: add_name_and_declare(self, name, False))
    denied = build_tiny_model(tmp_path / "denied.gguf")
    monkeypatch.undo()
    assert EngineBackend.from_path(declared, threads=1).kind == "chat"
    assert EngineBackend.from_path(denied, threads=1).kind == "base"
    with ServerThread(create_app(EngineBackend.from_path(declared, threads=1))) as srv:
        assert httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["kind"] == "chat"
        assert httpx.get(srv.url + "/props", timeout=30).json()["model_kind"] == "chat"


def test_a_backend_without_a_kind_gets_the_rule() -> None:
    """A backend that does not say its kind (an older or third-party one) is judged by its tokenizer alone."""

    class Quiet:  # FakeBackend without its ``kind``
        def __init__(self, tokenizer: Any) -> None:
            self.inner = FakeBackend(tokenizer=tokenizer)

        def __getattr__(self, name: str) -> Any:
            if name == "kind":
                raise AttributeError(name)
            return getattr(self.inner, name)

    class TemplatedTokenizer(FakeTokenizer):
        has_chat_tokens = False
        chat_template = CHATML

    for tok, kind in ((FakeTokenizer(), "base"), (TemplatedTokenizer(), "chat")):
        with ServerThread(create_app(Quiet(tok))) as srv:  # type: ignore[arg-type]
            assert httpx.get(srv.url + "/props", timeout=10).json()["model_kind"] == kind


# ============================================================================ CLI


def test_cli_serves_the_newest_run_by_default(tmp_path: Path) -> None:
    build_tiny_model(tmp_path / "runs" / "tiny-old", seq_len=128)
    newest = build_tiny_model(tmp_path / "runs" / "tiny-new", seq_len=CTX)
    os.utime(tmp_path / "runs" / "tiny-old" / "checkpoints", (1, 1))
    assert find_latest_run(tmp_path / "runs") == newest
    env = {"NANOCHAT_API_KEY": ""}
    with ServerProcess(None, ["--threads", "1"], log_path=tmp_path / "server.log", env=env, cwd=tmp_path) as srv:
        card = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]
        assert card["id"] == "tiny-new" and card["context_length"] == CTX
        assert "context 256, base model)" in srv.log_text()  # the start line says which kind is served
        r = httpx.post(srv.url + CHAT, json={"messages": MSG, "max_tokens": 3, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_cli_without_a_model_says_how_to_get_one(tmp_path: Path) -> None:
    env = {**os.environ, "NANOCHAT_API_KEY": ""}
    r = subprocess.run([sys.executable, "-m", "nanochat.serve"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)  # fmt: skip
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nanochat-train --config d20" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "-m", "nanochat.serve", "--model", str(tmp_path / "missing.gguf")],
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert r.returncode == 2 and "no such file" in r.stderr
