"""Test doubles and helpers for the server's tests and benchmark; they live in tests/, not in the package.

- :class:`FakeTokenizer` / :class:`FakeBackend`: the serve backend protocol (:class:`nanochat.serve.backend.Backend`)
  without a model, so the HTTP mechanics (streaming, cancellation, errors, queueing) are tested fast.
- :class:`ReferenceBackend`: the slow twin of ``EngineBackend``: no KV cache, no batching, a full forward of the
  torch model per token, sampled by ``nanochat.engine.sampling`` and decoded by ``nanochat.engine.TextStream``.
- :func:`build_tiny_model`: a tiny *untrained* model written as GGUF, safetensors or a run directory in about a
  second. Random weights would emit special tokens (ending replies at once) and stray UTF-8 continuation bytes
  (U+FFFD) all the time, so the tied embedding rows of special tokens and of tokens that are not printable ASCII are
  zeroed (their logit is then 0) and the others scaled up: their logits spread far above 0, so such tokens have
  ~1e-5 of the probability per step. Replies are long, printable, code-flavoured noise that depends on the seed.
- :class:`ServerThread` / :class:`ServerProcess`: the app on loopback, in a thread or a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanochat.engine import TextStream
from nanochat.engine.sampling import make_generator, new_seed, sample
from nanochat.serve.backend import (
    LOGPROB_FLOOR,
    Delta,
    GenerationParams,
    LogitAdjuster,
    TokenLogprob,
    declares_chat_training,
    model_id_for,
    model_kind,
    token_logprob,
)
from nanochat.serve.schemas import ModelKind


class FakeTokenizer:
    """Byte-level tokenizer with nanochat's special-token layout: ids 0-6 special, then the 256 bytes."""

    SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    has_chat_tokens = True  # nanochat's chat tokens, rendered by nanochat's own template

    def __init__(self) -> None:
        self.special_ids = {t: i for i, t in enumerate(self.SPECIALS)}

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + 256

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def end_id(self) -> int:
        return self.special_ids["<|end|>"]

    def encode(self, text: str) -> list[int]:
        return [b + len(self.SPECIALS) for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if i >= len(self.SPECIALS):
                buf.append(i - len(self.SPECIALS))
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special:
                out.append(self.SPECIALS[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_raw_bytes(self, i: int) -> bytes:
        return b"" if i < len(self.SPECIALS) else bytes([i - len(self.SPECIALS)])

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        ids = [self.bos_id]
        for m in messages:
            ids += [self.special_ids[f"<|{m['role']}|>"], *self.encode(m["content"]), self.end_id]
        return ids + [self.special_ids["<|assistant|>"]]


@dataclass
class FakeBackend:
    """Deterministic model-free backend: replies ``reply`` byte by byte (one token per byte), then ``<|end|>``.

    With ``temperature > 0`` the reply's words are shuffled by ``random.Random(seed)``, so seeds matter. ``gate``,
    when given, is waited on after the first token (tests use it to hold a generation open); ``token_delay`` sleeps
    between tokens; ``fail_at`` raises ``RuntimeError`` before that token index (0: before the first). ``started``
    and ``cancelled`` count generations begun and ended by ``cancel``.
    """

    reply: str = "Hello! Here is some code:\n```python\nprint(1 < 2)\n```\nDone."
    model_id: str = "fake"
    kind: ModelKind = "base"  # like every model nanochat-train makes today; "chat" stands for a chat-trained one
    context_length: int = 256
    token_delay: float = 0.0
    gate: threading.Event | None = None
    fail_at: int | None = None
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    stop_token_ids: frozenset[int] = frozenset({1, 6})  # <|eos|>, <|end|>
    started: int = 0
    cancelled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _top(self, tok: int, k: int) -> Iterator[tuple[int, float]]:
        if k > 0:
            yield tok, 0.0
        others = (i for i in range(self.tokenizer.vocab_size) if i != tok)
        for _, i in zip(range(k - 1), others):
            yield i, LOGPROB_FLOOR

    def _tokens(self, params: GenerationParams, cancel: threading.Event) -> Iterator[int]:
        text = self.reply
        if params.sampling.temperature > 0:
            words = text.split(" ")
            random.Random(params.sampling.seed if params.sampling.seed is not None else new_seed()).shuffle(words)
            text = " ".join(words)
        for i, tok in enumerate([*self.tokenizer.encode(text), self.tokenizer.end_id]):
            if i == self.fail_at:
                raise RuntimeError(f"fake failure at token {i}")
            if i == 1 and self.gate is not None:
                while not self.gate.wait(0.01):
                    if cancel.is_set():
                        return
            if i > 0 and self.token_delay:
                time.sleep(self.token_delay)
            yield tok

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Delta]:
        with self._lock:
            self.started += 1
        tokens: Iterator[Any] = self._tokens(params, cancel)
        if params.logprobs is not None:  # certain of every token: logprob 0, the others impossible
            k = params.logprobs
            tokens = ((t, TokenLogprob(t, 0.0, tuple(self._top(t, k)))) for t in tokens)
        for d in deltas_from_tokens(tokens, self.tokenizer.decode, params, cancel):
            if d.finish_reason == "cancelled":
                with self._lock:
                    self.cancelled += 1
            yield d


# --------------------------------------------------------------------------- the slow twin of the engine backend


def deltas_from_tokens(
    tokens: Iterator[int] | Iterator[tuple[int, TokenLogprob | None]],
    decode: Callable[[list[int]], str],
    params: GenerationParams,
    cancel: threading.Event,
) -> Iterator[Delta]:
    """A lazy stream of sampled token ids (or ``(id, logprob)`` pairs) as one choice's :class:`Delta` s, following
    the backend contract; text through ``nanochat.engine.TextStream`` (UTF-8 held back, stop strings cut)."""
    text = TextStream(decode, params.stop)
    n = 0
    while True:
        if cancel.is_set():
            yield Delta("", None, "cancelled")
            return
        item = next(tokens, None) if n < params.max_tokens else None
        if cancel.is_set():
            yield Delta("", None, "cancelled")
            return
        tok, lp = item if isinstance(item, tuple) else (item, None)
        if tok is None:  # max_tokens, or the model's own limit (context full)
            rest = text.finish()
            yield Delta(rest, None, "stop" if text.stopped else "length")
            return
        n += 1
        if tok in params.stop_token_ids:  # not part of the text, nor counted (as in nanochat.engine)
            yield Delta(text.finish(), None, "stop")
            return
        piece = text.push(tok)
        if text.stopped:
            yield Delta(piece, tok, None, lp)
            yield Delta("", None, "stop")
            return
        yield Delta(piece, tok, None, lp)


class ReferenceBackend:
    """The KV-cache-free reference loop: a full forward of the torch model over the whole sequence per token, one
    request at a time. O(T^2), but the plainest statement of the semantics, which ``EngineBackend`` (KV cache,
    batching, prompt cache) must reproduce token for token. ``n`` choices run one after another."""

    def __init__(self, loaded: Any, device: str = "cpu") -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id_for(loaded.path)
        self.kind = model_kind(loaded.tokenizer, declares_chat_training(loaded))
        self.context_length = int(loaded.config.seq_len)
        self.stop_token_ids = frozenset(
            int(loaded.tokenizer.special_ids[n])
            for n in ("<|end|>", "<|eos|>", "<|bos|>", "<|user|>", "<|system|>", "<|assistant|>")
            if n in loaded.tokenizer.special_ids
        )
        self.device = device
        self.mode = "reference"
        self._model = loaded.torch_model(device)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def _tokens(self, prompt_ids: Sequence[int], params: GenerationParams, seed: int) -> Iterator[Any]:
        import torch

        s = params.sampling
        gen = make_generator(seed)
        adjust = LogitAdjuster(params, self.tokenizer.vocab_size) if params.adjusts_logits else None
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)  # (1, T)
        while ids.shape[1] < self.context_length:
            with torch.inference_mode():
                logits = self._model(ids)[0, -1].float().cpu().numpy()  # (V,) at the last position
            tok = sample(logits if adjust is None else adjust(logits), s.temperature, s.top_k, s.top_p, gen)
            if adjust is not None:
                adjust.saw(tok)
            yield tok, None if params.logprobs is None else token_logprob(logits, tok, params.logprobs)
            ids = torch.cat([ids, torch.tensor([[tok]], dtype=torch.long, device=self.device)], dim=1)

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Delta]:
        for i, seed in enumerate(params.seeds()):
            for d in deltas_from_tokens(self._tokens(prompt_ids, params, seed), self._decode, params, cancel):
                yield dataclasses.replace(d, index=i)


