"""Tests of the corpus at scale: data specs and sources (environment filters, shards with a text field), exact
and near duplicates (against brute-force Jaccard), HumanEval decontamination (planted solution, 12- vs 13-gram,
hashing against plain Python n-grams), source weights (against the resampling rule recomputed by hand), per-source
stats, and the prepare_data cache (per vocabulary, and a warm call that opens no corpus file)."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import string
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import nanochat.data.sources as sources_mod
from nanochat.data import Document, Tokenizer, data_report, load_corpus, near_duplicates, parse_spec, prepare_data
from nanochat.data.corpus import resample, source_hash01
from nanochat.data.decontam import NGRAM, NgramIndex, humaneval_index, humaneval_references, word_hashes, words
from nanochat.data.prepare import parallelism_note
from nanochat.data.sources import DEFAULT_SPEC, iter_documents, list_files, quality_issue, read_listing

VOCAB = ["alpha", "beta", "gamma", "delta", "value", "items", "index", "result", "count", "total", "node", "left"]


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def code(seed: int, n_funcs: int = 6) -> str:
    """A plausible, unique Python module (random names and constants), so no two are near duplicates."""
    r = random.Random(seed)
    out = []
    for i in range(n_funcs):
        a, b, c = (f"{r.choice(VOCAB)}_{''.join(r.choices(string.ascii_lowercase, k=6))}" for _ in range(3))
        out.append(
            f"def {a}_{i}({b}, {c}):\n    '''Combine {b} with {c}.'''\n"
            f"    if {b} > {r.randrange(1000)}:\n        return {b} * {c} + {r.randrange(1000)}\n"
            f"    return [{c} for _ in range({b})]\n"
        )
    return "\n\n".join(out)


def jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of k-word shingle sets, in plain Python."""
    sa = {tuple(words(a)[i : i + k]) for i in range(len(words(a)) - k + 1)}
    sb = {tuple(words(b)[i : i + k]) for i in range(len(words(b)) - k + 1)}
    return len(sa & sb) / len(sa | sb)


# ------------------------------------------------------------------------------------------ spec
def test_parse_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    repo = tmp_path / "my-repo"
    write(repo / "a.py", "x = 1\n")
    write(tmp_path / "d.jsonl", "")
    srcs = parse_spec("stdlib:1,site-packages:3,~/my-repo:0.5")
    assert [(s.kind, s.label, s.weight) for s in srcs] == [
        ("stdlib", "stdlib", 1.0),
        ("site-packages", "site-packages", 3.0),
        ("path", "~/my-repo", 0.5),
    ]
    assert srcs[2].roots == (repo,)
    (f,) = parse_spec(f"{tmp_path}/d.jsonl:content")
    assert f.roots == (tmp_path / "d.jsonl",) and f.text_field == "content" and f.weight is None
    (g,) = parse_spec(f"{tmp_path}/d.jsonl:content:2")
    assert g.text_field == "content" and g.weight == 2.0
    assert [(s.kind, s.weight) for s in parse_spec(None)] == [("stdlib", 1), ("site-packages", 14), ("functions", 5)]
    assert DEFAULT_SPEC == "stdlib:1,site-packages:14,functions:5"
    (p,) = parse_spec(repo)  # a PathLike is one path
    assert p.roots == (repo,)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_spec("stdlib,~/nowhere")
    with pytest.raises(ValueError, match="weight must be > 0"):
        parse_spec("stdlib:0")
    with pytest.raises(ValueError, match="twice"):
        parse_spec("stdlib,stdlib:2")
    with pytest.raises(ValueError, match="empty entry"):
        parse_spec("stdlib,,site-packages")


def test_real_site_packages_listing() -> None:
    (src,) = parse_spec("site-packages")
    listing = list_files(src)
    names = [f.name for f in listing.files]
    assert any(n.startswith("site-packages/numpy/") for n in names)
    assert not any("/tests/" in n or "/test/" in n or n.rsplit("/", 1)[-1].startswith("test_") for n in names)
    assert all(n.endswith(".py") and f.size <= 1_000_000 for n, f in zip(names, listing.files))


