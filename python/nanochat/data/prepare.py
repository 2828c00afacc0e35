"""``prepare_data``: corpus → trained (or reused) tokenizer → token shards, in one call.

Notable choices:
- The tokenizer trains on at most ``tokenizer_chars`` characters of the *train* split (val never leaks into
  the vocabulary), taken in the order of a hash of each document's source rather than the first files
  alphabetically, so the sample spans the whole corpus. ~4M characters train a 8192-token BPE in about a
  second here; more barely changes the merges of a small vocabulary.
- Reuse: ``tokenizer.json`` is kept if ``tokenizer.meta.json`` beside it records the same vocabulary size and
  the same hash of the training sample; the shards are kept if their index records this corpus fingerprint
  and this tokenizer's hash (see :func:`nanochat.data.shards.build_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tokenizers

from nanochat.data.corpus import Corpus, load_corpus, source_hash01
from nanochat.data.shards import DEFAULT_SHARD_TOKENS, ShardIndex, build_shards
from nanochat.data.tokenizer import Tokenizer, atomic_write_text

DEFAULT_TOKENIZER_CHARS = 4_000_000


def tokenizer_sample(corpus: Corpus, max_chars: int) -> list[str]:
    """Train-split texts in source-hash order, the last one truncated so the total is at most ``max_chars``."""
    out: list[str] = []
    total = 0
    for d in sorted(corpus.splits["train"], key=lambda d: (source_hash01(d.source), d.source)):
        if total >= max_chars:
            break
        text = d.text[: max_chars - total]
        out.append(text)
        total += len(text)
    return out


def _sample_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha1(t.encode("utf-8")).digest())
    return h.hexdigest()


def prepare_tokenizer(corpus: Corpus, out_dir: str | os.PathLike[str], vocab_size: int, max_chars: int) -> Tokenizer:
    """Train a tokenizer on a sample of ``corpus`` and save it in ``out_dir``, or reuse the one there."""
    out = Path(out_dir)
    texts = tokenizer_sample(corpus, max_chars)
    meta = {"vocab_size": vocab_size, "sample_sha256": _sample_hash(texts), "tokenizers": tokenizers.__version__}
    tok_path, meta_path = out / "tokenizer.json", out / "tokenizer.meta.json"
    if tok_path.exists() and meta_path.exists():
        try:
            old_meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if {k: old_meta.get(k) for k in ("vocab_size", "sample_sha256")} == {
                k: meta[k] for k in ("vocab_size", "sample_sha256")
            }:
                tok = Tokenizer.load(tok_path)
                if tok.vocab_size == vocab_size and tok.fim_ids() is not None:  # else: trained before FIM tokens
                    return tok
        except Exception:  # an unreadable leftover of an interrupted run: retrain
            pass
    meta_path.unlink(missing_ok=True)

    tok = Tokenizer.train(texts, vocab_size)
    tok.save(tok_path)
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return tok


def prepare_data(
    out_dir: str | os.PathLike[str],
    vocab_size: int,
    data_path: str | os.PathLike[str] | None = None,
    synthetic_ratio: float = 0.1,
    val_fraction: float = 0.05,
    max_train_chars: int | None = None,
    seed: int = 0,
    tokenizer_chars: int = DEFAULT_TOKENIZER_CHARS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    include_tests: bool = False,
    progress: bool = True,
    force: bool = False,
    fim_rate: float = 0.0,
    fim_spm_rate: float = 0.5,
    fim_chunk_chars: int | None = None,
) -> tuple[Tokenizer, ShardIndex]:
    """Load the corpus (``data_path`` or the standard library, plus synthetic tasks), train or reuse the
    tokenizer, and build or reuse the shards, all in ``out_dir``.

    ``max_train_chars`` caps the train split (quick runs); ``tokenizer_chars`` caps the tokenizer's sample;
    ``force`` retrains the tokenizer and rebuilds the shards. ``fim_*`` set fill-in-the-middle on the train split
    (see :func:`nanochat.data.shards.build_shards`; ``fim_chunk_chars=None`` is its default, pass
    ``nanochat.data.fim.chunk_chars_for(seq_len)``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(
        data_path,
        val_fraction=val_fraction,
        synthetic_ratio=synthetic_ratio,
        seed=seed,
        include_tests=include_tests,
        max_train_chars=max_train_chars,
    )
    if force:
        (out / "tokenizer.meta.json").unlink(missing_ok=True)
    tok = prepare_tokenizer(corpus, out, vocab_size, tokenizer_chars)
    fim_kw = {} if fim_chunk_chars is None else {"fim_chunk_chars": fim_chunk_chars}
    index = build_shards(
        corpus,
        tok,
        out,
        shard_tokens=shard_tokens,
        progress=progress,
        force=force,
        fim_rate=fim_rate,
        fim_spm_rate=fim_spm_rate,
        seed=seed,
        **fim_kw,
    )
    return tok, index
