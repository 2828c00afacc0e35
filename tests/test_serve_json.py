"""``response_format: {"type": "json_object"}`` and ``usage.prompt_tokens_details.cached_tokens`` over HTTP, on a tiny
random model (whose unconstrained output is code-flavoured noise, never JSON).

- every reply parses with ``json.loads`` into an object: many seeds, greedy and sampled, n > 1, streamed and not,
  short and long ``max_tokens`` (a value still open when the budget runs out is closed in time), chat and
  completions;
- a batch of JSON and plain requests: the plain ones sample exactly what they sample alone;
- ``json_schema`` (the supported subset): every reply conforms, checked by a plain-Python checker;
- an unsupported schema, ``stop`` with JSON mode, and a budget too small for ``{}`` are clear 400s;
- ``cached_tokens`` is the prompt prefix the prompt cache served (0 on a first request, the shared prefix on a
  continued chat), in chat, completions and the streamed usage chunk.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_fakes import ServerThread, build_tiny_model, iter_sse

from nanochat.serve import EngineBackend, Settings, create_app

CTX = 256
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
JSON = {"type": "json_object"}
MSG = [{"role": "user", "content": "Give me a JSON object."}]


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory: pytest.TempPathFactory) -> EngineBackend:
    path: Path = build_tiny_model(tmp_path_factory.mktemp("json") / "tiny.gguf", seq_len=CTX)
    return EngineBackend.from_path(path, threads=1)


@pytest.fixture(scope="module")
def server(tiny_backend: EngineBackend) -> Any:
    with ServerThread(create_app(tiny_backend, Settings(log_requests=False, max_concurrent=4))) as srv:
        yield srv


def an_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    assert isinstance(value, dict), text
    return value


def test_without_the_constraint_the_model_writes_no_json(server: ServerThread) -> None:
    """The premise: what the constraint fixes is really broken without it."""
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for seed in range(3):
            r = c.post(CHAT, json={"messages": MSG, "max_tokens": 24, "seed": seed}).json()
            with pytest.raises(ValueError):
                an_object(r["choices"][0]["message"]["content"])


def test_every_reply_is_a_json_object(server: ServerThread) -> None:
    cases = []
    for seed in range(24):
        body: dict[str, Any] = {"messages": MSG, "response_format": JSON, "seed": seed,
                                "max_tokens": [2, 3, 7, 16, 40, 120][seed % 6]}  # fmt: skip
        if seed % 3 == 0:
            body["temperature"] = 0
        elif seed % 3 == 1:
            body.update(temperature=1.3, top_p=0.95)
        cases.append(body)
    with httpx.Client(base_url=server.url, timeout=300) as c, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: c.post(CHAT, json=b), cases))
    lengths = []
    for body, r in zip(cases, answers, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()
        an_object(out["choices"][0]["message"]["content"])
        assert out["usage"]["completion_tokens"] <= body["max_tokens"]
        lengths.append(out["usage"]["completion_tokens"])
    assert max(lengths) > 10  # not only "{}": the model's own choices went into the objects


def test_n_choices_and_streams_and_completions(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=300) as c:
        r = c.post(CHAT, json={"messages": MSG, "response_format": JSON, "n": 3, "max_tokens": 30, "seed": 5}).json()
        texts = [ch["message"]["content"] for ch in r["choices"]]
        for t in texts:
            an_object(t)
        assert len(set(texts)) > 1
        for seed in range(4):
            body = {"messages": MSG, "response_format": JSON, "max_tokens": 25, "seed": seed, "stream": True}
            with c.stream("POST", CHAT, json=body) as s:
                chunks = [json.loads(p) for p in iter_sse(s.iter_lines()) if p != "[DONE]"]
            text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
            an_object(text)
            whole = c.post(CHAT, json={**body, "stream": False}).json()["choices"][0]["message"]["content"]
            assert text == whole
        for seed in range(4):
            r = c.post(COMP, json={"prompt": "def f(x):", "response_format": JSON, "max_tokens": 20, "seed": seed})
            an_object(r.json()["choices"][0]["text"])


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "where": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def conforms(value: Any) -> bool:
    """The schema above, checked in plain Python (the independent reference)."""
    types = {"name": str, "age": int, "score": (int, float), "ok": bool}
    return (
        isinstance(value, dict)
        and set(value) <= {*types, "where"}
        and {"name", "age"} <= set(value)
        and all(
            isinstance(value[k], t) and (k == "ok" or not isinstance(value[k], bool))
            for k, t in types.items()
            if k in value
        )  # fmt: skip
        and (
            "where" not in value
            or (
                isinstance(value["where"], dict)
                and set(value["where"]) == {"city"}
                and isinstance(value["where"]["city"], str)
            )  # fmt: skip
        )
    )


def test_json_schema_replies_conform(server: ServerThread) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    with httpx.Client(base_url=server.url, timeout=300) as c:
        for seed in range(8):
            body = {"messages": MSG, "response_format": fmt, "seed": seed, "max_tokens": [90, 140][seed % 2],
                    "temperature": 0 if seed % 4 == 0 else 1.0}  # fmt: skip
            r = c.post(CHAT, json=body)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["message"]["content"]
            assert conforms(json.loads(text)), text
        r = c.post(COMP, json={"prompt": "x", "response_format": fmt, "max_tokens": 90, "seed": 1}).json()
        assert conforms(json.loads(r["choices"][0]["text"]))


def test_plain_requests_in_the_same_batch_are_unaffected(server: ServerThread) -> None:
    plain = {"messages": MSG, "max_tokens": 20, "seed": 11, "temperature": 0.9}
    with httpx.Client(base_url=server.url, timeout=300) as c, ThreadPoolExecutor(4) as pool:
        alone = c.post(CHAT, json=plain).json()["choices"][0]["message"]["content"]
        mixed = [plain, {**plain, "response_format": JSON}, plain, {**plain, "response_format": JSON, "seed": 3}]
        answers = [r.json()["choices"][0]["message"]["content"] for r in pool.map(lambda b: c.post(CHAT, json=b),
                                                                                    mixed)]  # fmt: skip
    assert answers[0] == answers[2] == alone
    an_object(answers[1])
    an_object(answers[3])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}},
                    },
                }
            },
            "response_format",
        ),  # fmt: skip
        ({"response_format": {"type": "json_schema", "schema": {"type": "object"}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": JSON, "stop": "}"}, "stop"),
    ],
)
def test_what_cannot_be_honoured_is_a_400(server: ServerThread, extra: dict[str, Any], param: str) -> None:
    r = httpx.post(server.url + CHAT, json={"messages": MSG, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_budget_too_small_for_an_object_is_a_400(server: ServerThread, tiny_backend: EngineBackend) -> None:
    if len(tiny_backend.tokenizer.encode("{}")) < 2:
        pytest.skip("this tokenizer writes {} as one token")
    r = httpx.post(server.url + CHAT, json={"messages": MSG, "response_format": JSON, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400, r.text
    assert "max_tokens" in r.json()["error"]["message"]


def test_cached_tokens_report_the_reused_prompt_prefix(tiny_backend: EngineBackend) -> None:
    """Usage says how much of the prompt the prompt cache served: a fresh server has nothing cached; a chat that
    continues reuses (all but the last token of) the previous turn's prompt, which the engine's own counter
    confirms."""
    cache = tiny_backend.batcher.cache
    with ServerThread(create_app(tiny_backend, Settings(log_requests=False, max_concurrent=1))) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            first_msgs = [{"role": "user", "content": "A question about a list, never asked before: q-7731"}]
            r1 = c.post(CHAT, json={"messages": first_msgs, "max_tokens": 6, "temperature": 0}).json()
            reused0 = cache.reused_tokens
            assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] <= r1["usage"]["prompt_tokens"]
            msgs = [*first_msgs, {"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "and again"}]  # fmt: skip
            r2 = c.post(CHAT, json={"messages": msgs, "max_tokens": 6, "temperature": 0}).json()
            cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == cache.reused_tokens - reused0
            assert cached >= r1["usage"]["prompt_tokens"] - 1  # the whole first prompt (at least)
            assert cached < r2["usage"]["prompt_tokens"]
            body = {"messages": msgs, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
            with c.stream("POST", CHAT, json=body) as s:
                last = [json.loads(p) for p in iter_sse(s.iter_lines()) if p != "[DONE]"][-1]
            assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == r2["usage"]["prompt_tokens"] - 1
            p = "def fib(n):\n    return n"
            a = c.post(COMP, json={"prompt": p, "max_tokens": 3, "temperature": 0}).json()["usage"]
            b = c.post(COMP, json={"prompt": p + " + 1", "max_tokens": 3, "temperature": 0}).json()["usage"]
            assert b["prompt_tokens_details"]["cached_tokens"] >= a["prompt_tokens"] - 1 > 0


def test_cached_tokens_are_zero_without_a_prompt_cache(tmp_path: Path) -> None:
    backend = EngineBackend.from_path(build_tiny_model(tmp_path / "t.gguf", seq_len=CTX), threads=1, prompt_cache=0)
    with ServerThread(create_app(backend, Settings(log_requests=False))) as srv:
        for _ in range(2):
            r = httpx.post(srv.url + CHAT, json={"messages": MSG, "max_tokens": 3, "temperature": 0}, timeout=60)
            assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_repeated_infill_reports_tokens_cached(tiny_backend: EngineBackend) -> None:
    """llama-server's ``tokens_cached``: a second infill in the same file reuses the first one's prompt."""
    if tiny_backend.tokenizer.fim_ids() is None:
        pytest.skip("no FIM tokens")
    body = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n\nprint(add(1, 2))\n", "n_predict": 4,
            "temperature": 0}  # fmt: skip
    with ServerThread(create_app(tiny_backend, Settings(log_requests=False, max_concurrent=1))) as srv:
        first = httpx.post(srv.url + "/infill", json=body, timeout=60).json()
        again = httpx.post(srv.url + "/infill", json={**body, "input_prefix": body["input_prefix"] + "return"},
                           timeout=60).json()  # fmt: skip
    assert again["tokens_cached"] > 0
    assert again["tokens_cached"] < again["tokens_evaluated"]
    assert first["tokens_cached"] < first["tokens_evaluated"]