# ------------------------------------------------------------------------------------------ functions
MODULE = (
    '"""A module."""\nimport os\n\nCONST = 3\n\n\n'
    '@cache\ndef add_one(a: int) -> int:\n    """Add one."""\n    return a + 1\n\n\n'
    'def split_sig(\n    x: int,\n) -> int:\n    """A signature over three lines, a comment at column 0."""\n'
    "    y = x * 2\n# column-0 comment inside the body\n    return y\n\n\n"
    "def no_doc(x):\n    return x\n\n\n"
    'def doc_only():\n    """Nothing else."""\n\n\n'
    'def too_long(x):\n    """Fifteen lines of code are the limit."""\n' + "    x += 1\n" * 15 + "    return x\n\n\n"
    'class Box:\n    def method(self):\n        """Methods are not standalone."""\n        return 1\n\n\n'
    "async def fetch(url):\n    '''Single-quoted docstring.'''\n    return await get(url)\n"
    "TEXT = \"\"\"\ndef inside_a_string():\n    '''x'''\n    return 1\n\"\"\"\n"
)


def brute_force_functions(text: str, max_body_lines: int) -> list[tuple[str, str]]:
    """The same selection by ``ast`` over the whole module: (name, source without decorators or column-0 comments)
    of each top-level function with a docstring and 1 to ``max_body_lines`` lines of code after it."""
    import ast

    lines = text.splitlines(keepends=True)
    out = []
    for fn in ast.parse(text).body:
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and len(fn.body) >= 2 and ast.get_docstring(fn):
            if 1 <= (fn.end_lineno or 0) - fn.body[1].lineno + 1 <= max_body_lines:
                body = [ln for ln in lines[fn.lineno - 1 : fn.end_lineno] if not ln.startswith("#")]
                out.append((fn.name, "".join(body)))
    return out


def test_function_documents_match_an_ast_walk() -> None:
    from nanochat.data.sources import FUNCTION_MAX_BODY_LINES, function_documents

    docs = list(function_documents(MODULE, "stdlib/mod.py"))
    got = [(d.source.rsplit(":", 1)[1], d.text.replace("# column-0 comment inside the body\n", "")) for d in docs]
    assert got == brute_force_functions(MODULE, FUNCTION_MAX_BODY_LINES)
    assert [n for n, _ in got] == ["add_one", "split_sig", "fetch"]  # too_long has 16 lines of code
    assert all(
        d.source == f"functions/stdlib/mod.py:{n}" and d.group == "stdlib/mod.py" for d, (n, _) in zip(docs, got)
    )
    assert [d.split_key for d in docs] == ["stdlib/mod.py"] * 3
    assert len(list(function_documents(MODULE, "m", max_body_lines=16))) == 4  # now too_long too
    assert "# column-0 comment" in docs[1].text and docs[0].text.startswith("def add_one")
    assert list(function_documents("def broken(:\n    '''x'''\n    return 1\n", "m")) == []


def test_functions_source_splits_with_its_files_and_trains_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    std, sp = tmp_path / "lib", tmp_path / "site-packages"
    for i in range(30):
        write(std / f"s{i:02d}.py", code(600 + i))
        write(sp / "pkg" / f"p{i:02d}.py", code(700 + i))
    write(sp / "pkg" / "_gen.py", "# This file is auto-generated. Do not edit.\n" + code(5))
    monkeypatch.setattr(sources_mod, "stdlib_root", lambda: std)
    monkeypatch.setattr(sources_mod, "site_packages_roots", lambda: [sp])
    (fsrc,) = parse_spec("functions")
    assert fsrc.roots == (std, sp) and fsrc.is_env
    names = sorted(f.name for f in list_files(fsrc).files)
    assert names == sorted(f.name for s in parse_spec("stdlib,site-packages") for f in list_files(s).files)
    corpus = load_corpus("stdlib:1,site-packages:1,functions:1", val_fraction=0.2, synthetic_ratio=0.0)
    plain = load_corpus("stdlib,site-packages", val_fraction=0.2, synthetic_ratio=0.0)
    assert corpus.splits["val"] == plain.splits["val"]  # held-out text is the files, as without functions
    val_files = {d.source for d in plain.splits["val"]}
    funcs = [d for d in corpus.splits["train"] if d.source.startswith("functions/")]
    assert val_files and funcs and {d.group for d in funcs}.isdisjoint(val_files)  # no held-out file's code trained on
    train_files = {d.source for d in plain.splits["train"]}
    assert {d.group for d in funcs} == train_files  # every training file gives its functions; generated ones none
    assert "site-packages/pkg/_gen.py" not in train_files | val_files
    stats = {s["label"]: s for s in corpus.stats["sources"]}
    assert stats["functions"]["val"]["docs"] == 0 and stats["functions"]["docs"] == 6 * 60
    total = sum(s["train"]["chars"] for s in stats.values())
    assert abs(stats["functions"]["train"]["chars"] / total - 1 / 3) < 0.05


