"""Training corpora: the local Python standard library (no download), user data, synthetic code tasks.

Notable choices:
- The default corpus is the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``):
  every machine that runs nanochat has it, so a first training run needs no network. ``site-packages``
  is excluded (it varies per machine), and so are test directories (``test``, ``tests``, ``idle_test``)
  unless asked for: CPython's ``test`` package alone is larger than the rest.
- Determinism: files are read in sorted relative-path order; unreadable and non-UTF-8 files are skipped;
  exact duplicates (same content sha1) keep their first occurrence.
- Train/val split by a stable hash of each document's ``source`` (sha1 → a number in [0, 1); val if
  below ``val_fraction``), so adding or removing a file never moves another file across the split.
- Synthetic code tasks (:mod:`nanochat.data.synthetic`) are mixed in at a fraction of *characters*
  (``synthetic_ratio``), split by the same hash rule and spread evenly through each split.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# extensions read as source/text documents when walking a user directory
TEXT_SUFFIXES: frozenset[str] = frozenset(
    {
        ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".kt", ".scala",
        ".js", ".mjs", ".ts", ".tsx", ".jsx", ".rb", ".php", ".lua", ".sh", ".bash", ".zsh", ".pl", ".r",
        ".jl", ".swift", ".m", ".cs", ".hs", ".ml", ".ex", ".exs", ".erl", ".clj", ".sql", ".html", ".css",
        ".md", ".rst", ".txt", ".toml", ".yaml", ".yml", ".ini", ".cfg", ".json", ".xml", ".tex",
    }
)  # fmt: skip
TEST_DIR_NAMES: frozenset[str] = frozenset({"test", "tests", "idle_test"})
SKIP_DIR_NAMES: frozenset[str] = frozenset({"site-packages", "dist-packages", "__pycache__", "node_modules"})
SPLITS: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class Document:
    """One training document: where it came from (``source``, a relative path or a tag) and its text."""

    source: str
    text: str

    @property
    def path(self) -> str:
        return self.source

    @property
    def content_hash(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()


@dataclass
class Corpus:
    """Documents per split (``"train"``, ``"val"``) and a human-readable description."""

    splits: dict[str, list[Document]]
    description: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 over every (split, source, content hash): changes iff the documents or their split change."""
        h = hashlib.sha256()
        for split in sorted(self.splits):
            for d in self.splits[split]:
                h.update(f"{split}\0{d.source}\0{d.content_hash}\n".encode())
        return h.hexdigest()

    def num_chars(self, split: str) -> int:
        return sum(len(d.text) for d in self.splits.get(split, []))


# ---------------------------------------------------------------------------------------------- reading
def _read_text(path: Path) -> str | None:
    """UTF-8 text of a file, or None if it is unreadable, not UTF-8, or contains NUL bytes (binary)."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\0" in text:
        return None
    return text


def _walk(root: Path, suffixes: Iterable[str] | None, skip_dirs: frozenset[str]) -> list[Path]:
    """Files under ``root`` (sorted by relative posix path), skipping hidden and ``skip_dirs`` directories."""
    wanted = None if suffixes is None else frozenset(suffixes)
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place so skipped trees (site-packages, test) are never listed
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        base = Path(dirpath)
        for name in filenames:
            p = base / name
            if name.startswith(".") or (wanted is not None and p.suffix.lower() not in wanted) or not p.is_file():
                continue
            out.append((p.relative_to(root).as_posix(), p))
    out.sort(key=lambda t: t[0])
    return [p for _, p in out]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(include_tests: bool = False, root: str | Path | None = None) -> Iterator[Document]:
    """The ``.py`` files of the running interpreter's standard library, in sorted relative-path order."""
    root = Path(root) if root is not None else stdlib_root()
    skip = SKIP_DIR_NAMES if include_tests else SKIP_DIR_NAMES | TEST_DIR_NAMES
    for p in _walk(root, {".py"}, skip):
        text = _read_text(p)
        if text:
            yield Document(f"stdlib/{p.relative_to(root).as_posix()}", text)


