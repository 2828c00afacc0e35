"""Generation backends: the small protocol the HTTP server needs, its implementations, and shared text helpers.

The server only needs :class:`Backend`: a model id, a context length, a tokenizer with a chat template, the token
ids that end a reply, and ``stream(prompt_ids, params, cancel)``, a *blocking* iterator the server runs in a worker
thread. Its contract:

- one :class:`Delta` per generated token, with ``token_id`` set (``text`` may be empty while bytes of a UTF-8
  character, or a possible start of a stop string, are held back),
- then exactly one last :class:`Delta` with ``finish_reason`` set (it may carry the last token too): ``"stop"`` (a
  stop token, which is neither text nor counted, or a stop string, which is cut from the text), ``"length"``
  (``max_tokens`` generated, or the context is full) or ``"cancelled"`` (``cancel`` was set; checked before every
  token),
- so ``"".join(d.text)`` is the reply and the number of deltas with a ``token_id`` is the completion token count;
- with ``params.logprobs`` set, each delta with a ``token_id`` carries its :class:`TokenLogprob` (the model's
  log-probability of that token and of the ``logprobs`` most likely ones, from the raw logits: before temperature,
  top-k and top-p, as vLLM reports them by default).

Implementations:

- :class:`EngineBackend`: ``nanochat.engine`` (KV cache, Rust kernels) with continuous batching
  (:class:`Batcher`), or a KV-cache-free reference loop over ``LoadedModel.torch_model()``.
- The tests' ``FakeBackend`` (``tests/serve_fakes.py``) implements the same protocol without a model.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from nanochat.export.load import LoadedModel

log = logging.getLogger("nanochat.serve")

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # tokens to generate at most (finish_reason "length" when reached)
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence, which is not returned
    stop_token_ids: frozenset[int] = frozenset()  # token ids that end generation (not part of the text)
    seed: int | None = None  # same seed + same params + same prompt = same text
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely tokens'
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


class LogitAdjuster:
    """One request's penalties and logit bias (``nanochat.engine.sampling.penalize``), with its own token counts.

    Applied to the logits before sampling; the logprobs a request asks for stay those of the raw logits."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        import torch

        self.params = params
        self.counts = torch.zeros(vocab_size)  # (V,) times each token was generated
        self.bias: torch.Tensor | None = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for i, b in params.logit_bias:
                self.bias[i] = b

    def __call__(self, logits: Any) -> Any:
        from nanochat.engine.sampling import penalize

        p = self.params
        return penalize(logits, self.counts, p.presence_penalty, p.frequency_penalty, self.bias)

    def saw(self, token_id: int) -> None:
        self.counts[token_id] += 1


LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token of probability 0 (JSON has no -inf)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # natural log of the token's probability under the model (raw logits, temperature 1)
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their logprobs, most likely first


@dataclass(frozen=True)
class Delta:
    text: str
    token_id: int | None = None
    finish_reason: FinishReason | None = None
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs, for deltas with a token_id


