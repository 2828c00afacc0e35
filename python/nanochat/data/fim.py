"""Fill-in-the-middle (FIM): the training transform and the infilling prompt.

A FIM example moves a random middle span of a text to the end, so that a left-to-right model learns to write it
given both what comes before and what comes after (Bavarian et al. 2022, "Efficient Training of Language Models to
Fill in the Middle"; used by SantaCoder and StarCoder). With sentinels ``P``, ``S``, ``M`` = ``<|fim_prefix|>``,
``<|fim_suffix|>``, ``<|fim_middle|>`` and ``E`` = ``<|eos|>``::

    PSM:  P prefix S suffix M middle E
    SPM:  P S suffix M prefix middle E      (Bavarian et al.'s SPM variant, as StarCoder's Megatron code writes it)

Notable choices:
- **Character-level split** at two uniform random points of the text (``0 <= i <= j <= len``), so a span may start
  or end inside a token, as in StarCoder. The three parts are tokenized separately and joined with the sentinel ids
  (:func:`encode_plans`): that is how an editor's prefix and suffix are tokenized at inference. In SPM the prefix
  and middle stay two separately tokenized pieces for the same reason.
- **``<|eos|>`` ends every middle.** StarCoder applies FIM per document and the next document's separator follows
  the middle; we apply it per chunk (below), so an explicit end-of-middle marker is needed, and ``<|eos|>`` is one
  every runtime already stops on (llama.cpp's ``/infill`` stops at end-of-generation tokens, eos among them).
- **Per chunk, not per file.** Training windows are short (256-2048 tokens) and source files long; a FIM example
  only teaches infilling when its sentinels, prefix, suffix and middle fall inside one window. Each document is cut
  at line boundaries into chunks of at most ``chunk_chars`` characters (:func:`chunk_lines`; a longer line is cut
  where it must) and each chunk independently becomes a FIM example with probability ``rate``. The loader's windows
  sit at fixed offsets, so a chunk of ``L`` tokens lies whole in a window of ``T`` with probability about
  ``1 - L/T``: :func:`chunk_chars_for` therefore sizes chunks to under half a window, 1.5 characters per token of
  context. Measured on 5 MB of the standard library with an 8k vocabulary (3.65 characters per token): at
  ``seq_len = 512`` (768-character chunks) a FIM example is 200 tokens at the median, 262 at the 90th percentile,
  so more than half are seen whole and the rest still show their sentinels and much of both sides. Consecutive
  plain chunks are merged back and tokenized as one text, so with ``rate = 0`` a document tokenizes exactly as
  without FIM.
- **Line-aligned examples** (``line_rate``, a share of the FIM examples): the middle is one to a few whole lines,
  cut the way an editor asks for a line: the prefix ends at the last non-whitespace character before a line break,
  the middle is that line break, the indentation and the line(s), and the suffix starts with the line break that
  ends them. Character-level cuts alone almost never start a middle at a line break, and a small model trained only
  on them answers a whole-line request with the tail of a word (``nanochat-eval lines --fim`` measured it: 0.9% of
  lines, below the 2.6% that an empty answer passes).
- **Deterministic**: the random draws come from a generator seeded with ``(seed, sha256(text))``, so a document
  gets the same examples in every build, whatever its position or the other documents.
- Only the *train* split is transformed (see :func:`nanochat.data.shards.build_shards`): validation stays plain
  text, so bits-per-byte is comparable across FIM rates.

At inference (:func:`infill_prompt`) the prompt is PSM: ``<|bos|> P prefix S suffix M``, and the middle ends at the
first of :func:`middle_stop_ids` (``<|eos|>``, ``<|bos|>`` or a sentinel). llama.cpp's ``/infill`` builds the same
PSM prompt (``[FIM_PRE] prefix [FIM_SUF] suffix [FIM_MID]``, bos only when the file asks for it; we write
``add_bos_token = false``); its ``--spm-infill`` option writes ``[FIM_SUF] suffix [FIM_PRE] prefix [FIM_MID]``,
CodeLlama's SPM, which is *not* the SPM variant trained here: serve nanochat models with the default PSM.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from nanochat.data.tokenizer import FIM_TOKENS, Tokenizer

DEFAULT_FIM_RATE = 0.5  # fraction of train chunks that become FIM examples (Bavarian et al.: 0.5 costs no L2R skill)
DEFAULT_FIM_SPM_RATE = 0.5  # fraction of FIM examples written SPM rather than PSM (StarCoder: 0.5)
CHUNK_CHARS_PER_TOKEN = 1.5  # chunk characters per token of context: under half a window at ~3.6 chars/token
DEFAULT_FIM_CHUNK_CHARS = 768  # chunk_chars_for(512), the d20 context
FIM_FORMAT = 1  # bump when the layout of FIM examples changes: it is part of the shard cache key

FimMode = Literal["plain", "psm", "spm"]


class FimUnavailableError(ValueError):
    """The tokenizer (or model) has no FIM sentinel tokens: it was trained before FIM support."""


def chunk_chars_for(seq_len: int) -> int:
    """The FIM chunk size (characters) for a training context of ``seq_len`` tokens: about half a window."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return max(1, round(CHUNK_CHARS_PER_TOKEN * seq_len))


