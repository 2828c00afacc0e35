"""Text generation: the :class:`Engine` facade, streaming with UTF-8-safe deltas and stop strings, and batches.

```python
from nanochat.engine import Engine

engine = Engine(model, tokenizer)                      # Rust on CPU for ternary models, torch otherwise
res = engine.generate("def fib(n):", max_new_tokens=64, temperature=0)
print(res.text, res.finish_reason)                     # "stop" | "length"
for delta in engine.stream("def fib(n):", max_new_tokens=64, stop=["\\n\\n"]):
    print(delta, end="", flush=True)
results = engine.generate_batch(["def a():", "class B:"], max_new_tokens=32, temperature=0)
```

Notable choices:
- **Backends.** ``backend="auto"`` runs the Rust engine (``nanochat.engine.RustEngine``: KV cache, ternary kernels,
  batched decode) for ternary models on CPU, and :class:`~nanochat.engine.torch_engine.TorchEngine` otherwise
  (CUDA, ``quant="fp"``). Both expose ``new_session / prefill / decode_batch``; sampling is shared and runs on CPU,
  in numpy (the torch backend converts its logits at the boundary), so the Rust path never imports torch.
  The Rust engine's own validation decides what it runs (e.g. it refuses ``head_dim > 512``): under ``"auto"`` a
  model it refuses runs on the torch engine (the model's own KV-cache forward, never an uncached O(T²) loop), with
  a warning that gives the Rust engine's reason, kept in :attr:`Engine.backend_note`; ``backend="rust"`` raises it.
- **Streaming text** (:class:`TextStream`). Byte-level BPE tokens are byte strings, so a character may span tokens
  and ``decode`` of a partial sequence ends in U+FFFD. Pending tokens are decoded together and held while their text
  ends in U+FFFD (at most :data:`MAX_PENDING` tokens, after which a genuinely invalid sequence is let through as
  U+FFFD). Only pending tokens are decoded each step — for byte-level BPE the text of a sequence is the
  concatenation of the texts of its cleanly-decoding pieces — so a step costs O(1), not O(length).
- **Stop strings** never leak: text that could be the start of a stop string is held back until it cannot be
  (or the generation ends), and a stop string found anywhere, even across token boundaries, ends the generation
  with the text before it. The concatenated deltas are always exactly ``GenerationResult.text``.
- **Stop tokens** (default: the tokenizer's ``eos_id``) end generation with ``finish_reason="stop"`` and are not
  part of the text or of ``token_ids``; special tokens are decoded to nothing.
- **Batches** (:meth:`Engine.generate_batch`, :meth:`Engine.step`) advance all live sequences with one batched
  forward per token. Each sequence has its own generator seeded with its seed, and the Rust engine's per-row
  arithmetic does not depend on the batch, so a batch gives exactly the one-at-a-time results.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from nanochat.engine.sampling import SamplingParams, make_generator, sample

if TYPE_CHECKING:
    import torch

    from nanochat.engine.torch_engine import TorchEngine

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
MAX_PENDING = 8  # tokens held at most while their text ends in an incomplete UTF-8 sequence


@dataclass
class GenerationResult:
    text: str  # the completion (stop string and stop token excluded)
    token_ids: list[int]  # generated ids (a stop token excluded)
    finish_reason: FinishReason  # "stop": stop token or stop string; "length": max_new_tokens or context full
    prompt_tokens: int = 0


# ----------------------------------------------------------------------------- text: UTF-8 and stop strings


def decode_fn(tokenizer: Any) -> Callable[[list[int]], str]:
    """``ids -> text`` skipping special tokens, for nanochat's ``Tokenizer`` or an HF ``tokenizers.Tokenizer``."""
    params = inspect.signature(tokenizer.decode).parameters
    if "skip_special" in params:
        return lambda ids: tokenizer.decode(ids, skip_special=True)
    if "skip_special_tokens" in params:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids)