def token_logprob(logits: Any, token_id: int, k: int) -> TokenLogprob:
    """The log-probability of ``token_id`` and the ``k`` most likely tokens under ``logits`` (V,), clamped to
    :data:`LOGPROB_FLOOR` (``-inf`` and NaN are not JSON)."""
    import torch

    lp = torch.log_softmax(logits.detach().reshape(-1).float().cpu(), dim=-1)
    lp = torch.nan_to_num(lp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp_min(LOGPROB_FLOOR)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(lp, min(k, lp.numel()))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(int(token_id), float(lp[int(token_id)]), top)


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte in a BPE vocab."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenTexts:
    """Each token's text and exact bytes, as logprobs report them (``bytes`` matter where a character spans
    tokens: such a token's text alone is U+FFFD). Cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._special = set(getattr(tokenizer, "special_ids", {}).values())
        self._byte_of = _gpt2_byte_decoder()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, i: int) -> tuple[str, list[int]]:
        if i in self._special:
            return "", []
        text = self._tok.decode([i], skip_special=True)
        symbol = self._tok.id_to_token(i) if hasattr(self._tok, "id_to_token") else None
        if symbol is not None and all(ch in self._byte_of for ch in symbol):
            raw = bytes(self._byte_of[ch] for ch in symbol)  # byte-level BPE: one symbol per byte
        elif hasattr(self._tok, "token_raw_bytes"):
            raw = self._tok.token_raw_bytes(i)
        else:
            raw = text.encode("utf-8")
        return text, list(raw)


class ChatTokenizer(Protocol):
    """What the server uses of :class:`nanochat.data.tokenizer.Tokenizer`."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str: ...

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...


class Backend(Protocol):
    @property
    def model_id(self) -> str: ...  # what /v1/models lists and requests may name

    @property
    def context_length(self) -> int: ...  # prompt + max_tokens must fit

    @property
    def tokenizer(self) -> ChatTokenizer: ...

    @property
    def stop_token_ids(self) -> frozenset[int]: ...  # ids that end a reply by default (end of message, a new turn)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event) -> Iterator[Delta]:
        """Generate after ``prompt_ids``; blocking, run in a worker thread (see the module docstring)."""
        ...


# --------------------------------------------------------------------------- text helpers


class IncrementalDecoder:
    """Token ids in, text out, never splitting a UTF-8 character.

    Byte-level BPE tokens are byte strings, so a character may span tokens: pending tokens are decoded together and
    held while the text ends in U+FFFD (an incomplete sequence), at most ``max_pending`` tokens (then a real invalid
    sequence is let through as U+FFFD). Special tokens decode to nothing.
    """

    def __init__(self, decode: Callable[[list[int]], str], max_pending: int = 8) -> None:
        self._decode = decode
        self._pending: list[int] = []
        self._max_pending = max_pending

    def push(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) < self._max_pending:
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self._decode(self._pending) if self._pending else ""
        self._pending.clear()
        return text


class StopMatcher:
    """Cuts generated text at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, stopped)``; after ``stopped`` the rest is discarded."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text


def deltas_from_tokens(
    tokens: Iterator[int] | Iterator[tuple[int, TokenLogprob | None]],
    decode: Callable[[list[int]], str],
    params: SamplingParams,
    cancel: threading.Event,
) -> Iterator[Delta]:
    """Turn a (lazy) stream of sampled token ids (or ``(id, logprob)`` pairs) into :class:`Delta` s following the
    backend contract."""
    dec = IncrementalDecoder(decode)
    stops = StopMatcher(params.stop)
    n = 0
    while True:
        if cancel.is_set():
            yield Delta("", None, "cancelled")
            return
        if n >= params.max_tokens:
            text, hit = stops.push(dec.flush())
            yield Delta(text if hit else text + stops.flush(), None, "stop" if hit else "length")
            return
        item = next(tokens, None)
        if cancel.is_set():
            yield Delta("", None, "cancelled")
            return
        tok, lp = item if isinstance(item, tuple) else (item, None)
        if tok is None:  # the model's own limit (context full)
            text, hit = stops.push(dec.flush())
            yield Delta(text if hit else text + stops.flush(), None, "stop" if hit else "length")
            return
        n += 1
        if tok in params.stop_token_ids:  # not part of the text, nor counted (as in nanochat.engine)
            text, hit = stops.push(dec.flush())
            yield Delta(text if hit else text + stops.flush(), None, "stop")
            return
        text, hit = stops.push(dec.push(tok))
        if hit:
            yield Delta(text, tok, None, lp)
            yield Delta("", None, "stop")
            return
        yield Delta(text, tok, None, lp)


def new_seed() -> int:
    return random.SystemRandom().randrange(1 << 62)


# --------------------------------------------------------------------------- real models


def model_id_for(path: Path) -> str:
    """A readable model id from a model path: the file stem, or the run directory's name."""
    path = Path(path)
    if path.is_file():
        return path.stem
    if path.name.startswith("step") and path.parent.name == "checkpoints":
        return path.parent.parent.name
    if path.name == "checkpoints":
        return path.parent.name
    return path.name


def _stop_ids_of(tokenizer: Any) -> frozenset[int]:
    """End of message, end of text, and the tokens that would start a new document or turn."""
    special = getattr(tokenizer, "special_ids", {})
    names = ("<|end|>", "<|eos|>", "<|bos|>", "<|user|>", "<|system|>", "<|assistant|>")
    return frozenset(int(special[n]) for n in names if n in special)


class EngineBackend:
    """A loaded nanochat model behind the :class:`Backend` protocol.

    ``mode``:
    - ``"engine:rust"`` / ``"engine:torch"``: ``nanochat.engine.Engine`` (KV cache; the Rust engine for ternary
      models on CPU) under a :class:`Batcher`: all running requests advance together, one batched decode step per
      token (continuous batching: requests join and leave between steps).
    - ``"reference"`` (``reference=True``, or when ``nanochat.engine`` cannot be used): a KV-cache-free loop on the
      torch model, a full forward over the sequence per token. O(T^2) and one request at a time per thread, but
      the plainest statement of the semantics: the slow twin the tests compare the engine with.
    Sampling is seeded per request on CPU either way, so a seed gives the same text alone or batched.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        model_id: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        reference: bool = False,
    ) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id or model_id_for(loaded.path)
        self.context_length = int(loaded.config.seq_len)
        self.stop_token_ids = _stop_ids_of(loaded.tokenizer)
        self.device = device
        self._batcher: Batcher | None = None
        self._model: Any = None
        engine = None if reference else _make_engine(loaded, device, threads)
        if engine is not None:
            self._batcher = Batcher(engine)
            self.mode = f"engine:{getattr(engine, 'backend_name', 'unknown')}"
        else:
            self._model = loaded.torch_model(device)
            self.mode = "reference"

    @classmethod
    def from_path(cls, path: str | Path, **kw: Any) -> EngineBackend:
        from nanochat.export.load import load

        return cls(load(path), **kw)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event) -> Iterator[Delta]:
        if self._batcher is not None:
            return self._batcher.submit(prompt_ids, params, cancel)
        return deltas_from_tokens(self._reference_tokens(prompt_ids, params), self._decode, params, cancel)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def _reference_tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[tuple[int, TokenLogprob | None]]:
        import torch

        from nanochat.engine.sampling import make_generator, sample

        gen = make_generator(params.seed)
        adjust = LogitAdjuster(params, self.tokenizer.vocab_size) if params.adjusts_logits else None
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)  # (1, T)
        while ids.shape[1] < self.context_length:
            with torch.inference_mode():
                logits = self._model(ids)[0, -1].float().cpu()  # (V,) at the last position
            tok = sample(logits if adjust is None else adjust(logits), params.temperature, params.top_k or None,
                         params.top_p, gen)  # fmt: skip
            if adjust is not None:
                adjust.saw(tok)
            yield tok, None if params.logprobs is None else token_logprob(logits, tok, params.logprobs)
            ids = torch.cat([ids, torch.tensor([[tok]], dtype=torch.long, device=self.device)], dim=1)


def _make_engine(loaded: LoadedModel, device: str, threads: int | None) -> Any | None:
    """``nanochat.engine.Engine`` for ``loaded``, or ``None`` (logged) when it cannot be used."""
    try:
        from nanochat.engine import Engine
    except ImportError as e:
        log.warning("nanochat.engine is not available (%s): using the reference loop (slow)", e)
        return None
    try:
        return Engine(loaded, device=device, threads=threads)
    except Exception as e:
        log.warning("nanochat.engine could not load the model (%s): using the reference loop (slow)", e)
        return None


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    cancel: threading.Event
    out: queue.SimpleQueue[Delta | BaseException]
    adjust: LogitAdjuster | None = None


def _unsampleable(seq: Any) -> RuntimeError | None:
    """Why ``seq``'s next token cannot be sampled (its logits hold no finite value), or ``None``.

    Sampling is total for every accepted parameter value (``nanochat.engine.sampling``); a logits row with no finite
    value is the one input it refuses. Checked before the batched step, so that sequence fails alone."""
    import torch

    logits = getattr(seq, "logits", None)
    if logits is None or getattr(seq, "finish_reason", None) is not None or bool(torch.isfinite(logits).any()):
        return None
    return RuntimeError("the model produced no finite logit for the next token (NaN or -inf only)")


class Batcher:
    """Continuous batching over ``nanochat.engine.Engine``: one scheduler thread owns every live sequence.

    Each loop: admit new requests (``Engine.start``: a prefill each, with the request's own sampling parameters,
    stop strings and stop tokens), drop cancelled ones, then ``Engine.step`` advances all the others by one token in
    one batched forward, and each request's delta goes to its own queue. A request's ``stream`` iterator (run in a
    server worker thread) just reads that queue. The engine's per-sequence generators make a batched sequence sample
    exactly what it would alone.

    Isolation: what one request brings ends that request alone. Its prompt and parameters are checked by
    ``Engine.start`` (a failure there goes to its queue only); sampling is numerically safe for every accepted value
    (a temperature of 1e-40 is greedy, a top_p of 1e-46 keeps the top token); a sequence whose logits hold no finite
    value is failed before the step that would raise for everyone. Only an engine-wide failure (the batched forward
    itself) fails every request of that batch.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps = 0  # batched decode steps so far
        self.max_batch = 0  # largest batch seen (tests and curiosity)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event) -> Iterator[Delta]:
        req = _Request(list(prompt_ids), params, cancel, queue.SimpleQueue())
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nanochat-batcher", daemon=True)
                self._thread.start()
        self._inbox.put(req)
        return self._deltas(req)

    @staticmethod
    def _deltas(req: _Request) -> Iterator[Delta]:
        while True:
            item = req.out.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def _admit(self, req: _Request, live: list[tuple[Any, _Request]]) -> None:
        if req.cancel.is_set():
            req.out.put(Delta("", None, "cancelled"))
            return
        p = req.params
        try:
            (seq,) = self.engine.start(
                [req.prompt_ids],
                max_new_tokens=p.max_tokens,
                temperature=p.temperature,
                top_k=p.top_k or None,
                top_p=p.top_p if p.top_p < 1.0 else None,
                seed=p.seed,
                stop=list(p.stop),
                stop_token_ids=p.stop_token_ids,
            )
        except Exception as e:  # e.g. ValueError for a prompt the engine refuses: that request fails alone
            req.out.put(e)
            return
        if p.adjusts_logits:
            req.adjust = LogitAdjuster(p, int(self.engine.backend.vocab_size))
        live.append((seq, req))

    def _loop(self) -> None:
        live: list[tuple[Any, _Request]] = []
        while True:
            try:
                if not live:
                    self._admit(self._inbox.get(), live)  # idle: block until there is work
                while True:
                    try:
                        self._admit(self._inbox.get_nowait(), live)
                    except queue.Empty:
                        break
                kept = []
                for seq, req in live:
                    if req.cancel.is_set():
                        req.out.put(Delta("", None, "cancelled"))
                    elif (err := _unsampleable(seq)) is not None:
                        log.error("generation failed: %s", err)
                        req.out.put(err)  # this sequence alone: the step below would raise for the whole batch
                    else:
                        kept.append((seq, req))
                live = kept
                if not live:
                    continue
                seqs = [seq for seq, _ in live]
                before = [len(seq.token_ids) for seq in seqs]
                logits = [seq.logits for seq in seqs]  # raw: the step replaces them; logprobs report these
                for seq, req in live:
                    if req.adjust is not None:  # penalties and bias change what is sampled, not what is reported
                        seq.logits = req.adjust(seq.logits)
                texts = self.engine.step(seqs)
                self.steps += 1
                self.max_batch = max(self.max_batch, len(seqs))
                kept = []
                for (seq, req), n0, text, row in zip(live, before, texts, logits):
                    tok = seq.token_ids[-1] if len(seq.token_ids) > n0 else None  # None: a stop token ended it
                    k = req.params.logprobs
                    lp = token_logprob(row, tok, k) if k is not None and tok is not None else None
                    if req.adjust is not None and tok is not None:
                        req.adjust.saw(tok)
                    req.out.put(Delta(text, tok, seq.finish_reason, lp))
                    if seq.finish_reason is None:
                        kept.append((seq, req))
                live = kept
            except Exception as e:  # an engine-wide failure (the batched forward) fails the batch, not the server
                log.error("batched generation failed", exc_info=True)
                for _, req in live:
                    req.out.put(e)
                live = []
