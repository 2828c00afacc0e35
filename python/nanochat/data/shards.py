"""Token shards: a corpus tokenized once into memory-mapped ``.npy`` files plus a JSON index.

Notable choices:
- Each split is one token stream: every document is preceded by ``<|bos|>`` and the documents are
  concatenated, then cut into shards of ``shard_tokens`` tokens (the last one shorter). A document may
  straddle two shards; the loader never reads a window across a shard boundary, which loses at most
  ``seq_len`` tokens of context per shard.
- Shards are ``.npy`` (self-describing dtype and length, opened with ``np.load(mmap_mode="r")``), ``uint16``
  when every id fits (vocab ≤ 65536), else ``uint32``.
- ``index.json`` is the commit point: it records dtype, vocab size, the tokenizer's hash, the corpus
  fingerprint, shard size and the per-split shard list with token counts. A rebuild first removes the old
  index, writes each shard to a temp file and renames it, then writes the new index (temp + rename), and only
  then deletes shards no longer referenced. A crash at any point leaves either no index (rebuild next time)
  or a complete one.
- A re-run with the same corpus fingerprint, tokenizer hash, dtype, shard size and FIM settings reuses the shards.
- Fill-in-the-middle (``fim_rate > 0``, :mod:`nanochat.data.fim`) rewrites chunks of the *train* split into FIM
  examples; every other split stays plain text, so validation bits-per-byte is comparable across FIM rates. The
  settings are recorded in the index (``fim``, empty without FIM, so indexes written before FIM existed stay valid)
  and the train split's stats count ``fim_psm`` and ``fim_spm`` examples among ``fim_chunks`` chunks.
- Tokenization uses the Rust library's batch encoding (both cores) over batches of documents, with a rich
  progress bar in characters.
- A full disk while writing a shard or the index raises ``OSError(ENOSPC)`` naming the file and the free space, and
  leaves no temp file behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanochat.data.corpus import Corpus, Document
from nanochat.data.fim import (
    DEFAULT_FIM_CHUNK_CHARS,
    DEFAULT_FIM_SPM_RATE,
    FimConfig,
    encode_plans,
    plan_document,
    require_fim_ids,
)
from nanochat.data.tokenizer import Tokenizer, atomic_write_text

INDEX_NAME = "index.json"
INDEX_VERSION = 1
DEFAULT_SHARD_TOKENS = 16 * 1024 * 1024


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def corpus_fingerprint(docs_by_split: Mapping[str, Iterable[Document]]) -> str:
    """Same value as :attr:`Corpus.fingerprint` for the same documents."""
    return Corpus({s: list(d) for s, d in docs_by_split.items()}).fingerprint


@dataclass
class ShardInfo:
    file: str  # relative to the index's directory
    tokens: int


@dataclass
class ShardIndex:
    """The contents of ``index.json`` plus the directory it lives in."""

    root: Path
    dtype: str
    vocab_size: int
    bos_id: int
    tokenizer_hash: str
    corpus_fingerprint: str
    shard_tokens: int
    splits: dict[str, list[ShardInfo]]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # per split: docs, chars, bytes, tokens
    fim: dict[str, Any] = field(default_factory=dict)  # FimConfig.cache_key() of the train split ({}: no FIM)
    version: int = INDEX_VERSION

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in shard index at {self.root} (have {sorted(self.splits)})")
        return self.splits[split]

    def open(self, split: str) -> list[np.ndarray]:
        """Read-only memory maps of the split's shards, in order."""
        out = []
        for s in self.shards(split):
            arr = np.load(self.root / s.file, mmap_mode="r")
            if arr.dtype != np.dtype(self.dtype) or arr.ndim != 1 or arr.shape[0] != s.tokens:
                raise ValueError(f"shard {s.file} does not match {self.root / INDEX_NAME}")
            out.append(arr)
        return out

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def save(self) -> Path:
        path = self.root / INDEX_NAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShardIndex:
        """Load from a shard directory or its ``index.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_NAME
        d: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if d.get("version") != INDEX_VERSION:
            raise ValueError(f"{path}: unsupported shard index version {d.get('version')}")
        d["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in d["splits"].items()}
        return cls(root=path.parent, **d)

    def files_ok(self) -> bool:
        """Whether every shard file exists with the size its header and token count imply."""
        itemsize = np.dtype(self.dtype).itemsize
        for shards in self.splits.values():
            for s in shards:
                p = self.root / s.file
                try:
                    arr = np.load(p, mmap_mode="r")
                except (OSError, ValueError):
                    return False
                if arr.dtype != np.dtype(self.dtype) or arr.shape != (s.tokens,) or arr.nbytes != s.tokens * itemsize:
                    return False
        return True


def disk_full_error(path: Path, e: OSError, nbytes: int | None = None) -> OSError:
    """An ENOSPC ``OSError`` naming ``path`` and saying that the disk is full, for what a failed write raised (numpy's
    short write says only ``4526110 requested and 993216 written``, with no errno and no path); errors that are not
    about space come back unchanged."""
    short_write = e.errno is None and "requested and" in str(e) and "written" in str(e)
    if e.errno not in (errno.ENOSPC, errno.EDQUOT) and not short_write:
        return e
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    need = f", {nbytes / 2**20:.1f} MiB to write" if nbytes is not None else ""
    return OSError(errno.ENOSPC, f"the disk is full: cannot write {path} ({free}{need}; {e})", str(path))


def _write_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a data file is readable by all
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        err = disk_full_error(path, e, arr.nbytes) if isinstance(e, OSError) else e
        if err is e:
            raise
        raise err from e


def _batches(docs: Iterable[Document | str], n: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d.text if isinstance(d, Document) else d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def build_shards(
    docs_by_split: Corpus | Mapping[str, Iterable[Document | str]],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    fingerprint: str | None = None,
    batch_docs: int = 256,
    progress: bool = True,
    force: bool = False,
    fim_rate: float = 0.0,
    fim_spm_rate: float = DEFAULT_FIM_SPM_RATE,
    fim_chunk_chars: int = DEFAULT_FIM_CHUNK_CHARS,
    seed: int = 0,
    fim_line_rate: float = 0.0,
) -> ShardIndex:
    """Tokenize each split into shards under ``out_dir`` and write ``index.json``; reuse them if up to date.

    ``fingerprint`` identifies the corpus; by default it is computed from the documents (which are then
    held in memory). Pass one (e.g. a hash of file names and sizes) to stream a corpus too large for that.
    ``force`` rebuilds even when the existing shards match.
    ``fim_rate``, ``fim_spm_rate``, ``fim_chunk_chars``, ``fim_line_rate`` and ``seed`` set fill-in-the-middle on the train split
    (:class:`nanochat.data.fim.FimConfig`; ``chunk_chars_for(seq_len)`` sizes chunks for a context); the
    tokenizer must have the FIM tokens when ``fim_rate > 0``.
    """
    if shard_tokens < 2:
        raise ValueError(f"shard_tokens must be >= 2, got {shard_tokens}")
    fim = FimConfig(fim_rate, fim_spm_rate, fim_chunk_chars, seed, fim_line_rate)
    if fim.enabled:
        require_fim_ids(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(docs_by_split, Corpus):
        fingerprint = fingerprint or docs_by_split.fingerprint
        splits: dict[str, Iterable[Document | str]] = dict(docs_by_split.splits)
    else:
        splits = dict(docs_by_split)
        if fingerprint is None:
            materialised = {s: [d if isinstance(d, Document) else Document(f"{s}/{i}", d) for i, d in enumerate(v)]
                            for s, v in splits.items()}  # fmt: skip
            fingerprint = corpus_fingerprint(materialised)
            splits = dict(materialised)
    dtype = token_dtype(tokenizer.vocab_size)
    tok_hash = tokenizer.hash

    index_path = out / INDEX_NAME
    if index_path.exists() and not force:
        try:
            old = ShardIndex.load(out)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            old = None
        if (
            old is not None
            and old.corpus_fingerprint == fingerprint
            and old.tokenizer_hash == tok_hash
            and old.dtype == dtype.name
            and old.shard_tokens == shard_tokens
            and old.fim == fim.cache_key()
            and sorted(old.splits) == sorted(splits)
            and old.files_ok()
        ):
            return old
    index_path.unlink(missing_ok=True)  # invalidate before touching any shard

    total_chars = None
    if all(isinstance(v, list) for v in splits.values()):
        total_chars = sum(len(d.text if isinstance(d, Document) else d) for v in splits.values() for d in v)

    new_splits: dict[str, list[ShardInfo]] = {}
    stats: dict[str, dict[str, int]] = {}
    bos = tokenizer.bos_id
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]tokenizing[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} chars" if total_chars else "{task.completed:,.0f} chars"),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task("", total=total_chars)
        for split in sorted(splits):
            bar.update(task, description=split)
            buf = np.empty(shard_tokens, dtype=dtype)
            fill = 0
            shards: list[ShardInfo] = []
            st = {"docs": 0, "chars": 0, "bytes": 0, "tokens": 0}
            use_fim = fim.enabled and split == "train"
            if use_fim:
                st.update(fim_chunks=0, fim_psm=0, fim_spm=0)

            def flush(n: int, split: str = split, buf: np.ndarray = buf, shards: list[ShardInfo] = shards) -> None:
                name = f"{split}_{len(shards):05d}.npy"
                _write_npy_atomic(out / name, buf[:n])
                shards.append(ShardInfo(name, n))

            for texts in _batches(splits[split], batch_docs):
                if use_fim:
                    plans = [plan_document(t, fim) for t in texts]
                    encoded = encode_plans(tokenizer, plans)
                    for p in (p for plan in plans for p in plan):
                        st["fim_chunks"] += p.chunks
                        if p.mode != "plain":
                            st[f"fim_{p.mode}"] += 1
                else:
                    encoded = tokenizer.encode_batch(texts)
                for text, ids in zip(texts, encoded, strict=True):
                    arr = np.empty(len(ids) + 1, dtype=dtype)
                    arr[0] = bos
                    arr[1:] = ids
                    st["docs"] += 1
                    st["chars"] += len(text)
                    st["bytes"] += len(text.encode("utf-8"))
                    st["tokens"] += len(arr)
                    pos = 0
                    while pos < len(arr):
                        k = min(len(arr) - pos, shard_tokens - fill)
                        buf[fill : fill + k] = arr[pos : pos + k]
                        fill += k
                        pos += k
                        if fill == shard_tokens:
                            flush(fill)
                            fill = 0
                bar.advance(task, sum(len(t) for t in texts))
            if fill:
                flush(fill)
            new_splits[split] = shards
            stats[split] = st

    index = ShardIndex(
        root=out,
        dtype=dtype.name,
        vocab_size=tokenizer.vocab_size,
        bos_id=bos,
        tokenizer_hash=tok_hash,
        corpus_fingerprint=fingerprint,
        shard_tokens=shard_tokens,
        splits=new_splits,
        stats=stats,
        fim=fim.cache_key(),
    )
    try:
        index.save()
    except OSError as e:
        err = disk_full_error(index_path, e)
        if err is e:
            raise
        raise err from e
    keep = {s.file for v in new_splits.values() for s in v}
    for split in new_splits:
        for stale in out.glob(f"{split}_*.npy"):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
    return index


def file_fingerprint(paths: Iterable[str | os.PathLike[str]]) -> str:
    """A cheap corpus fingerprint from file names, sizes and modification times (for streamed corpora)."""
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
