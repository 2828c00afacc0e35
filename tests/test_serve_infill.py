"""``/infill`` (llama-server's schema), ``n`` choices and the prompt cache, on a tiny real model.

Each fast path has an independent twin:
- the infill prompt against :func:`nanochat.data.fim.infill_prompt` (the training side's PSM layout) and a plain
  list built here for ``input_extra``; the infill reply against ``nanochat.engine.Engine.generate`` on those ids;
- choice ``i`` of an ``n``-choice request against the ``n = 1`` request with seed ``seed + i``;
- a generation that starts from the prompt cache against the same generation on a fresh session (cache off), and
  :class:`~nanochat.serve.backend.PromptCache` against a brute-force longest common prefix.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_fakes import FakeBackend, ServerThread, build_tiny_model, gp, iter_sse

from nanochat.data.fim import infill_prompt, middle_stop_ids
from nanochat.engine import Engine
from nanochat.serve import EngineBackend, Settings, create_app
from nanochat.serve.backend import PromptCache
from nanochat.serve.routes import SNIPPET_SEPARATOR

CTX = 256
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG: list[Any] = [{"role": "user", "content": "write a function that adds two numbers"}]
# what llama.vim sends (llama.vim's s:fim_try_hint/s:fim_on_response, recorded): the local context around the
# cursor, ring-buffer chunks of other files, sampling hints, and fields llama-server alone uses
LLAMA_VIM_REQUEST: dict[str, Any] = {
    "input_prefix": "import os\n\ndef add(a, b):\n",
    "input_suffix": "\n\nprint(add(1, 2))\n",
    "input_extra": [{"filename": "util.py", "text": "def fib(n):\n    return n\n"}],
    "prompt": "    ",
    "n_predict": 16,
    "stop": [],
    "n_indent": 4,
    "top_k": 40,
    "top_p": 0.90,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
    "response_fields": ["content", "timings/prompt_n", "timings/predicted_n", "truncated", "tokens_cached"],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("infill") / "tiny.gguf", seq_len=CTX)


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> EngineBackend:
    return EngineBackend.from_path(tiny_model, threads=1)


@pytest.fixture(scope="module")
def srv(backend: EngineBackend) -> Iterator[ServerThread]:
    with ServerThread(create_app(backend, Settings(max_concurrent=4, log_requests=False))) as s:
        yield s


class Recorder:
    """Wraps a backend's ``stream`` to keep the prompt ids and params of every request."""

    def __init__(self, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[list[int], Any]] = []
        real = backend.stream

        def stream(prompt_ids: Any, params: Any, cancel: threading.Event) -> Any:
            self.calls.append((list(prompt_ids), params))
            return real(prompt_ids, params, cancel)

        monkeypatch.setattr(backend, "stream", stream)


# ============================================================================ /infill


