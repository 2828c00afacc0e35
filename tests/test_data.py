"""Tests of nanochat.data: tokenizer (against the GPT-2 byte map and regex), corpus reading and splitting,
synthetic tasks (executed), shards (against a plain concatenation), the loader (coverage, DDP disjointness,
exact resume), bits per byte, and prepare_data reuse."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nanochat.data import (
    SPECIAL_TOKENS,
    Document,
    ShardIndex,
    ShardInfo,
    Tokenizer,
    TokenLoader,
    bits_per_byte,
    bpb_sums,
    build_shards,
    iter_documents,
    load_corpus,
    prepare_data,
    split_documents,
    split_of,
    stdlib_documents,
    synthetic_tasks,
    token_dtype,
)
from nanochat.data.corpus import dedup, interleave
from nanochat.data.synthetic import TEMPLATES


# ------------------------------------------------------------------------------------------ helpers
def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py), written out independently."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


BYTE_OF = {c: b for b, c in gpt2_bytes_to_unicode().items()}
# GPT-2's pre-tokenizer regex with \p{L} -> [A-Za-z] and \p{N} -> [0-9]: identical on ASCII text
GPT2_ASCII_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")

SAMPLE_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i ** 2)  # squares\n",
    "Ünïcödé ✓ — 日本語のテキスト and emoji 🙂🚀\n",
    "x = {'key': [1, 2, 3], \"other\": None}\n",
    "class Foo(Bar):\n    '''Docstring.'''\n    pass\n",
]


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    texts = [d.text for d in itertools.islice(synthetic_tasks(0), 300)] + SAMPLE_TEXTS * 3
    return Tokenizer.train(texts, vocab_size=400)


# ------------------------------------------------------------------------------------------ tokenizer
def test_special_tokens_and_vocab(small_tok: Tokenizer) -> None:
    assert small_tok.vocab_size == 400
    assert [small_tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert small_tok.bos_id == 0 and small_tok.eos_id == 1
    # all 256 byte symbols are in the vocabulary (initial alphabet)
    vocab = small_tok.raw.get_vocab()
    assert all(ch in vocab for ch in gpt2_bytes_to_unicode().values())
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)


@pytest.mark.parametrize("text", SAMPLE_TEXTS + ["", " leading space", "trailing  \n\n", "\x00\x7f bytes"])
def test_round_trip_and_gpt2_byte_map(small_tok: Tokenizer, text: str) -> None:
    ids = small_tok.encode(text)
    assert small_tok.decode(ids) == text
    # independent decode: map every token's characters back through GPT-2's byte table
    raw = b"".join(bytes(BYTE_OF[ch] for ch in small_tok.id_to_token(i)) for i in ids)
    assert raw == text.encode("utf-8")
    # token_bytes sums to the UTF-8 length
    assert int(small_tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_pre_tokenizer_is_gpt2_regex_without_prefix_space(small_tok: Tokenizer) -> None:
    text = "def f(x):\n    return x+1  # it's 42's\n\n  \tif a<=b: pass   \n"
    pieces = [p for p, _ in small_tok.raw.pre_tokenizer.pre_tokenize_str(text)]
    decoded = [bytes(BYTE_OF[ch] for ch in p).decode("utf-8") for p in pieces]
    assert decoded == GPT2_ASCII_RE.findall(text)  # also: no space was prepended to the first piece


def test_special_text_is_not_a_control_token(small_tok: Tokenizer) -> None:
    text = "print('<|end|>') <|bos|>"
    ids = small_tok.encode(text)
    assert not set(ids) & set(small_tok.special_ids.values())
    assert small_tok.decode(ids) == text
    parsed = small_tok.encode(text, allow_special=True)
    assert small_tok.end_id in parsed and small_tok.bos_id in parsed
    assert small_tok.encode_batch([text, "a"]) == [ids, small_tok.encode("a")]


def test_token_bytes_specials_zero(small_tok: Tokenizer) -> None:
    tb = small_tok.token_bytes()
    assert tb.shape == (small_tok.vocab_size,)
    assert all(tb[i] == 0 for i in small_tok.special_ids.values())
    assert all(tb[i] == 1 for i in range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 256))
    assert tb.max() > 1


def test_save_load(tmp_path: Path, small_tok: Tokenizer) -> None:
    path = small_tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temp file left behind
    loaded = Tokenizer.load(tmp_path)
    assert loaded.hash == small_tok.hash
    for t in SAMPLE_TEXTS:
        assert loaded.encode(t) == small_tok.encode(t)
    data = json.loads(path.read_text())
    assert data["pre_tokenizer"]["type"] == "ByteLevel" and data["pre_tokenizer"]["add_prefix_space"] is False
    assert data["decoder"]["type"] == "ByteLevel"


def test_training_is_deterministic(small_tok: Tokenizer) -> None:
    texts = [d.text for d in itertools.islice(synthetic_tasks(0), 300)] + SAMPLE_TEXTS * 3
    assert Tokenizer.train(texts, vocab_size=400).hash == small_tok.hash


def test_render_chat(small_tok: Tokenizer) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Thanks <|end|>"},
    ]
    ids = small_tok.render_chat(msgs)
    s = small_tok.special_ids
    expected = [s["<|bos|>"]]
    for m in msgs:
        expected += [s[f"<|{m['role']}|>"]] + small_tok.encode(m["content"]) + [s["<|end|>"]]
    expected.append(s["<|assistant|>"])
    assert ids == expected
    assert small_tok.decode(ids).endswith("<|user|>Thanks <|end|><|end|><|assistant|>")
    ids2, mask = small_tok.render_conversation(msgs[:3])
    assert len(ids2) == len(mask)
    trained = [i for i, m in zip(ids2, mask, strict=True) if m]
    assert trained == small_tok.encode("5") + [s["<|end|>"]]
    with pytest.raises(ValueError, match="role"):
        small_tok.render_chat([{"role": "tool", "content": "x"}])


# ------------------------------------------------------------------------------------------ corpus
def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")


def test_stdlib_documents_fake_root(tmp_path: Path) -> None:
    write(tmp_path / "zeta.py", "z = 1\n")
    write(tmp_path / "alpha.py", "a = 1\n")
    write(tmp_path / "pkg" / "mod.py", "m = 1\n")
    write(tmp_path / "pkg" / "notes.txt", "not python\n")
    write(tmp_path / "test" / "test_x.py", "t = 1\n")
    write(tmp_path / "pkg" / "tests" / "t.py", "t = 2\n")
    write(tmp_path / "site-packages" / "third.py", "s = 1\n")
    write(tmp_path / "__pycache__" / "c.py", "c = 1\n")
    write(tmp_path / "latin1.py", "x = '\xe9'\n".encode("latin-1"))
    write(tmp_path / "empty.py", "")
    docs = list(stdlib_documents(root=tmp_path))
    assert [d.source for d in docs] == ["stdlib/alpha.py", "stdlib/pkg/mod.py", "stdlib/zeta.py"]
    assert docs[0].text == "a = 1\n" and docs[0].path == docs[0].source
    with_tests = [d.source for d in stdlib_documents(root=tmp_path, include_tests=True)]
    assert with_tests == ["stdlib/alpha.py", "stdlib/pkg/mod.py", "stdlib/pkg/tests/t.py", "stdlib/test/test_x.py",
                          "stdlib/zeta.py"]  # fmt: skip


def test_real_stdlib_is_found() -> None:
    docs = list(itertools.islice(stdlib_documents(), 50))
    assert len(docs) == 50
    assert all(d.source.endswith(".py") and "site-packages" not in d.source for d in docs)
    assert all("/test/" not in d.source and "/tests/" not in d.source for d in docs)
    assert [d.source for d in docs] == sorted(d.source for d in docs)


def test_iter_documents_directory_and_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write(root / "b.rs", "fn main() {}\n")
    write(root / "a.py", "print(1)\n")
    write(root / "docs" / "readme.md", "# hi\n")
    write(root / "docs" / "story.txt", "once upon a time\n")
    write(root / "set.jsonl", json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"content": "doc two"}) + "\n")
    write(root / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    write(root / "blob.py", b"\xff\xfe\x00bad")
    write(root / ".git" / "config.txt", "hidden\n")
    write(root / "node_modules" / "x.js", "skip\n")
    docs = list(iter_documents(root))
    assert [d.source for d in docs] == [
        "a.py",
        "b.rs",
        "docs/readme.md",
        "docs/story.txt",
        "set.jsonl:1",
        "set.jsonl:3",
    ]
    assert [d.text for d in docs][-2:] == ["doc one", "doc two"]
    single = list(iter_documents(root / "b.rs"))
    assert single == [Document("b.rs", "fn main() {}\n")]
    write(tmp_path / "bad.jsonl", '{"title": 1}\n')
    with pytest.raises(ValueError, match="text"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        list(iter_documents(tmp_path / "missing"))


def test_dedup_and_split() -> None:
    docs = [Document(f"f{i}.py", f"x = {i % 7}\n") for i in range(200)]
    uniq = dedup(docs)
    assert [d.source for d in uniq] == [f"f{i}.py" for i in range(7)]
    splits = split_documents(docs, 0.2)
    for d in docs:  # the split is sha1(source) as a fraction of 2**64, recomputed independently
        h = int(hashlib.sha1(d.source.encode()).hexdigest()[:16], 16) / 2**64
        assert (d in splits["val"]) == (h < 0.2)
    assert 20 < len(splits["val"]) < 60
    assert splits["train"] == [d for d in docs if d not in splits["val"]]  # order kept
    assert split_of("f1.py", 0.2) == ("val" if docs[1] in splits["val"] else "train")
    assert split_documents(docs, 0.0)["val"] == []
    two = [Document("a", "1"), Document("b", "2")]
    tiny = split_documents(two, 1e-9)
    assert len(tiny["val"]) == 1 and len(tiny["train"]) == 1  # never an empty val when it can be avoided


def test_interleave() -> None:
    docs = [Document(f"d{i}", "x") for i in range(10)]
    extra = [Document(f"e{i}", "y") for i in range(3)]
    out = interleave(docs, extra)
    assert len(out) == 13
    assert [d for d in out if d.source.startswith("d")] == docs
    assert [d for d in out if d.source.startswith("e")] == extra
    pos = [i for i, d in enumerate(out) if d.source.startswith("e")]
    assert pos[0] < 4 and pos[-1] > 8  # spread out, not bunched at one end


def test_load_corpus_with_synthetic_ratio(tmp_path: Path) -> None:
    for i in range(40):
        write(tmp_path / f"m{i:02d}.py", f"def f{i}(x):\n    return x * {i}\n" * 20)
    c = load_corpus(tmp_path, val_fraction=0.1, synthetic_ratio=0.25, seed=1)
    all_docs = c.splits["train"] + c.splits["val"]
    synth = sum(len(d.text) for d in all_docs if d.source.startswith("synthetic/"))
    total = sum(len(d.text) for d in all_docs)
    assert 0.24 < synth / total < 0.27
    assert c.stats["train"]["docs"] == len(c.splits["train"])
    assert load_corpus(tmp_path, val_fraction=0.1, synthetic_ratio=0.25, seed=1).fingerprint == c.fingerprint
    assert load_corpus(tmp_path, val_fraction=0.1, synthetic_ratio=0.25, seed=2).fingerprint != c.fingerprint
    capped = load_corpus(tmp_path, synthetic_ratio=0.0, max_train_chars=1000)
    assert capped.num_chars("train") < 1000 + 600 and not any(
        d.source.startswith("synthetic") for d in capped.splits["train"]
    )
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no documents"):
        load_corpus(tmp_path / "empty_dir", synthetic_ratio=0.0)


# ------------------------------------------------------------------------------------------ synthetic
def test_synthetic_tasks_execute_and_are_deterministic() -> None:
    names_seen: set[str] = set()
    docs = list(itertools.islice(synthetic_tasks(7), 1500))
    for d in docs:
        ns: dict[str, object] = {}
        exec(compile(d.text, d.source, "exec"), ns)  # every assert in the document must hold
        names_seen.update(k for k, v in ns.items() if callable(v) and not k.startswith("test_") and k != "__builtins__")
        assert '"""' in d.text and "assert " in d.text
    assert len(TEMPLATES) >= 40
    assert len(names_seen) >= 80  # randomised names over dozens of templates
    assert [d.text for d in itertools.islice(synthetic_tasks(7), 20)] == [d.text for d in docs[:20]]
    assert [d.text for d in itertools.islice(synthetic_tasks(8), 20)] != [d.text for d in docs[:20]]