# ------------------------------------------------------------------------------------------ sources
def test_environment_filters_on_a_fake_site_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = tmp_path / "site-packages"
    write(sp / "pkg" / "core.py", code(1))
    write(sp / "pkg" / "tests" / "test_core.py", code(2))
    write(sp / "pkg" / "test_inline.py", code(3))
    write(sp / "pkg" / "conftest.py", code(4))
    write(sp / "pkg" / "_big.py", "x = 1\n" * 200_000)  # 1.2 MB
    write(sp / "pkg" / "_gen.py", "# This file is auto-generated. Do not edit.\n" + code(5))
    write(sp / "pkg" / "_table.py", "TABLE = [\n" + "".join(f"    {i * 7919 % 100003},\n" for i in range(2000)) + "]\n")
    write(sp / "pkg" / "_minified.py", "x = '" + "a" * 2000 + "'\n")
    write(sp / "pkg" / "_latin1.py", "s = '\xe9'\n".encode("latin-1"))
    write(sp / "pkg" / "__pycache__" / "core.py", code(6))
    write(sp / "pkg" / "data.txt", "not python\n")
    monkeypatch.setattr(sources_mod, "site_packages_roots", lambda: [sp])
    (src,) = parse_spec("site-packages")
    listing = list_files(src)
    assert [f.name for f in listing.files] == [
        "site-packages/pkg/_gen.py",
        "site-packages/pkg/_latin1.py",
        "site-packages/pkg/_minified.py",
        "site-packages/pkg/_table.py",
        "site-packages/pkg/core.py",
    ]
    assert listing.skipped == Counter(too_large=1)
    counts: Counter[str] = Counter()
    docs = list(read_listing(listing, counts))
    assert [d.source for d in docs] == ["site-packages/pkg/core.py"]
    assert counts == Counter(files=5, generated=1, unreadable=1, long_lines=1, data=1)
    # a user directory is taken as given: the same files stay
    assert {"_big.py", "_gen.py", "_minified.py", "_table.py"} <= {d.source for d in iter_documents(sp / "pkg")}


@pytest.mark.parametrize("seed", range(20))
def test_quality_issue_matches_plain_python(seed: int) -> None:
    r = random.Random(seed)
    alphabet = r.choice(["abc xyz_\n", "0123456789,\n", "()[]{}:;=+ \n", "abc 123 (x)\n"])
    text = "".join(r.choice(alphabet) for _ in range(r.randrange(50, 3000)))
    lines = text.split("\n")
    n = len(text)
    digits = sum(c.isdigit() for c in text)
    alnum = sum(c.isascii() and c.isalnum() for c in text)
    expected = (
        "data"
        if digits > 0.25 * n or alnum < 0.25 * n
        else "long_lines"
        if n > 100 * len(lines) or max(map(len, lines)) > 1000
        else None
    )
    assert quality_issue(text.encode()) == expected