def test_infill_prompt_is_the_trained_psm_layout(
    srv: ServerThread, backend: EngineBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(backend, monkeypatch)
    tok = backend.tokenizer
    body = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n\nprint(add(1, 2))\n", "n_predict": 4}
    r = httpx.post(srv.url + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    want = infill_prompt(tok, body["input_prefix"], body["input_suffix"])  # the training side's own builder
    assert rec.calls[-1][0] == want
    assert r.json()["tokens_evaluated"] == len(want) and r.json()["truncated"] is False
    # input_extra before the prefix sentinel, prompt after the middle one, as llama-server places them
    pre, suf, mid = tok.fim_ids()
    extra = [{"filename": "a.py", "text": "x = 1\n"}, {"text": "y = 2\n"}]
    r = httpx.post(srv.url + "/infill", json={**body, "input_extra": extra, "prompt": "ret"}, timeout=60)
    assert r.status_code == 200, r.text
    extra_ids = [*tok.encode(SNIPPET_SEPARATOR + "x = 1\n"), *tok.encode(SNIPPET_SEPARATOR + "y = 2\n")]
    want = [tok.bos_id, *extra_ids, pre, *tok.encode(body["input_prefix"]), suf, *tok.encode(body["input_suffix"]),
            mid, *tok.encode("ret")]  # fmt: skip
    assert rec.calls[-1][0] == want
    stops = rec.calls[-1][1].stop_token_ids
    assert middle_stop_ids(tok) <= stops  # the trained end of a middle, and every sentinel


def test_infill_reply_equals_the_engine_on_the_same_prompt(srv: ServerThread, tiny_model: Path) -> None:
    from nanochat.export import load

    loaded = load(tiny_model)
    tok = loaded.tokenizer
    body = {"input_prefix": "for i in range(", "input_suffix": "):\n    print(i)\n", "n_predict": 12,
            "temperature": 0.0}  # fmt: skip
    r = httpx.post(srv.url + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    eng = Engine(loaded, threads=1)
    want = eng.generate(infill_prompt(tok, body["input_prefix"], body["input_suffix"]), max_new_tokens=12,
                        temperature=0.0, stop_token_ids=middle_stop_ids(tok) | EngineBackend.from_path(tiny_model,
                        threads=1).stop_token_ids)  # fmt: skip
    assert got["content"] == want.text
    assert got["tokens_predicted"] == len(want.token_ids)
    assert got["stop_type"] == ("limit" if want.finish_reason == "length" else "eos")


def test_a_recorded_llama_vim_request(srv: ServerThread) -> None:
    r = httpx.post(srv.url + "/infill", json=LLAMA_VIM_REQUEST, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["content"], str) and body["stop"] is True
    assert 0 < body["tokens_predicted"] <= LLAMA_VIM_REQUEST["n_predict"]
    assert body["timings"]["predicted_n"] == body["tokens_predicted"]
    assert body["timings"]["prompt_n"] == body["tokens_evaluated"] > 10
    assert body["truncated"] is False


def test_infill_streams_as_llama_server(srv: ServerThread) -> None:
    body = {"input_prefix": "def f(x):\n", "input_suffix": "\n", "n_predict": 10, "seed": 3, "stream": True}
    with httpx.stream("POST", srv.url + "/infill", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(e) for e in iter_sse(r.iter_lines())]  # no [DONE]: json.loads would fail on it
    *pieces, last = events
    assert all(e["stop"] is False and set(e) == {"content", "stop"} for e in pieces)
    assert last["stop"] is True and last["content"] == ""
    whole = httpx.post(srv.url + "/infill", json={**body, "stream": False}, timeout=60).json()
    assert "".join(e["content"] for e in pieces) == whole["content"]  # same seed, same middle
    assert last["tokens_predicted"] == whole["tokens_predicted"] == 10


def test_infill_cuts_a_long_prefix_to_fit(srv: ServerThread, backend: EngineBackend, monkeypatch: Any) -> None:
    rec = Recorder(backend, monkeypatch)
    tok = backend.tokenizer
    prefix = "".join(f"x{i} = {i}\n" for i in range(400))  # far more than the 256-token context
    body = {"input_prefix": prefix, "input_suffix": "y = 1\n", "n_predict": 8}
    r = httpx.post(srv.url + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] is True
    ids = rec.calls[-1][0]
    assert len(ids) + 8 <= CTX
    pre, suf, mid = tok.fim_ids()
    kept = ids[ids.index(pre) + 1 : ids.index(suf)]
    assert kept == tok.encode(prefix)[-len(kept) :] and len(kept) > CTX // 2  # the prefix's tail, most of the room
    assert ids[ids.index(suf) + 1 : ids.index(mid)] == tok.encode("y = 1\n")  # the short suffix whole


def test_infill_refuses_clearly(srv: ServerThread) -> None:
    with ServerThread(create_app(FakeBackend(), Settings(log_requests=False))) as fake:  # no FIM tokens
        r = httpx.post(fake.url + "/infill", json={"input_prefix": "a", "input_suffix": "b"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "fim_unsupported"
        assert "fill-in-the-middle" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/infill", json={"input_prefix": "a", "n_predict": CTX + 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_predict"
    r = httpx.post(srv.url + "/infill", json={"input_prefix": 5}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_prefix"
    r = httpx.post(srv.url + "/infill", json={"input_prefix": "a", "model": "other"}, timeout=30)
    assert r.status_code == 404


# ============================================================================ n choices


def test_n_choices_are_the_single_replies_with_consecutive_seeds(srv: ServerThread) -> None:
    base = {"messages": MSG, "max_tokens": 20, "temperature": 0.9, "ignore_eos": True}
    r = httpx.post(srv.url + CHAT, json={**base, "n": 3, "seed": 40}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    solo = [httpx.post(srv.url + CHAT, json={**base, "seed": 40 + i}, timeout=60).json() for i in range(3)]
    assert [c["message"]["content"] for c in choices] == [s["choices"][0]["message"]["content"] for s in solo]
    assert len({c["message"]["content"] for c in choices}) == 3  # distinct seeds, distinct samples
    assert body["usage"]["completion_tokens"] == 60
    # streamed: chunks carry their choice's index, and each choice's text is the non-streamed one
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    with httpx.stream("POST", srv.url + COMP, json={"prompt": "def f(", "max_tokens": 12, "n": 2, "seed": 5,
                                                     "stream": True, "ignore_eos": True}, timeout=60) as s:  # fmt: skip
        assert s.status_code == 200
        for e in iter_sse(s.iter_lines()):
            if e == "[DONE]":
                break
            (c,) = json.loads(e)["choices"]
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finishes[c["index"]] = c["finish_reason"]
    assert finishes == {0: "length", 1: "length"}
    whole = httpx.post(srv.url + COMP, json={"prompt": "def f(", "max_tokens": 12, "n": 2, "seed": 5,
                                             "ignore_eos": True}, timeout=60).json()  # fmt: skip
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}


def test_n_choices_share_one_batch(backend: EngineBackend) -> None:
    prompt = backend.tokenizer.render_chat(MSG)
    steps0 = backend.batcher.steps
    prefilled0 = backend.engine.prefilled_tokens
    deltas = list(backend.stream(prompt, gp(max_tokens=10, temperature=0.7, seed=1, n=4), threading.Event()))
    assert backend.engine.prefilled_tokens - prefilled0 == len(prompt)  # one prefill, its KV cache forked 3 times
    assert sorted({d.index for d in deltas}) == [0, 1, 2, 3]
    assert sum(d.finish_reason is not None for d in deltas) == 4
    assert backend.batcher.steps - steps0 == 10  # four choices advanced together, not 40 steps one after another


# ============================================================================ the prompt cache


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class FakeSession:
    def __init__(self) -> None:
        self.position = 0

    def truncate(self, n: int) -> None:
        assert n <= self.position
        self.position = n


def test_prompt_cache_takes_the_longest_shared_prefix() -> None:
    rng = random.Random(0)
    for _ in range(200):
        cache = PromptCache(size=3)
        held = [[rng.randrange(4) for _ in range(rng.randrange(1, 12))] for _ in range(rng.randrange(1, 6))]
        sessions = []
        for h in held:
            s = FakeSession()
            s.position = len(h)
            cache.give(s, h)
            sessions.append(s)
        kept_held = held[-3:]  # the oldest beyond `size` were dropped
        prompt = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        hit = cache.take(prompt)
        assert hit is not None
        session, kept = hit
        best = max(_lcp(h, prompt) for h in kept_held)
        assert kept == min(best, len(prompt) - 1)  # the last prompt token always runs (its logits start the reply)
        assert session.position == kept
        assert _lcp(held[sessions.index(session)], prompt) == best
    assert PromptCache(size=0).take([1, 2]) is None


@pytest.mark.parametrize("engine", ["rust", "torch"])
def test_a_cached_prefix_generates_what_a_fresh_prefill_does(tiny_model: Path, engine: str) -> None:
    cached = EngineBackend.from_path(tiny_model, threads=1, prompt_cache=4, engine=engine)
    fresh = EngineBackend.from_path(tiny_model, threads=1, prompt_cache=0, engine=engine)
    assert cached.mode == fresh.mode == f"engine:{engine}"
    tok = cached.tokenizer
    turns: list[dict[str, str]] = []
    previous: list[int] = []
    for i, (temperature, seed) in enumerate(((0.0, None), (0.8, 7), (0.8, 8), (0.0, None))):
        turns.append({"role": "user", "content": f"step {i}: write code"})
        prompt = tok.render_chat(turns)
        params = gp(max_tokens=16, temperature=temperature, seed=seed)
        hits, reused = cached.batcher.cache.hits, cached.batcher.cache.reused_tokens
        a = list(cached.stream(prompt, params, threading.Event()))
        b = list(fresh.stream(prompt, params, threading.Event()))
        assert [d.token_id for d in a] == [d.token_id for d in b]
        assert "".join(d.text for d in a) == "".join(d.text for d in b)
        if i > 0:  # the conversation so far (at least the previous prompt) came from the cache
            assert cached.batcher.cache.hits == hits + 1
            assert cached.batcher.cache.reused_tokens - reused >= len(previous)
        previous = prompt
        turns.append({"role": "assistant", "content": "".join(d.text for d in a)})
    assert cached.batcher.cache.reused_tokens > 0 and fresh.batcher.cache.hits == 0