class TextStream:
    """Token ids in, text deltas out: never a partial UTF-8 character, never any part of a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), skip: str = "") -> None:
        self._decode = decode
        self._stops = tuple(s for s in stop if s)
        self._skip = skip  # token healing: the prompt's own tail, which the first token re-spells (not shown again)
        self._pending: list[int] = []
        self._held = ""  # decoded text that may start a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _emit(self, new: str) -> str:
        if not self._stops:
            self.text += new
            return new
        buf = self._held + new
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            out = buf[: min(hits)]
            self._held = ""
            self.stopped = True
            self.text += out
            return out
        keep = 0  # longest suffix of buf that is a proper prefix of a stop string
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        out = buf[: len(buf) - keep]
        self._held = buf[len(buf) - keep :]
        self.text += out
        return out

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that became safe to show (possibly ``""``). Check :attr:`stopped`."""
        if self.stopped:
            return ""
        self._pending.append(int(token_id))
        piece = self._decode(self._pending)
        if piece.endswith("\ufffd") and len(self._pending) < MAX_PENDING:
            return ""
        self._pending.clear()
        if self._skip:
            piece = piece[len(self._skip) :] if piece.startswith(self._skip) else piece
            self._skip = ""
        return self._emit(piece)

    def finish(self) -> str:
        """No more tokens: flush held bytes (as U+FFFD if incomplete) and held stop-string prefixes."""
        if self.stopped:
            return ""
        out = ""
        if self._pending:
            out = self._emit(self._decode(self._pending))
            self._pending.clear()
        if not self.stopped and self._held:
            out += self._held
            self.text += self._held
            self._held = ""
        return out


# ----------------------------------------------------------------------------- backends


