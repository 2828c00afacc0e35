"""Training corpora: sources named by a data spec, cleaned, split, mixed by weight, plus synthetic code tasks.

The default corpus is ``stdlib:1,site-packages:14,functions:5`` (:data:`~nanochat.data.sources.DEFAULT_SPEC`): the
running interpreter's standard library and the running environment's installed packages, ~150 MB of Python that
every machine with nanochat already has, with a quarter of the training text their short documented functions cut
out as documents of their own. See :mod:`nanochat.data.sources` for the spec syntax and what each source reads.

Pipeline (:func:`build_corpus`), each step counted per source in ``Corpus.stats``:

1. **Read** every listed file (environment sources drop generated and data files).
2. **Exact duplicates**: the same content (sha1) as an earlier document is dropped. Sources count in spec order,
   files in path order, so the standard library's copy of a module wins over a vendored one.
3. **Near duplicates**: MinHash over 5-word shingles (64 permutations; 16 bands of 4 rows for candidates; dropped
   when the estimated Jaccard similarity with an earlier document is at least 0.8). On this machine's 150 MB it
   costs ~2.5 s of CPU and drops ~300 files (~4 MB) beyond the exact copies: vendored packages
   (``pip/_vendor/requests`` vs ``requests``, ``setuptools/_vendor/packaging``, ``distutils``) and generated API
   twins. A normalised-whitespace hash, the cheap alternative (0.7 s), finds 2 of them.
4. **Decontamination** (:mod:`nanochat.data.decontam`): a document sharing a 13-word run with a HumanEval prompt or
   canonical solution is dropped, synthetic documents included; every drop is listed with its task and n-gram.
5. **Split**: train/val by a stable hash of each document's ``source`` (sha1 → [0, 1); val below
   ``val_fraction``), so adding or removing a file never moves another across the split. A function cut from a file
   (the ``functions`` source) takes its file's split, and the ``functions`` source keeps only its training part.
6. **Weights** (train split only; val stays natural so it measures the same thing whatever the mix): a source with
   a weight gets that relative share of the weighted sources' training characters, whose total stays the sum of
   their natural sizes. ``stdlib:1,site-packages:3`` on 12 + 138 MB thus trains on 37.5 MB of stdlib (each file
   ~3 times) and 112.5 MB of site-packages (~81% of its files). A factor ``f = q + r`` repeats every document
   ``q`` times and once more if a hash of (seed, source) is below ``r``: deterministic, and in expectation exact.
   A source without a weight enters once, as it is (the default spec has none: everything once).
7. **Synthetic tasks** (:mod:`nanochat.data.synthetic`) make up ``synthetic_ratio`` of all characters, split by
   the same hash rule and spread evenly through each split.
8. ``max_train_chars`` caps the train split for quick runs, keeping documents in source-hash order (a sample of
   the whole corpus, not its first files).

``Corpus.fingerprint`` hashes every (split, source, content hash): it changes iff the documents or their split do.
:class:`CorpusPlan` lists the files without reading them; its :attr:`~CorpusPlan.key` (names, sizes, mtimes,
settings, and the code of this pipeline) lets ``prepare_data`` reuse a corpus it has already built.
"""

from __future__ import annotations

import hashlib
import sysconfig
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanochat.data.decontam import NGRAM, humaneval_data_id, humaneval_index, iter_ngram_hashes
from nanochat.data.sources import (
    MAX_FILE_BYTES,
    SKIP_DIR_NAMES,
    TEST_DIR_NAMES,
    TEXT_SUFFIXES,
    Document,
    Source,
    SourceListing,
    iter_documents,
    list_files,
    listing_fingerprint,
    parse_spec,
    read_listing,
    spec_string,
    stdlib_documents,
    stdlib_root,
)

__all__ = [
    "SKIP_DIR_NAMES",
    "SPLITS",
    "TEST_DIR_NAMES",
    "TEXT_SUFFIXES",
    "Corpus",
    "CorpusPlan",
    "Document",
    "build_corpus",
    "dedup",
    "interleave",
    "iter_documents",
    "load_corpus",
    "near_duplicates",
    "plan_corpus",
    "resample",
    "source_hash01",
    "split_documents",
    "split_of",
    "stdlib_documents",
    "stdlib_root",
]

CORPUS_VERSION = 2  # bump when the pipeline's output changes for the same files (the code hash also catches it)
SPLITS: tuple[str, ...] = ("train", "val")
NEAR_DUP_THRESHOLD = 0.8  # estimated Jaccard similarity of 5-word shingle sets
NEAR_DUP_SHINGLE = 5
NEAR_DUP_PERMS = 64
NEAR_DUP_BANDS = 16
_PIPELINE_FILES = ("corpus.py", "sources.py", "decontam.py", "synthetic.py")


