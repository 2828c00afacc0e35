"""Generation backends: the small protocol the HTTP server needs, and its implementation over ``nanochat.engine``.

The server only needs :class:`Backend`: a model id, its kind (base or chat, :func:`model_kind`), a context length, a
tokenizer with a chat template, the token ids that end a reply, and ``stream(prompt_ids, params, cancel)``, a
*blocking* iterator the server runs in a worker thread. Its contract, per choice (``params.n`` choices, told apart
by ``Delta.index``, interleaved in any order):

- one :class:`Delta` per generated token, with ``token_id`` set (``text`` may be empty while bytes of a UTF-8
  character, or a possible start of a stop string, are held back),
- then exactly one last :class:`Delta` with ``finish_reason`` set (it may carry the last token too): ``"stop"`` (a
  stop token, which is neither text nor counted, or a stop string, which is cut from the text), ``"length"``
  (``max_tokens`` generated, or the context is full) or ``"cancelled"`` (``cancel`` was set; checked before every
  token); the iterator ends after the last choice's last delta,
- so ``"".join(d.text)`` of a choice is its reply, and its deltas with a ``token_id`` count its tokens;
- with ``params.logprobs`` set, each delta with a ``token_id`` carries its :class:`TokenLogprob` (the model's
  log-probability of that token and of the ``logprobs`` most likely ones, from the raw logits: before penalties,
  temperature, top-k and top-p, as vLLM reports them by default).

The server is a thin adapter: sampling (:mod:`nanochat.engine.sampling`: one :class:`SamplingParams`, one sampler,
the penalties), incremental UTF-8 decoding and stop strings (``nanochat.engine.TextStream``) all live in
``nanochat.engine``. What is the server's own: :class:`GenerationParams` (a request's sampling plus ``max_tokens``,
stops, logprobs, penalties and ``n``), continuous batching (:class:`Batcher`), the prompt cache
(:class:`PromptCache`) and the logprob/text views of tokens. The tests' ``FakeBackend`` and their KV-cache-free
reference loop (``tests/serve_fakes.py``) implement the same protocol.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from nanochat.engine.constrain import JsonChooser, TokenTable
from nanochat.engine.sampling import SamplingParams, as_logits, new_seed, penalize
from nanochat.serve.schemas import ModelKind

if TYPE_CHECKING:
    from nanochat.export.load import LoadedModel

log = logging.getLogger("nanochat.serve")

FinishReason = Literal["stop", "length", "cancelled"]
CHAT_TRAINED_KEY = "nanochat.chat_trained"  # GGUF bool (state.json: "chat_trained"): the weights saw chat training


@dataclass(frozen=True)
class GenerationParams:
    """One request's generation: the engine's :class:`SamplingParams` plus what the server adds around it."""

    max_tokens: int  # tokens to generate at most per choice (finish_reason "length" when reached)
    sampling: SamplingParams = SamplingParams()  # temperature, top-k, top-p, seed (nanochat.engine.sampling)
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence, which is not returned
    stop_token_ids: frozenset[int] = frozenset()  # token ids that end generation (not part of the text)
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely tokens'
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    n: int = 1  # choices, sampled with seeds seed, seed + 1, ... (so choice 0 is the n = 1 reply)
    json_object: bool = False  # constrained decoding: each choice is one JSON object (nanochat.engine.constrain)
    json_schema: tuple[bytes | str, ...] | None = None  # and of this compiled schema (constrain.compile_schema)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def seeds(self) -> list[int]:
        """One seed per choice: ``seed + i`` (wrapping in 64 bits), or fresh random ones."""
        s = self.sampling.seed
        if s is None:
            return [new_seed() for _ in range(self.n)]
        return [((s + i + (1 << 63)) % (1 << 64)) - (1 << 63) for i in range(self.n)]


class LogitAdjuster:
    """One choice's penalties and logit bias (``nanochat.engine.sampling.penalize``), with its own token counts.

    Applied to the logits before sampling; the logprobs a request asks for stay those of the raw logits."""

    def __init__(self, params: GenerationParams, vocab_size: int) -> None:
        self.params = params
        self.counts = np.zeros(vocab_size, dtype=np.float32)  # (V,) times each token was generated
        self.bias: np.ndarray | None = None
        if params.logit_bias:
            self.bias = np.zeros(vocab_size, dtype=np.float32)
            for i, b in params.logit_bias:
                self.bias[i] = b

    def __call__(self, logits: np.ndarray) -> np.ndarray:
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
    logprob: TokenLogprob | None = None  # with GenerationParams.logprobs, for deltas with a token_id
    index: int = 0  # which of the request's ``n`` choices
    cached_tokens: int = 0  # prompt tokens served from the prompt cache (on a choice's first delta)


def token_logprob(logits: Any, token_id: int, k: int) -> TokenLogprob:
    """The log-probability of ``token_id`` and the ``k`` most likely tokens under ``logits`` (V,), clamped to
    :data:`LOGPROB_FLOOR` (``-inf`` and NaN are not JSON). Computed in float64 and reported as float32 values
    (what the model's logits hold)."""
    x = as_logits(logits).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(x)
        lp = x - m - np.log(np.sum(np.exp(x - m)))  # log_softmax; NaN where the row has NaN or no finite value
    lp = np.maximum(np.nan_to_num(lp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR), LOGPROB_FLOOR).astype(np.float32)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        k = min(k, lp.size)
        ids = np.sort(np.argpartition(-lp, k - 1)[:k])
        ids = ids[np.argsort(-lp[ids], kind="stable")]  # most likely first, ties by token id
        top = tuple((int(i), float(lp[i])) for i in ids)
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
    def kind(self) -> ModelKind: ...  # "base" or "chat" (:func:`model_kind`): the chat page opens in its mode

    @property
    def context_length(self) -> int: ...  # prompt + max_tokens must fit

    @property
    def tokenizer(self) -> ChatTokenizer: ...

    @property
    def stop_token_ids(self) -> frozenset[int]: ...  # ids that end a reply by default (end of message, a new turn)

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Delta]:
        """Generate after ``prompt_ids``; blocking, run in a worker thread (see the module docstring)."""
        ...