def test_shards_with_a_text_field(tmp_path: Path) -> None:
    rows = [{"content": code(i), "lang": "python"} for i in range(3)] + [{"content": "", "lang": ""}]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": "print(1)\n"}) + "\n\n" + json.dumps({"content": "print(2)\n"}) + "\n")
    docs = list(iter_documents(tmp_path))
    assert [d.source for d in docs] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "b.jsonl.gz:1", "b.jsonl.gz:3"]
    assert docs[0].text == rows[0]["content"] and docs[-1].text == "print(2)\n"
    c = load_corpus(f"{tmp_path}/a.jsonl:lang", val_fraction=0.0, synthetic_ratio=0.0, near_dedup=False)
    assert {d.text for d in c.splits["train"]} == {"python"}  # the named field, deduplicated to one document
    with pytest.raises(ValueError, match="no field 'code'"):
        load_corpus(f"{tmp_path}/a.jsonl:code", synthetic_ratio=0.0)
    write(tmp_path / "bad" / "c.jsonl.gz", b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        list(iter_documents(tmp_path / "bad"))


def test_parquet_needs_pyarrow_or_reads_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "part.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": [code(1), None, code(2)], "n": [1, 2, 3]}), path)
        docs = list(iter_documents(f"{path}"))
        assert [d.source for d in docs] == ["part.parquet:1", "part.parquet:3"] and docs[1].text == code(2)
    except ImportError:
        write(path, b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(iter_documents(path))


def test_unreadable_or_empty_sources_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no documents: no files to read"):
        load_corpus(tmp_path / "empty", synthetic_ratio=0.0)
    write(tmp_path / "binary" / "a.py", b"\x00\x01\x02")
    write(tmp_path / "binary" / "b.txt", b"\xff\xfe bad")
    with pytest.raises(ValueError, match=r"'.*binary' has no documents: 2 files read \(2 unreadable\)"):
        load_corpus(tmp_path / "binary", synthetic_ratio=0.0)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_corpus(tmp_path / "binary" / "b.txt", synthetic_ratio=0.0)


# ------------------------------------------------------------------------------------------ decontamination
def test_word_hashes_agree_with_python_words() -> None:
    r = random.Random(0)
    pieces = ["def", "f_1", "x", "é", "日本", "🙂", "a" * 20, "a" * 19 + "b", "b" + "a" * 19, "_", "9", "(", " ", "\n"]
    for _ in range(50):
        text = "".join(r.choice(pieces) + r.choice(["", " ", "+", "\t"]) for _ in range(r.randrange(1, 60)))
        w = words(text)
        h, starts = word_hashes(np.frombuffer(text.encode(), dtype=np.uint8))
        assert len(h) == len(w)
        by_word: dict[str, int] = {}
        for word, hv in zip(w, h.tolist()):
            assert by_word.setdefault(word, hv) == hv  # equal words, equal hashes
        assert len(set(by_word.values())) == len(by_word)  # distinct words, distinct hashes
        assert [text.encode()[s:].decode(errors="ignore")[: len(x)] for s, x in zip(starts.tolist(), w)] == w


def test_ngram_index_matches_brute_force() -> None:
    r = random.Random(1)
    refs = {f"r{i}": " ".join(r.choice(VOCAB[:5]) for _ in range(40)) for i in range(5)}
    index = NgramIndex(refs, n=6)
    ref_grams = {tuple(words(t)[j : j + 6]) for t in refs.values() for j in range(35)}
    texts = [" ".join(r.choice(VOCAB[:6]) for _ in range(r.randrange(3, 30))) for _ in range(300)]
    texts.append("alpha beta gamma\nalpha beta gamma")  # a run never spans two texts: see the next check
    expected = {
        i for i, t in enumerate(texts) if any(tuple(words(t)[j : j + 6]) in ref_grams for j in range(len(words(t))))
    }
    found = index.find(texts)
    assert set(found) == expected and 0 < len(expected) < len(texts)
    assert index.candidates(texts) >= expected
    for i, m in found.items():
        assert tuple(m.ngram.split()) in ref_grams and m.ngram in " ".join(words(texts[i]))
    split = NgramIndex({"r": "a b c d e f"}, n=6)
    assert split.find(["a b c", "d e f", "a b c d e f"]).keys() == {2}
    assert split.candidates(["a b c", "d e f"]) == set()  # even the hashes never join two texts


def test_planted_humaneval_solution_is_removed(tmp_path: Path) -> None:
    refs = humaneval_references()
    assert len(refs) == 164 and len(humaneval_index()) > 10_000
    ref = refs["HumanEval/12"]
    ref_words = words(ref)
    normal = code(7)
    write(tmp_path / "normal.py", normal)
    write(tmp_path / "planted.py", code(8) + "\n\n" + ref + "\n\n" + code(9))
    # twelve consecutive words of a solution, surrounded by words HumanEval never uses: stays
    twelve = " ".join(ref_words[20:32])
    thirteen = " ".join(ref_words[20:33])
    write(tmp_path / "twelve.py", f"qqzx = '''{twelve}'''\nvvkw = 1\n" + code(10))
    write(tmp_path / "thirteen.py", f"qqzx = '''{thirteen}'''\nvvkw = 1\n" + code(11))
    c = load_corpus(tmp_path, val_fraction=0.0, synthetic_ratio=0.0)
    kept = {d.source for d in c.splits["train"]}
    assert kept == {"normal.py", "twelve.py"}
    report = c.stats["decontamination"]
    assert report["dropped"] == 2 and c.stats["sources"][0]["dropped"]["decontaminated"] == 2
    assert {(d["source"], d["task_id"]) for d in report["documents"]} == {
        ("planted.py", "HumanEval/12"),
        ("thirteen.py", "HumanEval/12"),
    }
    assert all(len(d["ngram"].split()) == NGRAM and d["ngram"] in " ".join(ref_words) for d in report["documents"])
    off = load_corpus(tmp_path, val_fraction=0.0, synthetic_ratio=0.0, decontaminate=False)
    assert len(off.splits["train"]) == 4


def test_synthetic_documents_are_decontaminated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = Document("synthetic/0/0000000.py", humaneval_references()["HumanEval/2"])
    clean = [Document(f"synthetic/0/{i:07d}.py", code(900 + i)) for i in range(1, 4)]
    monkeypatch.setattr("nanochat.data.synthetic.synthetic_documents", lambda n, seed: [planted, *clean])
    write(tmp_path / "m.py", code(950))
    c = load_corpus(tmp_path, val_fraction=0.0, synthetic_ratio=0.5)
    assert [d.source for d in c.splits["train"] if d.source.startswith("synthetic/")] == [d.source for d in clean]
    report = c.stats["decontamination"]
    assert report["synthetic_dropped"] == 1 and report["dropped"] == 1
    assert c.stats["synthetic"] == {"ratio": 0.5, "seed": 0, "docs": 3, "chars": sum(len(d.text) for d in clean),
                                    "generated": 4}  # fmt: skip


# ------------------------------------------------------------------------------------------ duplicates
def vendored(text: str) -> str:
    """A vendored copy: imports rewritten and one function edited, as pip/_vendor does."""
    lines = text.splitlines()
    lines[3] = lines[3].replace("return", "return  0 +")
    return "from pip._vendor import six\n" + "\n".join(lines) + "\n"


def test_near_duplicates_against_exact_jaccard() -> None:
    base = [code(100 + i, n_funcs=12) for i in range(30)]
    texts = base + [vendored(base[3]), vendored(base[17]), base[5][: len(base[5]) // 2]]
    near = near_duplicates(texts)
    assert set(near) == {30, 31}  # the half copy has Jaccard ~0.5: kept
    assert near[30][0] == 3 and near[31][0] == 17
    for j, (i, est) in near.items():
        assert abs(est - jaccard(texts[i], texts[j])) < 0.15  # MinHash with 64 permutations: sd ~0.05
    assert jaccard(texts[5], texts[32]) < 0.6
    assert all(jaccard(base[i], base[i + 1]) < 0.2 for i in range(29))


def test_duplicates_counted_per_source(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(8):
        write(a / f"m{i}.py", code(200 + i))
    write(b / "copy.py", code(200))  # exact copy of a/m0.py
    write(b / "_vendor" / "m1.py", vendored(code(201)))  # near copy of a/m1.py
    write(b / "own.py", code(300))
    c = load_corpus(f"{a},{b}", val_fraction=0.0, synthetic_ratio=0.0)
    sa, sb = c.stats["sources"]
    assert sa["dropped"] == {"duplicate": 0, "near_duplicate": 0, "decontaminated": 0} and sa["docs"] == 8
    assert sb["dropped"] == {"duplicate": 1, "near_duplicate": 1, "decontaminated": 0} and sb["docs"] == 1
    assert sb["files"] == 3 and sb["bytes"] == len(code(300).encode()) and sb["chars"] == len(code(300))
    assert sa["bytes_listed"] == sum(len(code(200 + i).encode()) for i in range(8))
    assert [p["dropped"] for p in c.stats["near_duplicates"]["pairs"]] == ["_vendor/m1.py"]
    assert [d.source for d in c.splits["train"]][-1] == "own.py"


# ------------------------------------------------------------------------------------------ weights
def test_resample_rule() -> None:
    docs = [Document(f"d{i}", "x") for i in range(200)]
    out = resample(docs, 2.3, salt="s")
    counts = Counter(d.source for d in out)
    for d in docs:  # recomputed independently: sha1(salt \0 source) as a fraction of 2**64
        h = int(hashlib.sha1(f"s\0{d.source}".encode()).hexdigest()[:16], 16) / 2**64
        assert counts[d.source] == 2 + (h < 0.3)
    assert 50 < len(out) - 400 < 70
    assert resample(docs, 1.0) == docs and resample(docs, 0.0) == []


def test_weights_set_shares_of_training_chars(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(40):
        write(a / f"a{i:02d}.py", code(400 + i))
    for i in range(80):
        write(b / f"b{i:02d}.py", code(500 + i))
    natural = load_corpus(f"{a},{b}", val_fraction=0.1, synthetic_ratio=0.0)
    mixed = load_corpus(f"{a}:3,{b}:1", val_fraction=0.1, synthetic_ratio=0.0)
    na, nb = (s["train"]["chars"] for s in natural.stats["sources"])
    ma, mb = (s["train"]["chars"] for s in mixed.stats["sources"])
    assert abs(ma / (ma + mb) - 0.75) < 0.05  # a is 1/3 of the natural chars, 3/4 after weighting
    assert abs((ma + mb) / (na + nb) - 1) < 0.05  # the total stays the natural total
    fa = mixed.stats["sources"][0]["repeat"]
    assert fa == pytest.approx(0.75 * (na + nb) / na, rel=1e-5) and fa > 2
    assert mixed.splits["val"] == natural.splits["val"]  # val is never reweighted
    a_train = [d for d in natural.splits["train"] if d.source.startswith("a")]
    expected = resample(a_train, fa, salt="mix0")
    assert [d.source for d in mixed.splits["train"] if d.source.startswith("a")] == [d.source for d in expected]
    again = load_corpus(f"{a}:3,{b}:1", val_fraction=0.1, synthetic_ratio=0.0)
    assert again.fingerprint == mixed.fingerprint != natural.fingerprint


def test_max_train_chars_samples_the_whole_corpus(tmp_path: Path) -> None:
    for i in range(60):
        write(tmp_path / f"m{i:02d}.py", code(600 + i))
    c = load_corpus(tmp_path, val_fraction=0.0, synthetic_ratio=0.0, max_train_chars=20 * len(code(600)))
    names = [d.source for d in c.splits["train"]]
    assert names == sorted(names) and 15 <= len(names) <= 25
    assert names[-1] > "m40"  # not only the first files in path order
    assert (
        sorted(names, key=source_hash01) == sorted((f"m{i:02d}.py" for i in range(60)), key=source_hash01)[: len(names)]
    )


# ------------------------------------------------------------------------------------------ prepare_data
def test_prepare_data_warm_call_reads_nothing_and_records_the_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    for i in range(20):
        write(src / f"m{i:02d}.py", code(700 + i))
    write(src / "planted.py", humaneval_references()["HumanEval/3"])
    out = tmp_path / "cache"
    tok, index = prepare_data(out, 300, data_path=src, synthetic_ratio=0.0, val_fraction=0.1, progress=False)
    report = data_report(index.root)
    (s,) = report["corpus"]["sources"]
    assert s["files"] == 21 and s["docs"] == 20 and s["dropped"]["decontaminated"] == 1
    assert report["fingerprint"] == index.corpus_fingerprint
    assert report["tokens"] == {"train": index.num_tokens("train"), "val": index.num_tokens("val")}
    assert report["corpus"]["decontamination"]["documents"][0]["source"] == "planted.py"
    assert len(list((out / "corpus").glob("*.json"))) == 1

    def no_reading(*a: object, **k: object) -> None:
        raise AssertionError("the warm path read a corpus file")

    with monkeypatch.context() as m:
        m.setattr(sources_mod, "read_listing", no_reading)
        m.setattr("nanochat.data.corpus.read_listing", no_reading)
        tok2, index2 = prepare_data(out, 300, data_path=src, synthetic_ratio=0.0, val_fraction=0.1, progress=False)
    assert tok2.hash == tok.hash and index2.root == index.root

    # touching a file re-reads the corpus; the same content keeps the tokenizer and shards
    stamp = {p.name: p.stat().st_mtime_ns for p in index.root.iterdir()}
    (src / "m00.py").write_text(code(700), encoding="utf-8")
    tok3, index3 = prepare_data(out, 300, data_path=src, synthetic_ratio=0.0, val_fraction=0.1, progress=False)
    assert index3.root == index.root and tok3.hash == tok.hash
    assert {p.name: p.stat().st_mtime_ns for p in index.root.iterdir() if p.name != "data.json"} == {
        k: v for k, v in stamp.items() if k != "data.json"
    }
    # new content: a new fingerprint and a new directory; the old one stays
    write(src / "m99.py", code(799))
    _, index4 = prepare_data(out, 300, data_path=src, synthetic_ratio=0.0, val_fraction=0.1, progress=False)
    assert index4.root != index.root and index4.corpus_fingerprint != index.corpus_fingerprint
    assert (index.root / "index.json").exists()
    assert Tokenizer.load(index4.root).vocab_size == 300


def test_prepare_data_progress_and_parallelism(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(10):
        write(tmp_path / "src" / f"m{i}.py", code(800 + i))
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.delenv("RAYON_RS_NUM_CPUS", raising=False)
    assert parallelism_note() is None
    prepare_data(tmp_path / "out", 300, data_path=tmp_path / "src", synthetic_ratio=0.0, progress=True)
    assert "tokenizer" in capsys.readouterr().out
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert "one thread" in (parallelism_note() or "")