@dataclass
class Corpus:
    """Documents per split (``"train"``, ``"val"``), a human-readable description, and what was done (stats)."""

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


# ---------------------------------------------------------------------------------------------- duplicates
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


def minhash_signatures(
    texts: Sequence[str], num_perm: int = NEAR_DUP_PERMS, shingle: int = NEAR_DUP_SHINGLE, seed: int = 0
) -> np.ndarray:
    """``uint64[num_perm, len(texts)]`` MinHash signatures of the texts' ``shingle``-word runs.

    Permutation ``k`` maps a (well mixed) shingle hash ``x`` to ``a_k * x + b_k mod 2**64`` with ``a_k`` odd, a
    bijection. A text with fewer than ``shingle`` words keeps the all-ones signature (it never matches).
    """
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    sig = np.full((num_perm, len(texts)), np.iinfo(np.uint64).max, dtype=np.uint64)
    block = 8192  # shingles per pass: (num_perm, block) temporaries stay in cache
    for h, doc in iter_ngram_hashes(texts, shingle):
        for s in range(0, len(h), block):
            hb, db = h[s : s + block], doc[s : s + block]
            v = a[:, None] * hb  # (num_perm, m)
            v += b[:, None]
            starts = np.flatnonzero(np.r_[True, db[1:] != db[:-1]])
            red = np.minimum.reduceat(v, starts, axis=1)  # (num_perm, docs in block)
            d = db[starts]
            sig[:, d] = np.minimum(sig[:, d], red)  # a document may span two blocks
    return sig


def near_duplicates(
    texts: Sequence[str],
    threshold: float = NEAR_DUP_THRESHOLD,
    num_perm: int = NEAR_DUP_PERMS,
    bands: int = NEAR_DUP_BANDS,
    shingle: int = NEAR_DUP_SHINGLE,
) -> dict[int, tuple[int, float]]:
    """``{later index: (earlier index, estimated Jaccard)}`` for texts that near-duplicate an earlier text.

    Candidates share all rows of one LSH band (``bands`` bands of ``num_perm // bands`` rows; within a band each
    text is compared with the earliest text of its bucket); a candidate is a near duplicate when the fraction of
    equal signature entries reaches ``threshold``.
    """
    if num_perm % bands:
        raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
    if not texts:
        return {}
    sig = minhash_signatures(texts, num_perm, shingle)
    idx = np.flatnonzero(sig[0] != np.iinfo(np.uint64).max)
    rows = num_perm // bands
    firsts, laters = [], []
    for band in range(bands):
        part = sig[band * rows : (band + 1) * rows, idx]
        key = part[0].copy()
        for r in range(1, rows):
            key *= np.uint64(0x100000001B3)
            key ^= part[r]
        order = np.argsort(key, kind="stable")  # stable: within a bucket, ascending text index
        ks = key[order]
        same = np.r_[False, ks[1:] == ks[:-1]]
        group_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(ks))))
        j = np.flatnonzero(same)
        firsts.append(idx[order[group_start[j]]])
        laters.append(idx[order[j]])
    first = np.concatenate(firsts)
    later = np.concatenate(laters)
    if len(first) == 0:
        return {}
    pair = np.unique(first.astype(np.int64) * len(texts) + later)
    first, later = pair // len(texts), pair % len(texts)
    sim = (sig[:, first] == sig[:, later]).mean(axis=0)
    out: dict[int, tuple[int, float]] = {}
    for f, j, s in zip(first.tolist(), later.tolist(), sim.tolist()):
        if s >= threshold and (j not in out or out[j][1] < s):
            out[j] = (f, s)
    return out