def _jsonl_documents(path: Path, source: str) -> Iterator[Document]:
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
            text = obj.get("text", obj.get("content")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{lineno}: expected an object with a string field "text" or "content"')
            if text:
                yield Document(f"{source}:{lineno}", text)


def iter_documents(path: str | Path) -> Iterator[Document]:
    """Documents of user data at ``path``: a directory of source/text files, or a single file.

    ``.jsonl`` files hold one document per line (field ``"text"``, else ``"content"``); any other text file
    (``.txt``, ``.py``, ``.rs``, ... see :data:`TEXT_SUFFIXES`) is one document. Directories are walked in
    sorted order, skipping hidden directories, ``__pycache__``, ``node_modules`` and ``site-packages``;
    binary and non-UTF-8 files are skipped. Sources are paths relative to ``path``.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist")
    if root.is_file():
        files, base = [root], root.parent
    else:
        files, base = _walk(root, TEXT_SUFFIXES | {".jsonl"}, SKIP_DIR_NAMES), root
    for p in files:
        source = p.relative_to(base).as_posix()
        if p.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(p, source)
        else:
            text = _read_text(p)
            if text:
                yield Document(source, text)


def dedup(docs: Iterable[Document]) -> list[Document]:
    """Drop documents whose content equals an earlier one's (first occurrence wins)."""
    seen: set[str] = set()
    out = []
    for d in docs:
        h = d.content_hash
        if h not in seen:
            seen.add(h)
            out.append(d)
    return out


# ---------------------------------------------------------------------------------------------- splitting
def source_hash01(source: str) -> float:
    """A stable number in [0, 1) from the sha1 of ``source``."""
    return int.from_bytes(hashlib.sha1(source.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(source: str, val_fraction: float) -> str:
    return "val" if source_hash01(source) < val_fraction else "train"


def split_documents(docs: Sequence[Document], val_fraction: float) -> dict[str, list[Document]]:
    """Split by :func:`split_of`, keeping order. If that leaves val empty (tiny corpora) while
    ``val_fraction > 0`` and there are at least two documents, the document with the smallest hash goes to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d.source, val_fraction)].append(d)
    if val_fraction > 0 and not out["val"] and len(out["train"]) >= 2:
        first = min(out["train"], key=lambda d: source_hash01(d.source))
        out["train"].remove(first)
        out["val"].append(first)
    return out


def interleave(docs: Sequence[Document], extra: Sequence[Document]) -> list[Document]:
    """Spread ``extra`` evenly through ``docs`` (deterministic, keeps both orders)."""
    n, m = len(docs), len(extra)
    if m == 0:
        return list(docs)
    out: list[Document] = []
    j = 0
    for i, d in enumerate(docs):
        # place extra[j] while its even position j*(n+1)/m ... is reached
        while j < m and j * (n + 1) < (i + 1) * m:
            out.append(extra[j])
            j += 1
        out.append(d)
    out.extend(extra[j:])
    return out


# ---------------------------------------------------------------------------------------------- corpus
def load_corpus(
    data_path: str | Path | None = None,
    val_fraction: float = 0.05,
    synthetic_ratio: float = 0.1,
    seed: int = 0,
    include_tests: bool = False,
    max_train_chars: int | None = None,
) -> Corpus:
    """The training corpus: user data at ``data_path`` (else the standard library) plus synthetic tasks.

    ``synthetic_ratio`` is the fraction of all characters that are synthetic (0 disables them); the
    synthetic documents are split by the same hash rule and interleaved evenly into each split.
    ``max_train_chars`` caps the train split (whole documents, in order) for quick runs.
    """
    from nanochat.data.synthetic import synthetic_documents  # here, not at the top: synthetic imports Document

    if not 0.0 <= synthetic_ratio < 1.0:
        raise ValueError(f"synthetic_ratio must be in [0, 1), got {synthetic_ratio}")
    if data_path is not None:
        real = dedup(iter_documents(data_path))
        desc = f"data at {data_path}"
    else:
        real = dedup(stdlib_documents(include_tests=include_tests))
        desc = f"Python {sysconfig.get_python_version()} standard library at {stdlib_root()}"
    if not real:
        raise ValueError(f"no documents found in {desc}")
    real_chars = sum(len(d.text) for d in real)
    synth = (
        synthetic_documents(int(real_chars * synthetic_ratio / (1.0 - synthetic_ratio)), seed)
        if synthetic_ratio
        else []
    )
    real_split = split_documents(real, val_fraction)
    synth_split = split_documents(synth, val_fraction) if synth else {s: [] for s in SPLITS}
    splits = {s: interleave(real_split[s], synth_split[s]) for s in SPLITS}
    if max_train_chars is not None:
        kept, total = [], 0
        for d in splits["train"]:
            if total >= max_train_chars:
                break
            kept.append(d)
            total += len(d.text)
        splits["train"] = kept
    if synthetic_ratio:
        desc += f" + {synthetic_ratio:.0%} synthetic tasks (seed {seed})"
    corpus = Corpus(splits, desc)
    corpus.stats = {
        s: {
            "docs": len(splits[s]),
            "chars": corpus.num_chars(s),
            "synthetic_docs": sum(d.source.startswith("synthetic/") for d in splits[s]),
        }
        for s in SPLITS
    }
    return corpus
