"""Test doubles for the HTTP layer: a byte-level tokenizer and a deterministic, model-free backend.

They implement the serve backend protocol (:class:`nanochat.serve.backend.Backend`) without a model, so the HTTP
mechanics (streaming, cancellation, errors, queueing) are tested fast. They live in tests/, not in the package.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nanochat.serve.backend import (
    LOGPROB_FLOOR,
    Delta,
    SamplingParams,
    TokenLogprob,
    deltas_from_tokens,
    new_seed,
)


class FakeTokenizer:
    """Byte-level tokenizer with nanochat's special-token layout: ids 0-6 special, then the 256 bytes."""

    SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

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

    def _tokens(self, params: SamplingParams, cancel: threading.Event) -> Iterator[int]:
        text = self.reply
        if params.temperature > 0:
            words = text.split(" ")
            random.Random(params.seed if params.seed is not None else new_seed()).shuffle(words)
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

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event) -> Iterator[Delta]:
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