@dataclass(frozen=True)
class FimConfig:
    """How the train split is transformed; ``rate = 0`` is no FIM at all."""

    rate: float = 0.0  # probability that a chunk becomes a FIM example
    spm_rate: float = DEFAULT_FIM_SPM_RATE  # probability that a FIM example is SPM (else PSM)
    chunk_chars: int = DEFAULT_FIM_CHUNK_CHARS  # documents are cut at line boundaries into chunks of at most this
    seed: int = 0  # with the document's text, seeds every random draw
    line_rate: float = 0.0  # probability that a FIM example's cuts are line-aligned (whole lines as the middle)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fim_rate must be in [0, 1], got {self.rate}")
        if not 0.0 <= self.spm_rate <= 1.0:
            raise ValueError(f"fim_spm_rate must be in [0, 1], got {self.spm_rate}")
        if self.chunk_chars < 1:
            raise ValueError(f"fim_chunk_chars must be >= 1, got {self.chunk_chars}")
        if not 0.0 <= self.line_rate <= 1.0:
            raise ValueError(f"fim_line_rate must be in [0, 1], got {self.line_rate}")

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0

    def cache_key(self) -> dict[str, Any]:
        """What the shards depend on: ``{}`` without FIM (so shards built before FIM existed stay valid)."""
        if not self.enabled:
            return {}
        return {
            "format": FIM_FORMAT,
            "rate": self.rate,
            "spm_rate": self.spm_rate,
            "chunk_chars": self.chunk_chars,
            "seed": self.seed,
            **({"line_rate": self.line_rate} if self.line_rate else {}),  # absent at 0: older caches stay valid
        }


@dataclass(frozen=True)
class Piece:
    """A run of a document: plain text (``prefix`` holds it) or one FIM example split into three parts."""

    mode: FimMode
    prefix: str
    middle: str = ""
    suffix: str = ""
    chunks: int = 1  # how many chunks it was made of (plain runs merge consecutive chunks)

    @property
    def text(self) -> str:
        """The original characters, in document order."""
        return self.prefix + self.middle + self.suffix