class _RustBackend:
    """``nanochat.engine.RustEngine``: its float32 numpy logits as they come (no torch on this path)."""

    kind = "rust"

    def __init__(self, eng: Any) -> None:
        self.eng = eng
        self.vocab_size = eng.vocab_size
        self.seq_len = int(eng.config["seq_len"])

    def new_session(self, max_seq: int) -> Any:
        return self.eng.new_session(max_seq)

    def prefill_batch(self, sessions: Sequence[Any], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        return self.eng.forward(sessions, prompts)  # (B, V) float32

    def fork(self, session: Any) -> Any:
        return session.fork()  # the KV cache copied in Rust

    def decode_batch(self, sessions: Sequence[Any], tokens: Sequence[int]) -> np.ndarray:
        return self.eng.decode_batch(sessions, tokens)  # (B, V) float32


class _TorchBackend:
    """:class:`TorchEngine`, its logits converted to float32 numpy at this boundary (the sampler is numpy)."""

    kind = "torch"

    def __init__(self, eng: TorchEngine) -> None:
        self.eng = eng
        self.vocab_size = eng.vocab_size
        self.seq_len = eng.config.seq_len

    def new_session(self, max_seq: int) -> Any:
        return self.eng.new_session(max_seq)

    def fork(self, session: Any) -> Any:
        return session.fork()  # KVCache.fork: the cache tensors cloned

    def prefill_batch(self, sessions: Sequence[Any], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        rows = [self.eng.prefill(s, p) for s, p in zip(sessions, prompts, strict=True)]
        return torch.stack(rows).float().cpu().numpy()  # (B, V)

    def decode_batch(self, sessions: Sequence[Any], tokens: Sequence[int]) -> np.ndarray:
        return self.eng.decode_batch(sessions, tokens).float().cpu().numpy()  # (B, V)


# ----------------------------------------------------------------------------- sequences


@dataclass
class LiveSequence:
    """A live generation: its session, sampler state, text stream and results so far."""

    session: Any
    params: SamplingParams
    generator: np.random.Generator
    stream: TextStream
    max_new_tokens: int
    stop_ids: frozenset[int]
    prompt_tokens: int
    logits: np.ndarray | None = None  # (V,) float32 for the next token
    allowed: list[int] | None = None  # token healing: the ids the first token may be (their text extends the tail)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        assert self.finish_reason is not None
        return GenerationResult(self.stream.text, list(self.token_ids), self.finish_reason, self.prompt_tokens)


class Generation:
    """A streaming generation: iterate for text deltas (never empty); afterwards :attr:`result` holds the
    :class:`GenerationResult`. ``close()`` stops early (e.g. when a client disconnects)."""

    def __init__(self, engine: Engine, seq: LiveSequence) -> None:
        self._engine, self._seq = engine, seq
        self.result: GenerationResult | None = seq.result() if seq.done else None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        seq = self._seq
        while not seq.done:
            delta = self._engine.step([seq])[0]
            if delta:
                return delta
        if self.result is None:
            self.result = seq.result()
        raise StopIteration

    def close(self) -> None:
        if not self._seq.done:
            self._seq.finish_reason = "stop"
            self._seq.stream.stopped = True
        self.result = self._seq.result()


# ----------------------------------------------------------------------------- the facade


def _device_type(device: Any) -> str:
    """``"cpu"``, ``"cuda"``...: a plain ``"cpu"`` is read without importing torch (the Rust engine's path);
    anything else is parsed by ``torch.device``, which also refuses a malformed name."""
    if isinstance(device, str) and device == "cpu":
        return "cpu"
    import torch

    return torch.device(device).type


def _default_threads() -> int:
    """The one thread budget: torch's when torch is already loaded (a torch model; ``torch.set_num_threads``
    counts), else 0, the Rust core's own default (``NANOCHAT_THREADS``, or every core), so no torch is imported."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


class Engine:
    """Generation with a KV cache over a ternary GPT (see the module docstring).

    ``model`` is a torch ``GPT`` or a ``nanochat.export.load.LoadedModel`` (whose packed weights feed the Rust engine
    directly, without materialising a torch model); ``tokenizer`` defaults to the loaded model's. ``backend``:
    ``"auto"`` | ``"rust"`` | ``"torch"``. ``threads`` sizes the Rust engine's thread team (default: torch's thread
    count, the one budget both share, when torch is loaded; else the Rust core's, ``NANOCHAT_THREADS`` or every
    core). ``head``: the Rust engine's LM-head precision (``"f16"`` default, ``"f32"`` exact, ``"int8"``); ``kv``:
    its KV cache type (``"f32"`` exact, ``"f16"``). ``max_seq``: context per sequence (default: the model's
    ``seq_len``). :attr:`backend_note` says why ``"auto"`` did not pick the Rust engine for a ternary CPU
    model (the engine's own error), else ``None``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        backend: str = "auto",
        device: str | torch.device | None = None,
        threads: int | None = None,
        head: str = "f16",
        kv: str = "f32",
        max_seq: int | None = None,
    ) -> None:
        if backend not in ("auto", "rust", "torch"):
            raise ValueError(f"backend must be 'auto', 'rust' or 'torch', got {backend!r}")
        loaded = model if hasattr(model, "packed_weights") and hasattr(model, "torch_model") else None
        config = loaded.config if loaded is not None else model.config
        self.tokenizer = tokenizer if tokenizer is not None else getattr(loaded, "tokenizer", None)
        if device is None:
            device = "cpu" if loaded is not None else next(model.parameters()).device
        device_type = _device_type(device)
        self.backend_note: str | None = None
        auto = backend == "auto"
        if auto:
            backend = "rust" if device_type == "cpu" and config.quant == "ternary" else "torch"
        self.backend: _RustBackend | _TorchBackend
        if threads is not None:
            from nanochat import ops

            # Checked here, before the backend choice: a bad thread count is the caller's error on either backend,
            # never a reason to fall back from Rust to torch (whose set_num_threads overflows on 2**31).
            if not 0 <= int(threads) <= ops.max_threads():
                raise ValueError(
                    f"threads = {threads} is out of range: 0 (automatic) to {ops.max_threads()} "
                    "(4 × the cores, at least 8)"
                )
        if backend == "rust":
            if device_type != "cpu":
                raise ValueError(f"the Rust engine runs on CPU, not {device}")
            from nanochat.engine.rust_engine import (
                HEAD_PRECISIONS,
                KV_PRECISIONS,
                build_rust_engine,
                rust_engine_from_weights,
            )

            # the caller's settings are checked before the build, so that only a model refusal can fall back below
            if head not in HEAD_PRECISIONS:
                raise ValueError(f"head must be one of {HEAD_PRECISIONS}, got {head!r}")
            if kv not in KV_PRECISIONS:
                raise ValueError(f"kv must be one of {KV_PRECISIONS}, got {kv!r}")
            n = int(threads) if threads else _default_threads()
            try:
                if loaded is not None:
                    ternary, dense = loaded.packed_weights()
                    eng = rust_engine_from_weights(config, ternary, dense, threads=n, head=head, kv=kv)
                    del ternary, dense
                    loaded.release_pages()  # the engine holds its own copy: the weights stay resident once
                else:
                    eng = build_rust_engine(model, threads=n, head=head, kv=kv)
            except ValueError as e:  # the engine's validation refused the model (config, shapes or weight types)
                if not auto:
                    raise
                self.backend_note = f"the Rust engine refuses this model ({e}): running it on the torch engine"
                log.warning("%s (KV-cache forward of the torch model, slower on CPU)", self.backend_note)
                backend = "torch"
            else:
                self.backend = _RustBackend(eng)
        if backend == "torch":
            import torch

            from nanochat.engine.torch_engine import TorchEngine

            if threads:
                torch.set_num_threads(int(threads))
            tm = loaded.torch_model(device) if loaded is not None else model.to(device)
            self.backend = _TorchBackend(TorchEngine(tm))
        self.config = config
        self.max_seq = int(max_seq or config.seq_len)
        self._decode = decode_fn(self.tokenizer) if self.tokenizer is not None else None
        self._vocab: tuple[list[str], list[int]] | None = None  # token healing's sorted vocabulary (built once)
        self.prefilled_tokens = 0  # prompt tokens actually prefilled (a prompt repeated in one start() counts once)

    @property
    def backend_name(self) -> str:
        return self.backend.kind

    @property
    def rust(self) -> Any:
        """The underlying ``RustEngine`` (None on the torch backend): sessions, profile, threads."""
        return self.backend.eng if isinstance(self.backend, _RustBackend) else None

    # ------------------------------------------------------------------ building blocks

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            # a text prompt starts with BOS when the model's file asks for it (GGUF tokenizer.ggml.add_bos_token)
            encode = getattr(self.tokenizer, "encode_prompt", self.tokenizer.encode)
            ids = list(encode(prompt))
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            bos = getattr(self.tokenizer, "bos_id", None)
            if bos is None:
                raise ValueError("empty prompt (and no tokenizer bos_id to start from)")
            ids = [int(bos)]
        if len(ids) >= self.max_seq:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.max_seq}")
        V = self.backend.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab_size {V}")
        return ids

    def _vocab_index(self) -> tuple[list[str], list[int]]:
        """Every token's text (special tokens and ids past the tokenizer's vocabulary left out), sorted, with ids:
        the tokens that extend a string are one contiguous range of it."""
        if self._vocab is None:
            assert self.tokenizer is not None
            n = min(int(self.backend.vocab_size), int(getattr(self.tokenizer, "vocab_size", self.backend.vocab_size)))
            special = set(getattr(self.tokenizer, "special_ids", {}).values())
            pairs = sorted((self.tokenizer.decode([i]), i) for i in range(n) if i not in special)
            self._vocab = ([t for t, _ in pairs], [i for _, i in pairs])
        return self._vocab

    def _heal(self, ids: list[int]) -> tuple[list[int], list[int] | None, str]:
        """Token healing (as in HF transformers and guidance): ``(ids to prefill, allowed first ids, tail)``.

        A prompt that ends mid-merge (trailing spaces, a newline before indentation, half an identifier) ends in a
        token the model rarely saw there: training text had ``"\n    return"`` as ``"\n   "`` + ``" return"``, a
        prompt ending in ``"\n    "`` has ``"\n    "``, and greedy decoding then writes newlines. So the prompt's
        last token is taken off and the first generated token must be one whose text starts with it (the removed
        token among them); the stream does not show that tail again. Not healed: a special or partial-UTF-8 last
        token, a one-token prompt, or a tail no other token extends.
        """
        if (
            self.tokenizer is None
            or len(ids) < 2
            or ids[-1] in set(getattr(self.tokenizer, "special_ids", {}).values())
        ):
            return ids, None, ""
        tail = self.tokenizer.decode([ids[-1]])
        if not tail or "\ufffd" in tail:
            return ids, None, ""
        texts, vids = self._vocab_index()
        lo = bisect.bisect_left(texts, tail)
        hi = bisect.bisect_left(texts, tail + "\U0010ffff", lo)
        allowed = vids[lo:hi]
        if len(allowed) <= 1:
            return ids, None, ""
        return ids[:-1], allowed, tail

    def _stop_ids(self, stop_token_ids: Iterable[int] | None) -> frozenset[int]:
        if stop_token_ids is not None:
            return frozenset(int(t) for t in stop_token_ids)
        eos = getattr(self.tokenizer, "eos_id", None)
        return frozenset() if eos is None else frozenset({int(eos)})

    def start(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int | None] | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Iterable[int] | None = None,
        heal: bool = True,
    ) -> list[LiveSequence]:
        """Prefill several prompts (one batched forward) and return their live sequences for :meth:`step`.

        ``seed``: one seed for every sequence (each gets its own generator, so each equals its one-at-a-time run)
        or one per prompt. ``heal``: token healing of text prompts (:meth:`_heal`); id prompts are used as given.
        """
        if self._decode is None:
            raise ValueError("generation needs a tokenizer")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = [self._ids(p) for p in prompts]
        heals = [
            self._heal(i) if heal and isinstance(p, str) else (i, None, "") for p, i in zip(prompts, ids, strict=True)
        ]
        ids = [h[0] for h in heals]
        seeds = list(seed) if isinstance(seed, Sequence) else [seed] * len(ids)
        if len(seeds) != len(ids):
            raise ValueError(f"{len(seeds)} seeds for {len(ids)} prompts")
        stop_ids = self._stop_ids(stop_token_ids)
        # the same prompt several times (n samples): prefilled once, its KV cache forked for the others
        first: dict[tuple[int, ...], int] = {}
        owner = [first.setdefault(tuple(p), i) for i, p in enumerate(ids)]
        seqs = []
        for i, ((p, allowed, tail), s) in enumerate(zip(heals, seeds, strict=True)):
            params = SamplingParams(temperature, top_k, top_p, s)
            seqs.append(
                LiveSequence(
                    session=self.backend.new_session(self.max_seq) if owner[i] == i else None,
                    params=params,
                    generator=make_generator(s),
                    stream=TextStream(self._decode, stop or (), skip=tail),
                    max_new_tokens=max_new_tokens,
                    stop_ids=stop_ids,
                    prompt_tokens=len(p),
                    allowed=allowed,
                )
            )
        if not seqs:
            return seqs
        unique = [i for i in range(len(seqs)) if owner[i] == i]
        logits = self.backend.prefill_batch([seqs[i].session for i in unique], [ids[i] for i in unique])  # (U, V)
        row_of = dict(zip(unique, logits, strict=True))
        for i, q in enumerate(seqs):
            if owner[i] != i:
                q.session = self.backend.fork(seqs[owner[i]].session)
            row = row_of[owner[i]]
            q.logits = row if owner[i] == i else row.copy()  # a fork gets its own row: samplers may write in place
            if q.max_new_tokens == 0:
                q.finish_reason = "length"
        self.prefilled_tokens += sum(len(ids[i]) for i in unique)
        return seqs

    def step(self, seqs: Sequence[LiveSequence]) -> list[str]:
        """Advance every live sequence by one token (one batched forward); returns each one's text delta
        (``""`` for finished sequences or held-back text)."""
        deltas = ["" for _ in seqs]
        live: list[tuple[int, LiveSequence, int]] = []
        for i, q in enumerate(seqs):
            if q.done:
                continue
            assert q.logits is not None
            p = q.params
            logits = q.logits
            if q.allowed is not None:  # token healing: the first token must re-spell the prompt's tail
                keep = np.asarray(q.allowed, dtype=np.intp)
                masked = np.full_like(logits, -np.inf)
                masked[keep] = logits[keep]
                logits = masked
                q.allowed = None
            tok = sample(logits, p.temperature, p.top_k, p.top_p, q.generator)
            if tok in q.stop_ids:
                deltas[i] = q.stream.finish()
                q.finish_reason = "stop"
                continue
            q.token_ids.append(tok)
            deltas[i] = q.stream.push(tok)
            if q.stream.stopped:
                q.finish_reason = "stop"
            elif len(q.token_ids) >= q.max_new_tokens or q.prompt_tokens + len(q.token_ids) >= self.max_seq:
                deltas[i] += q.stream.finish()
                q.finish_reason = "stop" if q.stream.stopped else "length"
            else:
                live.append((i, q, tok))
        if live:
            logits = self.backend.decode_batch([q.session for _, q, _ in live], [t for _, _, t in live])
            for (_, q, _), row in zip(live, logits, strict=True):
                q.logits = row
        return deltas

    # ------------------------------------------------------------------ user API

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, **kw: Any) -> Generation:
        """Streaming generation: iterate for text deltas; ``.result`` afterwards (see :class:`Generation`)."""
        return Generation(self, self.start([prompt], max_new_tokens=max_new_tokens, **kw)[0])

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Iterable[int] | None = None,
        heal: bool = True,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt`` (text or ids; text is token-healed unless ``heal`` is
        false, see :meth:`_heal`)."""
        return self.generate_batch(
            [prompt], max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids, heal=heal
        )[0]

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int | None] | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Iterable[int] | None = None,
        heal: bool = True,
    ) -> list[GenerationResult]:
        """Several prompts advanced together (batched decode); equal to one-at-a-time :meth:`generate` calls."""
        seqs = self.start(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            heal=heal,
        )
        while not all(q.done for q in seqs):
            self.step(seqs)
        return [q.result() for q in seqs]