# --------------------------------------------------------------------------- the engine


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


def model_kind(tokenizer: Any, chat_trained: bool = False) -> ModelKind:
    """``"chat"`` when the model was trained to answer chats, else ``"base"`` (it continues text).

    One rule, for every file the server loads:
    - a file that declares chat training (:func:`declares_chat_training`) is a chat model;
    - a tokenizer with nanochat's own chat tokens (``<|user|>``...) is otherwise a base model: those tokens are in
      every vocabulary ``nanochat-train`` makes, from the first step, and an export always writes the template that
      renders them, so neither says the weights ever saw a conversation (no chat stage is trained yet);
    - a third-party tokenizer is a chat model when the file ships ``tokenizer.chat_template``: converters copy it
      from the model's HF repository, where only instruction-tuned models have one (llama-server reads it the
      same way); without one, chat is refused anyway (``chat_unsupported``).
    """
    if chat_trained:
        return "chat"
    if getattr(tokenizer, "has_chat_tokens", False):
        return "base"
    return "chat" if getattr(tokenizer, "chat_template", None) else "base"


def declares_chat_training(loaded: LoadedModel) -> bool:
    """Whether the file says its weights saw chat training: the GGUF key :data:`CHAT_TRAINED_KEY`, or
    ``"chat_trained": true`` in a checkpoint's ``state.json``. A safetensors export declares nothing (``False``)."""
    if loaded.format == "gguf":
        from nanochat.export.gguf_file import GGUFFile  # the fast header reader (gguf.GGUFReader: ~1 s at 16k vocab)

        return GGUFFile(loaded.path).fields.get(CHAT_TRAINED_KEY) is True
    if loaded.format == "checkpoint":
        from nanochat.checkpoint_format import read_state

        return read_state(loaded.path).get("chat_trained") is True
    return False