def chunk_lines(text: str, chunk_chars: int) -> list[str]:
    """``text`` cut at line ends into chunks of at most ``chunk_chars`` characters (a longer line is cut inside);
    the chunks concatenate to ``text``."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    chunks: list[str] = []
    cur: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:  # a line longer than a chunk: flush, then cut it
            if cur:
                chunks.append("".join(cur))
                cur, n = [], 0
            chunks.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if n + len(line) > chunk_chars and cur:
            chunks.append("".join(cur))
            cur, n = [], 0
        if line:
            cur.append(line)
            n += len(line)
    if cur:
        chunks.append("".join(cur))
    return chunks


def _rng(seed: int, text: str) -> random.Random:
    h = hashlib.sha256(f"nanochat-fim\0{seed}\0".encode() + text.encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(h[:16], "little"))


MAX_LINE_MIDDLE = 8  # the most lines a line-aligned middle spans


def line_cut(chunk: str, rng: random.Random) -> tuple[int, int] | None:
    """Line-aligned cut points ``(i, j)`` of ``chunk``, or ``None`` when it has fewer than two line breaks.

    ``chunk[i:j]`` is what an editor's whole-line request leaves out: from just after the last non-whitespace
    character before a line break, through one line (half the time) or up to :data:`MAX_LINE_MIDDLE` lines, to just
    before the line break that ends the last of them; so the middle starts with a line break and the suffix too.
    """
    breaks = [k for k, c in enumerate(chunk) if c == "\n"]
    if len(breaks) < 2:
        return None
    a = rng.randrange(len(breaks) - 1)
    n = 1 if rng.random() < 0.5 else rng.randint(2, MAX_LINE_MIDDLE)
    j = breaks[min(a + n, len(breaks) - 1)]
    i = len(chunk[: breaks[a]].rstrip())
    return i, j


def plan_document(text: str, cfg: FimConfig) -> list[Piece]:
    """The pieces ``text`` becomes under ``cfg``: FIM examples and (merged) plain runs, in document order."""
    if not cfg.enabled or not text:
        return [Piece("plain", text)] if text else []
    rng = _rng(cfg.seed, text)
    pieces: list[Piece] = []
    plain: list[str] = []
    for chunk in chunk_lines(text, cfg.chunk_chars):
        if rng.random() < cfg.rate:
            mode: FimMode = "spm" if rng.random() < cfg.spm_rate else "psm"
            cut = line_cut(chunk, rng) if cfg.line_rate and rng.random() < cfg.line_rate else None
            # else two uniform cut points in [0, len], sorted (StarCoder: randint(0, len + 1, size=2))
            i, j = cut or sorted((rng.randint(0, len(chunk)), rng.randint(0, len(chunk))))
            if plain:
                pieces.append(Piece("plain", "".join(plain), chunks=len(plain)))
                plain = []
            pieces.append(Piece(mode, chunk[:i], chunk[i:j], chunk[j:]))
        else:
            plain.append(chunk)
    if plain:
        pieces.append(Piece("plain", "".join(plain), chunks=len(plain)))
    return pieces


def require_fim_ids(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """``(prefix, suffix, middle)`` ids, or :class:`FimUnavailableError` saying why there are none."""
    ids = tokenizer.fim_ids()
    if ids is None:
        raise FimUnavailableError(
            f"this tokenizer has no FIM tokens {list(FIM_TOKENS)} (it was trained before FIM support): retrain the "
            "tokenizer (delete its tokenizer.json, or prepare the data with force) and the model to use FIM"
        )
    return ids


def join_example(
    mode: FimMode,
    prefix: Sequence[int],
    middle: Sequence[int],
    suffix: Sequence[int],
    fim_ids: tuple[int, int, int],
    eos_id: int,
) -> list[int]:
    """One FIM example from separately tokenized parts: PSM or SPM layout (module docstring), ``eos`` last."""
    pre, suf, mid = fim_ids
    if mode == "psm":
        return [pre, *prefix, suf, *suffix, mid, *middle, eos_id]
    if mode == "spm":
        return [pre, suf, *suffix, mid, *prefix, *middle, eos_id]
    raise ValueError(f"unknown FIM mode {mode!r} (psm or spm)")


def encode_plans(tokenizer: Tokenizer, plans: Sequence[Sequence[Piece]]) -> list[list[int]]:
    """Token ids of each planned document (no ``<|bos|>``): every text of the batch goes through one batch
    encode (the Rust library's threads), then the ids are joined with the sentinels."""
    texts: list[str] = []
    for plan in plans:
        for p in plan:
            texts.extend([p.prefix] if p.mode == "plain" else [p.prefix, p.middle, p.suffix])
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    fim = require_fim_ids(tokenizer) if any(p.mode != "plain" for plan in plans for p in plan) else None
    out: list[list[int]] = []
    for plan in plans:
        ids: list[int] = []
        for p in plan:
            if p.mode == "plain":
                ids.extend(next(encoded))
            else:
                assert fim is not None
                a, b, c = next(encoded), next(encoded), next(encoded)
                ids.extend(join_example(p.mode, a, b, c, fim, tokenizer.eos_id))
        out.append(ids)
    return out


def infill_prompt(tokenizer: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """PSM infilling prompt ``<|bos|> P prefix S suffix M``: the model continues with the middle."""
    pre, suf, mid = require_fim_ids(tokenizer)
    return [tokenizer.bos_id, pre, *tokenizer.encode(prefix), suf, *tokenizer.encode(suffix), mid]


def middle_stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Tokens that end a generated middle: ``<|eos|>`` (trained end of middle), ``<|bos|>`` and the sentinels."""
    return frozenset({tokenizer.eos_id, tokenizer.bos_id, *require_fim_ids(tokenizer)})