def test_every_template_executes() -> None:
    import random

    from nanochat.data.synthetic import _Task

    r = random.Random(0)
    for tpl in TEMPLATES:
        for _ in range(30):
            task: _Task = tpl(r)
            exec(compile(task.render(r), tpl.__name__, "exec"), {})


# ------------------------------------------------------------------------------------------ shards
def tiny_docs() -> dict[str, list[Document]]:
    train = [Document(f"t{i}", t) for i, t in enumerate(SAMPLE_TEXTS * 4)]
    val = [Document("v0", "def val():\n    return 0\n"), Document("v1", "x = 1\n")]
    return {"train": train, "val": val}


def test_build_shards_matches_plain_concatenation(tmp_path: Path, small_tok: Tokenizer) -> None:
    docs = tiny_docs()
    index = build_shards(docs, small_tok, tmp_path, shard_tokens=64, progress=False)
    assert index.dtype == "uint16" and index.vocab_size == 400 and index.bos_id == small_tok.bos_id
    for split, ds in docs.items():
        expected = [t for d in ds for t in [small_tok.bos_id] + small_tok.encode(d.text)]
        arrays = index.open(split)
        assert all(a.dtype == np.uint16 for a in arrays)
        assert [len(a) for a in arrays[:-1]] == [64] * (len(arrays) - 1) and 0 < len(arrays[-1]) <= 64
        assert np.concatenate(arrays).tolist() == expected
        assert index.num_tokens(split) == len(expected) == index.stats[split]["tokens"]
    assert len(index.splits["train"]) > 2
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert on_disk["tokenizer_hash"] == small_tok.hash and on_disk["dtype"] == "uint16"
    assert ShardIndex.load(tmp_path).splits == index.splits
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_build_shards_reuses_and_rebuilds(tmp_path: Path, small_tok: Tokenizer) -> None:
    docs = tiny_docs()
    build_shards(docs, small_tok, tmp_path, shard_tokens=64, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = build_shards(docs, small_tok, tmp_path, shard_tokens=64, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp  # nothing rewritten
    # a different corpus rebuilds and removes shards the new index does not reference
    smaller = {"train": docs["train"][:3], "val": docs["val"]}
    idx2 = build_shards(smaller, small_tok, tmp_path, shard_tokens=64, progress=False)
    assert idx2.corpus_fingerprint != again.corpus_fingerprint
    files = sorted(p.name for p in tmp_path.glob("train_*.npy"))
    assert files == sorted(s.file for s in idx2.splits["train"])
    # a damaged shard is noticed and rebuilt
    victim = tmp_path / idx2.splits["train"][0].file
    victim.write_bytes(victim.read_bytes()[:-10])
    idx3 = build_shards(smaller, small_tok, tmp_path, shard_tokens=64, progress=False)
    expected = [t for d in smaller["train"] for t in [small_tok.bos_id] + small_tok.encode(d.text)]
    assert np.concatenate(idx3.open("train")).tolist() == expected
    assert idx3.files_ok()
    # another tokenizer rebuilds
    other = Tokenizer.train([d.text for d in docs["train"]], vocab_size=300)
    idx4 = build_shards(smaller, other, tmp_path, shard_tokens=64, progress=False)
    assert idx4.tokenizer_hash == other.hash and idx4.vocab_size == 300


def test_token_dtype() -> None:
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


# ------------------------------------------------------------------------------------------ loader
def arange_index(root: Path, shard_lengths: dict[str, list[int]]) -> ShardIndex:
    """An index whose tokens are 0, 1, 2, ... across each split's shards: a window identifies itself."""
    splits = {}
    for split, lengths in shard_lengths.items():
        infos, start = [], 0
        for i, n in enumerate(lengths):
            name = f"{split}_{i:05d}.npy"
            np.save(root / name, np.arange(start, start + n, dtype=np.uint32))
            infos.append(ShardInfo(name, n))
            start += n
        splits[split] = infos
    index = ShardIndex(root, "uint32", 1 << 20, 0, "tokhash", "fp", max(max(v) for v in shard_lengths.values()), splits)
    index.save()
    return index


def window_starts(x: torch.Tensor) -> list[int]:
    return [int(row[0]) for row in x]


def test_loader_batches_and_epoch_coverage(tmp_path: Path) -> None:
    index = arange_index(tmp_path, {"train": [100, 57, 33]})
    T, Bsz = 8, 3
    loader = TokenLoader(tmp_path, "train", batch_size=Bsz, seq_len=T, seed=5)
    # windows start at multiples of T inside each shard and need T+1 tokens
    starts_expected = sorted(off + k * T for off, n in ((0, 100), (100, 57), (157, 33)) for k in range((n - 1) // T))
    assert loader.num_windows == len(starts_expected) == 12 + 7 + 4
    seen = []
    for _ in range(loader.steps_per_epoch):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (Bsz, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # arange data: y is x shifted by one
        seen += window_starts(x)
    assert len(set(seen)) == len(seen) == loader.steps_per_epoch * Bsz  # no window twice in an epoch
    assert set(seen) <= set(starts_expected)
    assert loader.epoch == 0
    loader.next_batch()
    assert loader.epoch == 1
    ref = TokenLoader(index, "train", batch_size=Bsz, seq_len=T, seed=5)
    assert window_starts(ref.next_batch()[0]) == seen[:Bsz]  # deterministic from the seed
    other = TokenLoader(index, "train", batch_size=Bsz, seq_len=T, seed=6)
    assert window_starts(other.next_batch()[0]) != seen[:Bsz]
    plain = TokenLoader(index, "train", batch_size=Bsz, seq_len=T, shuffle=False)
    assert window_starts(plain.next_batch()[0]) == starts_expected[:Bsz]


def test_loader_ddp_ranks_are_disjoint_and_match_single_process(tmp_path: Path) -> None:
    arange_index(tmp_path, {"train": [400, 300]})
    W, Bsz, T = 3, 2, 16
    ranks = [TokenLoader(tmp_path, "train", Bsz, T, rank=r, world_size=W, seed=1) for r in range(W)]
    single = TokenLoader(tmp_path, "train", Bsz * W, T, seed=1)
    for _ in range(single.steps_per_epoch + 2):  # into the next epoch too
        xs = [ld.next_batch()[0] for ld in ranks]
        starts = [s for x in xs for s in window_starts(x)]
        assert len(set(starts)) == len(starts)
        assert torch.equal(torch.cat(xs), single.next_batch()[0])


def test_loader_resume_is_exact(tmp_path: Path) -> None:
    arange_index(tmp_path, {"train": [250]})
    a = TokenLoader(tmp_path, "train", 4, 8, seed=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON, as in a checkpoint
    rest = [a.next_batch() for _ in range(10)]  # crosses an epoch boundary (7 steps per epoch)
    b = TokenLoader(tmp_path, "train", 4, 8, seed=3)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(rest, (b.next_batch() for _ in range(10)), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert b.state_dict() == a.state_dict()
    wrong = TokenLoader(tmp_path, "train", 4, 6, seed=3)
    with pytest.raises(ValueError, match="seq_len"):
        wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(tmp_path, "train", 4, 8, seed=4).load_state_dict(state)


def test_iter_eval_is_deterministic_and_independent(tmp_path: Path) -> None:
    arange_index(tmp_path, {"train": [100], "val": [90]})
    ev = TokenLoader(tmp_path, "val", 2, 10, seed=9)
    first = [x for x, _ in ev.iter_eval()]
    assert len(first) == 4  # 8 windows of 10+1 tokens, 2 per batch
    assert [window_starts(x) for x in first] == [[0, 10], [20, 30], [40, 50], [60, 70]]
    ev.next_batch()
    assert [window_starts(x) for x, _ in ev.iter_eval(max_batches=2)] == [[0, 10], [20, 30]]
    r1 = TokenLoader(tmp_path, "val", 2, 10, rank=1, world_size=2)
    assert [window_starts(x) for x, _ in r1.iter_eval()] == [[20, 30], [60, 70]]


def test_loader_too_small_is_a_clear_error(tmp_path: Path) -> None:
    arange_index(tmp_path, {"train": [50]})
    with pytest.raises(ValueError, match="too small for one batch"):
        TokenLoader(tmp_path, "train", batch_size=8, seq_len=16)
    with pytest.raises(KeyError, match="val"):
        TokenLoader(tmp_path, "val", batch_size=1, seq_len=4)


def test_loader_on_built_shards(tmp_path: Path, small_tok: Tokenizer) -> None:
    docs = tiny_docs()
    index = build_shards(docs, small_tok, tmp_path, shard_tokens=128, progress=False)
    stream = [np.asarray(a, dtype=np.int64) for a in index.open("train")]
    loader = TokenLoader(index, "train", batch_size=2, seq_len=16, seed=0)
    x, y = loader.next_batch()
    for row_x, row_y in zip(x, y, strict=True):
        w = torch.cat([row_x, row_y[-1:]]).numpy()
        assert any(s % 16 == 0 and np.array_equal(a[s : s + 17], w) for a in stream for s in range(0, len(a) - 16, 16))


# ------------------------------------------------------------------------------------------ bits per byte
def test_bits_per_byte(small_tok: Tokenizer) -> None:
    assert bits_per_byte(10 * math.log(2), 10) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
    text = "def f(x):\n    return x\n"
    ids = [small_tok.bos_id] + small_tok.encode(text) + [small_tok.bos_id] + small_tok.encode("y = 2\n")
    targets = torch.tensor(ids[1:]).view(1, -1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, targets.shape[1], small_tok.vocab_size, generator=g)
    losses = torch.nn.functional.cross_entropy(
        logits.view(-1, small_tok.vocab_size), targets.view(-1), reduction="none"
    )
    nats, nbytes = bpb_sums(losses.view(1, -1), targets, small_tok.token_bytes())
    assert nbytes == len(text.encode()) + len(b"y = 2\n")  # the bos target is left out
    keep = targets.view(-1) != small_tok.bos_id
    assert nats == pytest.approx(float(losses[keep].sum()))


# ------------------------------------------------------------------------------------------ prepare_data
def test_prepare_data_trains_then_reuses(tmp_path: Path) -> None:
    data = tmp_path / "src"
    for i in range(30):
        write(data / f"mod{i:02d}.py", f"def func_{i}(value):\n    return value + {i}\n" * 10)
    out = tmp_path / "prepared"
    kw = dict(data_path=data, synthetic_ratio=0.2, val_fraction=0.1, progress=False)
    tok, index = prepare_data(out, 300, **kw)
    cache = index.root  # one directory per (corpus, vocab, settings) under the root
    assert cache.parent == out and cache.name.startswith(f"{index.corpus_fingerprint[:12]}-v300-")
    assert tok.vocab_size == 300 and (cache / "tokenizer.json").exists() and (cache / "data.json").exists()
    assert index.tokenizer_hash == tok.hash and index.num_tokens("train") > 0 and index.num_tokens("val") > 0
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    tok2, index2 = prepare_data(out, 300, **kw)
    assert tok2.hash == tok.hash and index2.corpus_fingerprint == index.corpus_fingerprint and index2.root == cache
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    tok3, index3 = prepare_data(out, 320, **kw)
    assert tok3.vocab_size == 320 and index3.root != cache and Tokenizer.load(index3.root).hash == tok3.hash
    assert ShardIndex.load(index3.root).tokenizer_hash == tok3.hash
    # switching back to 300 reuses the first directory: nothing was overwritten
    tok4, index4 = prepare_data(out, 300, **kw)
    assert tok4.hash == tok.hash and index4.root == cache
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == {p: m for p, m in stamp.items() if cache in p.parents}


@pytest.mark.slow
def test_prepare_data_stdlib(tmp_path: Path) -> None:
    tok, index = prepare_data(tmp_path, 4096, data_path="stdlib", max_train_chars=2_000_000, progress=False)
    assert index.stats["train"]["chars"] >= 2_000_000 and index.num_tokens("val") > 10_000
    chars_per_token = index.stats["train"]["chars"] / index.num_tokens("train")
    assert 2.5 < chars_per_token < 6  # a trained code BPE, not bytes
    loader = TokenLoader(index, "train", batch_size=4, seq_len=256)
    x, _ = loader.next_batch()
    assert x.max() < tok.vocab_size
    assert os.path.exists(index.root / "tokenizer.meta.json")