def gp(max_tokens: int, **kw: Any) -> GenerationParams:
    """``GenerationParams`` from flat keywords: ``temperature``, ``top_k``, ``top_p`` and ``seed`` go to its
    ``SamplingParams`` (``top_k=0`` and ``top_p=1.0`` mean off, as in the API)."""
    from nanochat.engine.sampling import SamplingParams

    s = {k: kw.pop(k) for k in ("temperature", "top_k", "top_p", "seed") if k in kw}
    if s.get("top_k") == 0:
        s["top_k"] = None
    if s.get("top_p") == 1.0:
        s["top_p"] = None
    return GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(**s), **kw)


# --------------------------------------------------------------------------- a tiny real model, servers on loopback


TINY_CORPUS = (
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.getcwd())\n",
    "while x < 10:\n    x += 1\n",
)
PRINTABLE = frozenset(range(32, 127)) | {9, 10}  # tab and newline


def build_tiny_model(
    out: str | os.PathLike[str],
    seq_len: int = 256,
    seed: int = 0,
    vocab_size: int = 400,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny random model to ``out``: a ``.gguf`` or ``.safetensors`` export, or else a run directory as
    ``nanochat-train`` leaves it (``checkpoints/step_000001/`` and ``tokenizer.json``, with ``state`` added to the
    checkpoint's ``state.json``); returns the path."""
    import torch

    from nanochat.data.tokenizer import SPECIAL_TOKENS, Tokenizer
    from nanochat.export import export_gguf, export_safetensors
    from nanochat.model import GPT, GPTConfig

    out = Path(out)
    tok = Tokenizer.train(list(TINY_CORPUS) * 30, vocab_size)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size,
        seq_len=seq_len,
        n_layer=2,
        n_embd=256,
        n_head=4,
        n_kv_head=4,
        mlp_hidden=512,
        residual="standard",
        qk_norm=False,
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # away from the identity init, so every layer matters
        model.wte.weight.mul_(2.0)  # logits of kept tokens spread well above 0
        for i in range(tok.vocab_size):
            text = tok.decode([i])
            if i < len(SPECIAL_TOKENS) or not text or any(ord(c) not in PRINTABLE for c in text):
                model.wte.weight[i] = 0.0
    model.eval()
    if out.suffix == ".safetensors":
        return export_safetensors(model, tok, out)
    if out.suffix == ".gguf":
        return export_gguf(model, tok, out)
    from nanochat.train.checkpoint import CheckpointManager

    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.json")
    CheckpointManager(out).save(1, model, [], {"model_config": cfg.to_dict(), **(state or {})})
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """An app under uvicorn in a daemon thread on 127.0.0.1 (context manager); ``.url`` is its base URL.

    It runs :func:`nanochat.serve.server.make_server` with the app's own settings (timeouts, shutdown grace), so
    leaving the context is the server's graceful shutdown."""

    def __init__(self, app: Any, port: int | None = None, startup_timeout: float = 30.0) -> None:
        from nanochat.serve.server import make_server
        from nanochat.serve.settings import Settings

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = getattr(getattr(app, "state", None), "settings", None) or Settings()
        settings = dataclasses.replace(settings, host="127.0.0.1", port=self.port)
        self.server = make_server(app, settings, log_level="warning")  # the CLI's server: timeouts, shutdown
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self._timeout = startup_timeout

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)


class ServerProcess:
    """``python -m nanochat.serve --model MODEL ARGS`` on 127.0.0.1 in a subprocess (context manager), ready when
    /health answers.

    Its stderr (the log) goes to ``log_path``; ``.url`` is the base URL.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None,
        args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 120.0,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model_args = [] if model is None else ["--model", str(model)]  # None: the server picks ./runs' newest
        self.cmd = [sys.executable, "-m", "nanochat.serve", *model_args, "--host", "127.0.0.1", "--port",
                    str(self.port), *args]  # fmt: skip
        self.cwd = cwd
        self.log_path = Path(log_path) if log_path else None
        self.env = {**os.environ, **(env or {})}
        self._timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __enter__(self) -> ServerProcess:
        import httpx

        self._log = open(self.log_path, "wb") if self.log_path else None  # the server's log, closed in __exit__
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + self._timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}: {' '.join(self.cmd)}; see {self.log_path}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"server did not answer /health within {self._timeout}s")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{"name{labels}": value}`` (labels as exposed, sorted by the client library)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def iter_sse(lines: Iterator[str]) -> Iterator[str]:
    """``data:`` payloads of an SSE line stream, ``[DONE]`` included."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()