def chat_template_of(tokenizer: Any) -> str | None:
    """The template ``/v1/chat/completions`` renders: the file's ``tokenizer.chat_template``, or nanochat's own
    format for a tokenizer with nanochat's chat tokens; ``None`` when there is none."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return str(template)
    if getattr(tokenizer, "has_chat_tokens", False):
        from nanochat.export.gguf_io import CHAT_TEMPLATE

        return CHAT_TEMPLATE
    return None


def _stop_ids_of(tokenizer: Any) -> frozenset[int]:
    """End of message, end of text, and the tokens that would start a new document or turn."""
    special = getattr(tokenizer, "special_ids", {})
    names = ("<|end|>", "<|eos|>", "<|bos|>", "<|user|>", "<|system|>", "<|assistant|>")
    eog: frozenset[int] = getattr(tokenizer, "eog_ids", frozenset())  # a base model's own EOS/EOT (e.g. <|endoftext|>)
    return frozenset({int(special[n]) for n in names if n in special} | {int(i) for i in eog})


class EngineBackend:
    """A loaded nanochat model behind the :class:`Backend` protocol: ``nanochat.engine.Engine`` (KV cache; the Rust
    engine for ternary models on CPU) under a :class:`Batcher`, which advances all running requests together, one
    batched decode step per token (continuous batching: requests join and leave between steps).

    A model the engine cannot run is an error here (the CLI prints it and exits), never a silent fallback to a slow
    path. ``prompt_cache``: idle KV sessions kept for reuse by prompts that share their prefix (0 = off);
    ``engine``: ``Engine``'s backend choice (``"auto"``: Rust for ternary models on CPU, else torch).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        model_id: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        prompt_cache: int = 4,
        engine: str = "auto",
    ) -> None:
        from nanochat.engine import Engine

        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id or model_id_for(loaded.path)
        self.context_length = int(loaded.config.seq_len)
        self.stop_token_ids = _stop_ids_of(loaded.tokenizer)
        self.device = device
        self.engine = Engine(loaded, device=device, threads=threads, backend=engine)
        self.batcher = Batcher(self.engine, PromptCache(prompt_cache))
        self.mode = f"engine:{self.engine.backend_name}"
        self.constrained_decoding = True  # response_format json_object (the Batcher's JsonChooser)
        self.kind: ModelKind = model_kind(loaded.tokenizer, declares_chat_training(loaded))

    @classmethod
    def from_path(cls, path: str | Path, **kw: Any) -> EngineBackend:
        from nanochat.export.load import load

        return cls(load(path), **kw)

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Delta]:
        return self.batcher.submit(prompt_ids, params, cancel)