# ---------------------------------------------------------------------------------------------- splitting
def source_hash01(source: str) -> float:
    """A stable number in [0, 1) from the sha1 of ``source``."""
    return int.from_bytes(hashlib.sha1(source.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(source: str, val_fraction: float) -> str:
    return "val" if source_hash01(source) < val_fraction else "train"


def split_documents(docs: Sequence[Document], val_fraction: float) -> dict[str, list[Document]]:
    """Split by :func:`split_of` of each document's :attr:`~Document.split_key`, keeping order. If that leaves val
    empty (tiny corpora) while ``val_fraction > 0`` and there are at least two documents, the document with the
    smallest hash goes to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d.split_key, val_fraction)].append(d)
    if val_fraction > 0 and not out["val"] and len(out["train"]) >= 2:
        first = min(out["train"], key=lambda d: source_hash01(d.split_key))
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


def resample(docs: Sequence[Document], factor: float, salt: str = "") -> list[Document]:
    """``docs`` repeated ``int(factor)`` times (whole blocks, in order), then once more each document whose
    ``source_hash01(salt + source)`` is below the fractional part: ``factor`` times the documents in expectation."""
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    q = int(factor)
    r = factor - q
    out = list(docs) * q
    if r > 0:
        out += [d for d in docs if source_hash01(f"{salt}\0{d.source}") < r]
    return out


# ---------------------------------------------------------------------------------------------- plan
def _pipeline_code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _PIPELINE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


@dataclass
class CorpusPlan:
    """What a corpus will be built from, known without reading a file: the sources, their listed files, and the
    settings. :attr:`key` changes when any of them (or this pipeline's code) does."""

    sources: list[Source]
    listings: list[SourceListing]
    settings: dict[str, Any]

    @property
    def key(self) -> str:
        extra = {
            "version": CORPUS_VERSION,
            "code": _pipeline_code_hash(),
            "settings": self.settings,
            "humaneval": humaneval_data_id() if self.settings.get("decontaminate") else None,
        }
        return listing_fingerprint(self.listings, extra)

    @property
    def spec(self) -> str:
        return spec_string(self.sources)


def plan_corpus(
    data_path: str | Path | None = None,
    val_fraction: float = 0.05,
    synthetic_ratio: float = 0.1,
    seed: int = 0,
    include_tests: bool = False,
    max_train_chars: int | None = None,
    decontaminate: bool = True,
    near_dedup: bool = True,
) -> CorpusPlan:
    """Parse the spec (``data_path``: a spec string or a path; ``None``: the default spec) and list every
    source's files (one ``stat`` each)."""
    if not 0.0 <= synthetic_ratio < 1.0:
        raise ValueError(f"synthetic_ratio must be in [0, 1), got {synthetic_ratio}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sources = parse_spec(data_path)
    listings = [list_files(s, include_tests=include_tests) for s in sources]
    for li in listings:
        if not li.files:
            raise ValueError(
                f"data source {li.source.label!r} ({', '.join(map(str, li.source.roots))}) has no documents: no files to read"
                + (f" ({sum(li.skipped.values())} skipped as too large)" if li.skipped else "")
            )
    settings = {
        "val_fraction": val_fraction,
        "synthetic_ratio": synthetic_ratio,
        "seed": seed,
        "include_tests": include_tests,
        "max_train_chars": max_train_chars,
        "decontaminate": decontaminate,
        "near_dedup": near_dedup,
        "max_file_bytes": MAX_FILE_BYTES,
    }
    return CorpusPlan(sources, listings, settings)


# ---------------------------------------------------------------------------------------------- build
def _nbytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _describe(plan: CorpusPlan) -> str:
    parts = []
    for s in plan.sources:
        if s.kind == "stdlib":
            what = f"Python {sysconfig.get_python_version()} standard library at {s.roots[0]}"
        elif s.kind == "site-packages":
            what = f"site-packages at {', '.join(map(str, s.roots))}"
        elif s.kind == "functions":
            what = "their documented functions"
        else:
            what = f"data at {s.label}"
        parts.append(what if s.weight is None else f"{what} (weight {s.weight:g})")
    return " + ".join(parts)


def build_corpus(plan: CorpusPlan, progress: bool = False) -> Corpus:
    """Read, clean, split, weight and complete with synthetic tasks the corpus ``plan`` describes (see the module
    docstring). Every step is counted per source in ``Corpus.stats``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from nanochat.data.synthetic import synthetic_documents  # here: synthetic imports this module's Document

    st = plan.settings
    timings: dict[str, float] = {}
    per_src: list[dict[str, Any]] = []
    docs: list[Document] = []
    owner: list[int] = []  # source index of each document
    with Progress(
        TextColumn("[bold]corpus[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        disable=not progress,
    ) as bar:

        def stage(name: str, before: str = "") -> Any:
            """A one-step progress line per pipeline stage; ``done(info)`` completes it."""
            timings[name] = time.perf_counter()
            tid = bar.add_task(name, total=1, info=before)

            def done(info: str) -> None:
                timings[name] = time.perf_counter() - timings[name]
                bar.update(tid, completed=1, info=info)

            return done

        t0 = time.perf_counter()
        total_bytes = sum(li.bytes for li in plan.listings)
        task = bar.add_task("reading", total=total_bytes, info="")
        seen_bytes = 0

        def on_file(n: int) -> None:
            nonlocal seen_bytes
            seen_bytes += n
            bar.update(task, advance=n, info=f"{seen_bytes / 1e6:,.1f}/{total_bytes / 1e6:,.1f} MB")

        for i, li in enumerate(plan.listings):
            counts: Counter[str] = Counter()
            n0 = len(docs)
            for d in read_listing(li, counts, on_file=on_file):
                docs.append(d)
            owner += [i] * (len(docs) - n0)
            if len(docs) == n0:
                detail = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if k != "files")
                raise ValueError(
                    f"data source {li.source.label!r} has no documents: {counts['files']} files read"
                    + (f" ({detail})" if detail else "")
                )
            per_src.append(
                {
                    "label": li.source.label,
                    "kind": li.source.kind,
                    "roots": [str(r) for r in li.source.roots],
                    "weight": li.source.weight,
                    "text_field": li.source.text_field,
                    "files": len(li.files),
                    "bytes_listed": li.bytes,
                    "skipped": dict(
                        sorted((li.skipped + Counter({k: v for k, v in counts.items() if k != "files"})).items())
                    ),
                    "docs_read": len(docs) - n0,
                    "dropped": {"duplicate": 0, "near_duplicate": 0, "decontaminated": 0},
                }
            )
        timings["read"] = time.perf_counter() - t0

        def drop(keep: list[bool], reason: str) -> None:
            nonlocal docs, owner
            for d_ok, o in zip(keep, owner):
                if not d_ok:
                    per_src[o]["dropped"][reason] += 1
            docs = [d for d, k in zip(docs, keep) if k]
            owner = [o for o, k in zip(owner, keep) if k]

        done = stage("exact duplicates")
        seen: set[str] = set()
        keep = []
        for d in docs:
            h = d.content_hash
            keep.append(h not in seen)
            seen.add(h)
        drop(keep, "duplicate")
        done(f"{keep.count(False):,} dropped")

        near_report: dict[str, Any] = {"enabled": st["near_dedup"]}
        if st["near_dedup"]:
            done = stage("near duplicates (MinHash)")
            near = near_duplicates([d.text for d in docs])
            examples = [
                {"dropped": docs[j].source, "kept": docs[i].source, "similarity": round(s, 3)}
                for j, (i, s) in sorted(near.items())
            ]
            drop([j not in near for j in range(len(docs))], "near_duplicate")
            done(f"{len(near):,} dropped")
            near_report.update(
                method=f"MinHash, {NEAR_DUP_SHINGLE}-word shingles, {NEAR_DUP_PERMS} permutations, "
                f"{NEAR_DUP_BANDS} LSH bands",
                threshold=NEAR_DUP_THRESHOLD,
                dropped=len(near),
                pairs=examples[:200],
            )

        decontam: dict[str, Any] = {"enabled": st["decontaminate"]}
        index = None
        if st["decontaminate"]:
            done = stage("HumanEval decontamination")
            index = humaneval_index(NGRAM)
            hits = index.find([d.text for d in docs])
            decontam.update(
                rule=f"shares a {NGRAM}-word run with a HumanEval prompt or canonical solution (words: runs of "
                "[A-Za-z0-9_] and non-ASCII characters; punctuation and whitespace ignored)",
                reference_ngrams=len(index),
                dropped=len(hits),
                documents=[
                    {"source": docs[i].source, "from": per_src[owner[i]]["label"], "task_id": m.label, "ngram": m.ngram}
                    for i, m in sorted(hits.items())
                ],
            )
            drop([i not in hits for i in range(len(docs))], "decontaminated")
            done(f"{len(hits):,} dropped")

        # --- split, then weight the train split per source
        done = stage("split and mix")
        by_src: list[list[Document]] = [[] for _ in per_src]
        for d, o in zip(docs, owner):
            by_src[o].append(d)
        vf = st["val_fraction"]
        split_src = [
            # functions are a training emphasis only: the ones of training files; held-out text stays the files
            {"train": [d for d in ds if split_of(d.split_key, vf) == "train"], "val": []}
            if source.kind == "functions"
            else split_documents(ds, vf)
            for ds, source in zip(by_src, plan.sources)
        ]
        natural = [sum(len(d.text) for d in s["train"]) for s in split_src]
        weighted = [i for i, s in enumerate(plan.sources) if s.weight is not None]
        factors = [1.0] * len(per_src)
        if weighted:
            total_w = sum(plan.sources[i].weight or 0.0 for i in weighted)
            budget = sum(natural[i] for i in weighted)
            for i in weighted:
                if natural[i] == 0:
                    raise ValueError(f"data source {per_src[i]['label']!r} has a weight but no training documents")
                factors[i] = budget * (plan.sources[i].weight or 0.0) / total_w / natural[i]
        real: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for i, s in enumerate(split_src):
            train = resample(s["train"], factors[i], salt=f"mix{st['seed']}") if factors[i] != 1.0 else s["train"]
            real["train"] += train
            real["val"] += s["val"]
            doc_bytes = sum(_nbytes(d.text) for d in by_src[i])
            per_src[i].update(
                docs=len(by_src[i]),
                chars=sum(len(d.text) for d in by_src[i]),
                bytes=doc_bytes,
                repeat=round(factors[i], 6),
                train={"docs": len(train), "chars": sum(len(d.text) for d in train)},
                val={"docs": len(s["val"]), "chars": sum(len(d.text) for d in s["val"])},
            )
        done(f"{len(real['train']):,} train / {len(real['val']):,} val documents")

        # --- synthetic tasks, decontaminated like everything else
        done = stage("synthetic tasks")
        synth_report: dict[str, Any] = {"ratio": st["synthetic_ratio"], "seed": st["seed"]}
        synth: list[Document] = []
        if st["synthetic_ratio"]:
            real_chars = sum(len(d.text) for s in SPLITS for d in real[s])
            r = st["synthetic_ratio"]
            synth = synthetic_documents(int(real_chars * r / (1.0 - r)), st["seed"])
            n_before = len(synth)
            if index is not None:
                hits = index.find([d.text for d in synth])
                synth = [d for i, d in enumerate(synth) if i not in hits]
                decontam["synthetic_dropped"] = len(hits)
                decontam["dropped"] += len(hits)
            synth_report.update(docs=len(synth), chars=sum(len(d.text) for d in synth), generated=n_before)
        synth_split = split_documents(synth, st["val_fraction"]) if synth else {s: [] for s in SPLITS}
        splits = {s: interleave(real[s], synth_split[s]) for s in SPLITS}
        if st["max_train_chars"] is not None:
            order = sorted(range(len(splits["train"])), key=lambda k: (source_hash01(splits["train"][k].source), k))
            chosen, total = [], 0
            for k in order:
                if total >= st["max_train_chars"]:
                    break
                chosen.append(k)
                total += len(splits["train"][k].text)
            splits["train"] = [splits["train"][k] for k in sorted(chosen)]
        done(f"{len(synth):,} documents")

    desc = _describe(plan)
    if st["synthetic_ratio"]:
        desc += f" + {st['synthetic_ratio']:.0%} synthetic tasks (seed {st['seed']})"
    corpus = Corpus(splits, desc)
    corpus.stats = {
        s: {
            "docs": len(splits[s]),
            "chars": corpus.num_chars(s),
            "synthetic_docs": sum(d.source.startswith("synthetic/") for d in splits[s]),
        }
        for s in SPLITS
    }
    corpus.stats.update(
        spec=plan.spec,
        description=desc,
        settings=dict(st),
        sources=per_src,
        synthetic=synth_report,
        near_duplicates=near_report,
        decontamination=decontam,
        fingerprint=corpus.fingerprint,
        plan_key=plan.key,
        seconds={k: round(v, 3) for k, v in timings.items()},
    )
    return corpus


def load_corpus(
    data_path: str | Path | None = None,
    val_fraction: float = 0.05,
    synthetic_ratio: float = 0.1,
    seed: int = 0,
    include_tests: bool = False,
    max_train_chars: int | None = None,
    decontaminate: bool = True,
    near_dedup: bool = True,
    progress: bool = False,
) -> Corpus:
    """The training corpus of a data spec (``None``: the default spec) plus synthetic tasks.

    ``data_path`` is a spec (``"stdlib:1,site-packages:3,~/repo:1"``, see :mod:`nanochat.data.sources`) or one
    path. ``synthetic_ratio`` is the fraction of all characters that are synthetic (0 disables them);
    ``max_train_chars`` caps the train split for quick runs. See the module docstring for the steps.
    """
    plan = plan_corpus(
        data_path,
        val_fraction=val_fraction,
        synthetic_ratio=synthetic_ratio,
        seed=seed,
        include_tests=include_tests,
        max_train_chars=max_train_chars,
        decontaminate=decontaminate,
        near_dedup=near_dedup,
    )
    return build_corpus(plan, progress=progress)