class PromptCache:
    """Idle KV sessions and the tokens each holds, for llama-server's ``cache_prompt``: a chat that continues, or
    repeated infill calls in one file, reuse the longest common token prefix instead of a fresh prefill.

    At most ``size`` sessions are kept (the least recently used one goes first). :meth:`take` hands out the session
    sharing the longest prefix with a prompt, rewound to that prefix, but always leaves the prompt's last token to
    run: its logits are the first token's distribution. Owned by the batcher's thread (no locking)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[tuple[Any, list[int]]] = []  # (session, tokens it holds), least recently used first
        self.hits = 0  # prompts that reused a cached prefix
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to the cache

    def take(self, prompt: Sequence[int]) -> tuple[Any, int] | None:
        """``(session, kept)``: a session holding ``prompt[:kept]``; ``None`` when nothing is cached."""
        if not self._idle:
            return None
        best, best_n = 0, -1
        for i, (_, held) in enumerate(self._idle):
            n = _common_prefix(held, prompt)
            if n > best_n:
                best, best_n = i, n
        session, _ = self._idle.pop(best)
        kept = min(best_n, len(prompt) - 1)
        session.truncate(kept)
        if kept > 0:
            self.hits += 1
            self.reused_tokens += kept
        return session, kept

    def give(self, session: Any, tokens: list[int]) -> None:
        """Keep ``session`` (holding ``tokens``) for later prompts."""
        if self.size <= 0:
            return
        self._idle.append((session, tokens))
        del self._idle[: max(0, len(self._idle) - self.size)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Request:
    prompt_ids: list[int]
    params: GenerationParams
    cancel: threading.Event
    out: queue.SimpleQueue[Delta | BaseException]
    live: int = 0  # choices still generating
    failed: bool = False


@dataclass
class _Choice:
    seq: Any  # nanochat.engine.LiveSequence
    req: _Request
    index: int
    adjust: LogitAdjuster | None = None
    cacheable: bool = field(default=True)
    json: JsonChooser | None = None  # response_format json_object: this choice's constraint
    cached: int = 0  # prompt tokens reused from the prompt cache, reported once (on the first delta)


def _unsampleable(seq: Any) -> RuntimeError | None:
    """Why ``seq``'s next token cannot be sampled (its logits hold no finite value), or ``None``.

    Sampling is total for every accepted parameter value (``nanochat.engine.sampling``); a logits row with no finite
    value is the one input it refuses. Checked before the batched step, so that sequence fails alone."""
    logits = getattr(seq, "logits", None)
    if logits is None or getattr(seq, "finish_reason", None) is not None or bool(np.isfinite(logits).any()):
        return None
    return RuntimeError("the model produced no finite logit for the next token (NaN or -inf only)")


class Batcher:
    """Continuous batching over ``nanochat.engine.Engine``: one scheduler thread owns every live sequence.

    Each loop: admit new requests (a prefill each, with the request's own sampling parameters, stop strings and stop
    tokens; the ``n`` choices of a request are prefilled in one batched forward, and a single choice starts from the
    :class:`PromptCache`'s longest shared prefix), drop cancelled ones, then ``Engine.step`` advances all the others
    by one token in one batched forward, and each choice's delta goes to its request's queue. A request's ``stream``
    iterator (run in a server worker thread) just reads that queue. The engine's per-sequence generators make a
    batched sequence sample exactly what it would alone.

    Isolation: what one request brings ends that request alone. Its prompt and parameters are checked when it is
    started (a failure there goes to its queue only); sampling is numerically safe for every accepted value (a
    temperature of 1e-40 is greedy, a top_p of 1e-46 keeps the top token); a sequence whose logits hold no finite
    value is failed before the step that would raise for everyone. Only an engine-wide failure (the batched forward
    itself) fails every request of that batch.

    JSON (``params.json_object``): before each step a choice's :class:`~nanochat.engine.constrain.JsonChooser` picks
    its token from the (penalized) logits in the request's sampling order, and the logits become ``-inf`` except that
    token, so the engine's own sampler draws exactly it (no hook in the engine); the choice ends (``"stop"``) when
    the object is complete. A value that cannot be completed within ``max_tokens`` fails that request alone (400).
    """

    def __init__(self, engine: Any, cache: PromptCache | None = None) -> None:
        self.engine = engine
        self.cache = cache if cache is not None else PromptCache(0)
        self._inbox: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._json_table: TokenTable | None = None  # the vocabulary's bytes, for json_object requests
        self.steps = 0  # batched decode steps so far
        self.max_batch = 0  # largest batch seen (tests and curiosity)

    def submit(self, prompt_ids: Sequence[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Delta]:
        req = _Request(list(prompt_ids), params, cancel, queue.SimpleQueue(), live=params.n)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nanochat-batcher", daemon=True)
                self._thread.start()
        self._inbox.put(req)
        return self._deltas(req)

    @staticmethod
    def _deltas(req: _Request) -> Iterator[Delta]:
        left = req.params.n
        while left:
            item = req.out.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                left -= 1

    def _start(self, req: _Request) -> tuple[list[Any], int]:
        """The request's live sequences, prefilled: one batched forward for its ``n`` choices, or the prompt cache's
        best session for a single one; also how many prompt tokens came from the cache."""
        from nanochat.engine import LiveSequence, TextStream, decode_fn
        from nanochat.engine.sampling import make_generator

        p, eng = req.params, self.engine
        s = p.sampling
        seeds = p.seeds()
        if p.n > 1 or self.cache.size <= 0:
            seqs = list(
                eng.start(
                    [req.prompt_ids] * p.n,
                    max_new_tokens=p.max_tokens,
                    temperature=s.temperature,
                    top_k=s.top_k or None,
                    top_p=s.top_p if s.top_p is not None and s.top_p < 1.0 else None,
                    seed=seeds,
                    stop=list(p.stop),
                    stop_token_ids=p.stop_token_ids,
                )
            )
            return seqs, 0
        ids = req.prompt_ids
        if not ids or len(ids) >= eng.max_seq:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {eng.max_seq}")
        V = eng.backend.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab_size {V}")
        hit = self.cache.take(ids)
        session, kept = hit if hit is not None else (eng.backend.new_session(eng.max_seq), 0)
        seq = LiveSequence(
            session=session,
            params=SamplingParams(s.temperature, s.top_k, s.top_p, seeds[0]),
            generator=make_generator(seeds[0]),
            stream=TextStream(decode_fn(eng.tokenizer), p.stop),
            max_new_tokens=p.max_tokens,
            stop_ids=frozenset(p.stop_token_ids),
            prompt_tokens=len(ids),
        )
        try:
            seq.logits = eng.backend.prefill_batch([session], [ids[kept:]])[0]
        except Exception:
            session.truncate(0)
            raise
        if p.max_tokens == 0:
            seq.finish_reason = "length"
        return [seq], kept

    def _admit(self, req: _Request, live: list[_Choice]) -> None:
        if req.cancel.is_set():
            for i in range(req.params.n):
                req.out.put(Delta("", None, "cancelled", index=i))
            return
        try:
            seqs, cached = self._start(req)
            schema = req.params.json_schema
            jsons = [self._json_chooser(schema) for _ in seqs] if req.params.json_object else [None] * len(seqs)
        except Exception as e:  # e.g. ValueError for a prompt the engine refuses: that request fails alone
            req.out.put(e)
            return
        vocab = int(self.engine.backend.vocab_size)
        for i, seq in enumerate(seqs):
            adjust = LogitAdjuster(req.params, vocab) if req.params.adjusts_logits else None
            live.append(_Choice(seq, req, i, adjust, json=jsons[i], cached=cached if i == 0 else 0))

    def _json_chooser(self, schema: tuple[bytes | str, ...] | None = None) -> JsonChooser:
        """A fresh JSON constraint; the vocabulary's byte table is built on first use (once per model)."""
        tok = self.engine.tokenizer
        if self._json_table is None:
            texts, known = TokenTexts(tok), int(tok.vocab_size)
            self._json_table = TokenTable(
                int(self.engine.backend.vocab_size), lambda i: bytes(texts(i)[1]) if i < known else b""
            )
        return JsonChooser(self._json_table, tok.encode, schema=schema)

    def _choose_json(self, c: _Choice) -> bool:
        """Pick a constrained choice's next token and make it the only one its logits allow (so the engine's own
        sampler draws exactly it); ``False`` (and the request failed) if the JSON value cannot be completed."""
        seq, n = c.seq, len(c.seq.token_ids)
        assert c.json is not None
        left = min(seq.max_new_tokens - n, int(self.engine.max_seq) - seq.prompt_tokens - n)
        p = seq.params
        try:
            tok = c.json.choose(seq.logits, p.temperature, p.top_k, p.top_p, seq.generator, left)
        except ValueError as e:
            c.cacheable = False
            self._fail(c.req, e)
            return False
        only = np.full(int(np.size(seq.logits)), -np.inf, dtype=np.float32)
        only[tok] = 0.0
        seq.logits = only
        return True

    def _retire(self, c: _Choice) -> None:
        """A finished choice's session goes to the prompt cache with the tokens its KV holds."""
        session = c.seq.session
        if not c.cacheable or self.cache.size <= 0:
            return
        held = [*c.req.prompt_ids, *c.seq.token_ids][: int(session.position)]
        self.cache.give(session, held)

    def _fail(self, req: _Request, err: BaseException) -> None:
        if not req.failed:
            req.failed = True
            req.out.put(err)

    def _loop(self) -> None:
        live: list[_Choice] = []
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
                for c in live:
                    if c.req.failed:
                        continue
                    if c.req.cancel.is_set():
                        c.req.out.put(Delta("", None, "cancelled", index=c.index))
                        self._retire(c)
                    elif (err := _unsampleable(c.seq)) is not None:
                        log.error("generation failed: %s", err)
                        c.cacheable = False
                        self._fail(c.req, err)  # this request alone: the step below would raise for the batch
                    else:
                        kept.append(c)
                live = kept
                if not live:
                    continue
                raw = [c.seq.logits for c in live]  # the step replaces them; logprobs report these
                for c in live:
                    if c.adjust is not None:  # penalties and bias change what is sampled, not what is reported
                        c.seq.logits = c.adjust(c.seq.logits)
                pairs = [(c, row) for c, row in zip(live, raw, strict=True) if c.json is None or self._choose_json(c)]
                live, logits = [c for c, _ in pairs], [row for _, row in pairs]
                if not live:
                    continue
                seqs = [c.seq for c in live]
                before = [len(seq.token_ids) for seq in seqs]
                texts = self.engine.step(seqs)
                self.steps += 1
                self.max_batch = max(self.max_batch, len(seqs))
                kept = []
                for c, n0, text, row in zip(live, before, texts, logits, strict=True):
                    seq = c.seq
                    tok = seq.token_ids[-1] if len(seq.token_ids) > n0 else None  # None: a stop token ended it
                    k = c.req.params.logprobs
                    lp = token_logprob(row, tok, k) if k is not None and tok is not None else None
                    if c.adjust is not None and tok is not None:
                        c.adjust.saw(tok)
                    if c.json is not None and seq.finish_reason is None and c.json.complete:
                        text += seq.stream.finish()  # the object is closed: the reply ends here
                        seq.finish_reason = "stop"
                    c.req.out.put(Delta(text, tok, seq.finish_reason, lp, c.index, c.cached))
                    c.cached = 0
                    if seq.finish_reason is None:
                        kept.append(c)
                    else:
                        self._retire(c)
                live = kept
            except Exception as e:  # an engine-wide failure (the batched forward) fails the batch, not the server
                log.error("batched generation failed", exc_info=True)
                for c in live:
                    self._fail(c.req, e)
                live = []
