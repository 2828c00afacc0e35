"""Fill-in-the-middle: sentinel tokens (and tokenizers saved before them), the StarCoder PSM/SPM transform (checked by
an independent parser of the token stream), its rates against binomial tolerances, shards (plain validation split,
rate 0 identical to a plain concatenation, the cache key), the GGUF keys llama.cpp's /infill reads (read back with
gguf's own reader) and ``nanochat-sample --prefix/--suffix``."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanochat.data import Document, build_shards
from nanochat.data.fim import (
    FimConfig,
    FimUnavailableError,
    Piece,
    chunk_chars_for,
    chunk_lines,
    encode_plans,
    infill_prompt,
    middle_stop_ids,
    plan_document,
)
from nanochat.data.tokenizer import FIM_TOKENS, REQUIRED_SPECIAL_TOKENS, SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "print('héllo wörld 🙂')\n",
    "class Foo:\n    pass\n",
    "for i in range(10):\n\tx = {'k': [i, i ** 2]}\n",
] * 30


def random_doc(rng: random.Random, n_lines: int) -> str:
    """Code-like lines of varied length, some non-ASCII, some empty, one sometimes very long."""
    words = ["def", "return", "x", "self", "élan", "🙂", "(", ")", ":", "=", "+", "'s'", "1.5", "日本"]
    lines = []
    for _ in range(n_lines):
        k = rng.choice([0, 1, 3, 6, 12, 40 if rng.random() < 0.05 else 8])
        lines.append(" " * rng.choice([0, 4, 8]) + " ".join(rng.choice(words) for _ in range(k)))
    return "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 400)


def train_pre_fim_tokenizer(texts: list[str], vocab_size: int) -> HFTokenizer:
    """A tokenizer as ``Tokenizer.train`` made it before FIM existed: the seven chat/document specials only."""
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(REQUIRED_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    return raw


@pytest.fixture(scope="module")
def old_tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("oldtok") / "tokenizer.json"
    path.write_text(train_pre_fim_tokenizer(TEXTS, 400).to_str(), encoding="utf-8")
    return Tokenizer.load(path)


def parse_fim_stream(tok: Tokenizer, ids: list[int]) -> tuple[str, dict[str, int]]:
    """Reference decoder of one document's ids (no bos): plain runs, ``P pre S suf M mid E`` (PSM) and
    ``P S suf M pre+mid E`` (SPM) back to the original text; counts the examples of each order."""
    P, S, M = tok.fim_ids() or (-1, -1, -1)
    E = tok.eos_id
    out, counts, i = [], {"psm": 0, "spm": 0}, 0

    def until(j: int, stop: int) -> int:
        k = ids.index(stop, j)
        assert not {P, S, M, E, tok.bos_id} & set(ids[j:k]), "a sentinel inside a FIM part"
        return k

    while i < len(ids):
        if ids[i] == P and ids[i + 1] == S:  # SPM
            k = until(i + 2, M)
            suf = ids[i + 2 : k]
            e = until(k + 1, E)
            out += [tok.decode(ids[k + 1 : e]), tok.decode(suf)]
            counts["spm"] += 1
            i = e + 1
        elif ids[i] == P:  # PSM
            s = until(i + 1, S)
            m = until(s + 1, M)
            e = until(m + 1, E)
            out += [tok.decode(ids[i + 1 : s]), tok.decode(ids[m + 1 : e]), tok.decode(ids[s + 1 : m])]
            counts["psm"] += 1
            i = e + 1
        else:
            j = ids.index(P, i) if P in ids[i:] else len(ids)
            assert not {S, M, E, tok.bos_id} & set(ids[i:j]), "a stray sentinel in plain text"
            out.append(tok.decode(ids[i:j]))
            i = j
    return "".join(out), counts


# ----------------------------------------------------------------------------------------- tokenizer


def test_fim_tokens_come_after_the_existing_specials(tok: Tokenizer) -> None:
    assert SPECIAL_TOKENS[: len(REQUIRED_SPECIAL_TOKENS)] == REQUIRED_SPECIAL_TOKENS
    assert [tok.special_ids[t] for t in REQUIRED_SPECIAL_TOKENS] == list(range(7))  # bos=0, eos=1, ... unmoved
    assert tok.fim_ids() == (7, 8, 9)
    assert [tok.id_to_token(i) for i in tok.fim_ids()] == list(FIM_TOKENS)
    # source text that spells a sentinel stays text
    assert not set(tok.encode("<|fim_prefix|>x<|fim_middle|>")) & set(tok.fim_ids())
    assert tok.encode("<|fim_middle|>", allow_special=True) == [9]
    assert all(tok.token_bytes()[i] == 0 for i in tok.fim_ids())  # bits-per-byte counts no bytes for them


def test_tokenizer_saved_before_fim_still_loads(old_tok: Tokenizer, tmp_path: Path) -> None:
    assert old_tok.fim_ids() is None
    assert (old_tok.bos_id, old_tok.eos_id, old_tok.end_id) == (0, 1, 6)
    assert old_tok.decode(old_tok.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
    with pytest.raises(FimUnavailableError, match="no FIM tokens"):
        infill_prompt(old_tok, "a", "b")
    with pytest.raises(FimUnavailableError, match="no FIM tokens"):
        build_shards({"train": ["x = 1\n"]}, old_tok, tmp_path, fim_rate=0.5, progress=False)
    # without FIM it builds shards as before
    idx = build_shards({"train": ["x = 1\n"]}, old_tok, tmp_path, progress=False)
    assert list(idx.open("train")[0]) == [0, *old_tok.encode("x = 1\n")]


def test_tokenizer_with_only_some_fim_tokens_is_refused() -> None:
    raw = train_pre_fim_tokenizer(TEXTS, 300)
    raw.add_special_tokens(["<|fim_prefix|>"])
    with pytest.raises(ValueError, match="not all"):
        Tokenizer(raw)


# ----------------------------------------------------------------------------------------- transform


@pytest.mark.parametrize("chunk_chars", [1, 7, 50, 10_000])
def test_chunk_lines(chunk_chars: int) -> None:
    rng = random.Random(chunk_chars)
    for _ in range(50):
        text = random_doc(rng, rng.randint(0, 30)).replace("\n", rng.choice(["\n", "\r\n", "\n"]))
        chunks = chunk_lines(text, chunk_chars)
        assert "".join(chunks) == text
        assert all(0 < len(c) <= chunk_chars for c in chunks)
        for a, b in zip(chunks, chunks[1:], strict=False):
            # greedy: a chunk ends at a line end and the next line did not fit, or it is a cut of a long line
            first_line = b.splitlines(keepends=True)[0]
            assert len(a) == chunk_chars or (a.endswith("\n") and len(a) + len(first_line) > chunk_chars)


def test_transform_is_a_permutation_plus_sentinels(tok: Tokenizer) -> None:
    rng = random.Random(0)
    docs = [random_doc(rng, rng.randint(1, 60)) for _ in range(120)] + ["", "x", "🙂🙂\n\n"]
    cfg = FimConfig(rate=0.5, spm_rate=0.5, chunk_chars=120, seed=3)
    plans = [plan_document(d, cfg) for d in docs]
    total = {"psm": 0, "spm": 0}
    for d, plan, ids in zip(docs, plans, encode_plans(tok, plans), strict=True):
        assert "".join(p.text for p in plan) == d
        for p in plan:
            if p.mode != "plain":  # each part tokenized alone decodes to itself, and the three give the chunk
                parts = [tok.decode(tok.encode(x)) for x in (p.prefix, p.middle, p.suffix)]
                assert "".join(parts) == p.text and parts == [p.prefix, p.middle, p.suffix]
                assert len(p.text) <= cfg.chunk_chars
        text, counts = parse_fim_stream(tok, ids)
        assert text == d
        # PSM with an empty prefix is spelled exactly as SPM with one (``P S suf M mid E``): the reader sees SPM
        seen_as = ["spm" if p.mode == "psm" and not p.prefix else p.mode for p in plan]
        assert counts == {m: seen_as.count(m) for m in ("psm", "spm")}
        for m in total:
            total[m] += counts[m]
        # the ids hold the document's tokens and three sentinels plus eos per example, nothing else
        n_fim = counts["psm"] + counts["spm"]
        assert sum(i in (tok.fim_ids() or ()) for i in ids) == 3 * n_fim
        assert sum(i == tok.eos_id for i in ids) == n_fim
    assert total["psm"] > 20 and total["spm"] > 20


def test_layouts_match_starcoder(tok: Tokenizer) -> None:
    """PSM ``P pre S suf M mid E`` and SPM ``P S suf M pre mid E``, spelled out by hand for one chunk."""
    P, S, M = 7, 8, 9
    E = tok.eos_id
    text = "def add(a, b):\n    return a + b\n"
    seen = set()
    for seed in range(40):
        [piece] = plan_document(text, FimConfig(rate=1.0, spm_rate=0.5, chunk_chars=1000, seed=seed))
        pre, mid, suf = (tok.encode(x) for x in (piece.prefix, piece.middle, piece.suffix))
        want = [P, *pre, S, *suf, M, *mid, E] if piece.mode == "psm" else [P, S, *suf, M, *pre, *mid, E]
        assert encode_plans(tok, [[piece]]) == [want]
        seen.add(piece.mode)
    assert seen == {"psm", "spm"}


@pytest.mark.parametrize(("rate", "spm_rate"), [(0.5, 0.5), (0.1, 0.8), (1.0, 0.0), (0.9, 1.0)])
def test_observed_rates_match_the_settings(rate: float, spm_rate: float) -> None:
    rng = random.Random(1)
    docs = [random_doc(rng, 200) for _ in range(60)]
    cfg = FimConfig(rate=rate, spm_rate=spm_rate, chunk_chars=100, seed=0)
    n = k = spm = 0
    lo_pos, hi_pos = [], []
    for d in docs:
        for p in plan_document(d, cfg):
            n += p.chunks
            if p.mode != "plain":
                k += 1
                spm += p.mode == "spm"
                lo_pos.append(len(p.prefix) / len(p.text))
                hi_pos.append((len(p.prefix) + len(p.middle)) / len(p.text))
    assert n > 3000

    def within(hits: int, trials: int, p: float) -> bool:  # 4.5 binomial standard deviations
        return abs(hits - trials * p) <= 4.5 * math.sqrt(trials * p * (1 - p)) + 1e-9

    assert within(k, n, rate), (k, n, rate)
    assert within(spm, k, spm_rate), (spm, k, spm_rate)
    # the cut points are the order statistics of two uniforms: means 1/3 and 2/3 (sd of each ~0.24)
    tol = 4.5 * 0.24 / math.sqrt(k) + 0.01  # + chunk-length discreteness
    assert abs(np.mean(lo_pos) - 1 / 3) < tol and abs(np.mean(hi_pos) - 2 / 3) < tol


def code_doc(rng: random.Random, n_lines: int) -> str:
    """Indented lines with blank lines and trailing spaces, like source code."""
    out = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.1:
            out.append(" " * rng.randint(0, 3))  # blank (maybe whitespace-only) line
        else:
            out.append(
                " " * (4 * rng.randint(0, 3)) + f"x{rng.randint(0, 99)} = f({rng.randint(0, 9)})" + " " * (r < 0.2)
            )
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_line_aligned_examples_are_whole_line_requests(spm_rate: float) -> None:
    """With ``line_rate = 1`` every FIM example asks for whole lines the way ``nanochat-eval lines --fim`` does:
    the prefix ends at the last non-whitespace character before a line break, the middle is that break, any blank
    lines and 1-8 lines, and the suffix starts with the break that ends them."""
    rng = random.Random(3)
    cfg = FimConfig(rate=1.0, spm_rate=spm_rate, chunk_chars=200, seed=0, line_rate=1.0)
    seen = 0
    spans: set[int] = set()
    for _ in range(40):
        doc = code_doc(rng, 60)
        for p in plan_document(doc, cfg):
            assert p.mode != "plain"
            if (p.prefix + p.middle + p.suffix).count("\n") < 2:
                continue  # too short for a line cut: character-level
            seen += 1
            assert p.prefix == p.prefix.rstrip(), p
            assert p.suffix.startswith("\n"), p
            gap = p.middle[: len(p.middle) - len(p.middle.lstrip())]
            assert "\n" in gap, p  # the middle starts with the line break after the prefix
            # brute force: the masked lines are whole lines of the chunk
            text_lines = (p.prefix + p.middle + p.suffix).split("\n")
            before = (p.prefix + p.middle).count("\n")
            first = p.prefix.count("\n") + gap.count("\n")
            assert (p.prefix + p.middle).split("\n")[-1] == text_lines[before]
            n = before - p.prefix.count("\n")
            assert 1 <= n - (gap.count("\n") - 1) <= 8, p
            assert first <= before
            spans.add(n)
    assert seen > 200
    assert 1 in spans and max(spans) >= 5  # one line half the time, else up to 8


def test_line_rate_share_and_cache_key() -> None:
    rng = random.Random(4)
    docs = [code_doc(rng, 60) for _ in range(60)]
    cfg = FimConfig(rate=1.0, chunk_chars=200, seed=0, line_rate=0.3)
    k = aligned = 0
    for d in docs:
        for p in plan_document(d, cfg):
            k += 1
            aligned += (
                p.suffix.startswith("\n")
                and p.prefix == p.prefix.rstrip()
                and "\n" in p.middle[: 1 + len(p.middle) - len(p.middle.lstrip())]
            )
    # character cuts land on such a boundary only by chance (well under 10%)
    assert 0.3 * k - 4.5 * math.sqrt(k * 0.21) <= aligned <= 0.4 * k + 4.5 * math.sqrt(k * 0.24), (aligned, k)
    assert "line_rate" not in FimConfig(rate=0.5).cache_key()
    assert FimConfig(rate=0.5, line_rate=0.3).cache_key()["line_rate"] == 0.3
    with pytest.raises(ValueError, match="fim_line_rate"):
        FimConfig(rate=0.5, line_rate=2.0)


def test_transform_is_deterministic_per_document() -> None:
    rng = random.Random(2)
    docs = [random_doc(rng, 80) for _ in range(5)]
    cfg = FimConfig(rate=0.5, chunk_chars=60, seed=11)
    assert [plan_document(d, cfg) for d in docs] == [plan_document(d, cfg) for d in docs]
    assert [plan_document(d, cfg) for d in docs] != [plan_document(d, FimConfig(0.5, 0.5, 60, 12)) for d in docs]
    assert plan_document(docs[0], FimConfig(rate=0.0, chunk_chars=10)) == [Piece("plain", docs[0])]


def test_bad_settings_are_refused() -> None:
    for kw, match in [({"rate": 1.5}, "fim_rate"), ({"spm_rate": -0.1}, "fim_spm_rate"), ({"chunk_chars": 0}, "chunk")]:
        with pytest.raises(ValueError, match=match):
            FimConfig(**kw)
    assert chunk_chars_for(512) == 768
    with pytest.raises(ValueError, match="seq_len"):
        chunk_chars_for(0)


# ----------------------------------------------------------------------------------------- shards


def corpus(n_train: int = 40, n_val: int = 10) -> dict[str, list[Document]]:
    rng = random.Random(5)
    return {
        "train": [Document(f"t{i}.py", random_doc(rng, rng.randint(1, 80))) for i in range(n_train)],
        "val": [Document(f"v{i}.py", random_doc(rng, rng.randint(1, 80))) for i in range(n_val)],
    }


def stream(index, split: str) -> list[int]:
    return [int(x) for arr in index.open(split) for x in arr]


def plain_reference(tok: Tokenizer, docs: list[Document]) -> list[int]:
    return [t for d in docs for t in [tok.bos_id, *tok.encode(d.text)]]


def split_docs(ids: list[int], bos: int) -> list[list[int]]:
    starts = [i for i, t in enumerate(ids) if t == bos]
    assert starts and starts[0] == 0
    return [ids[a + 1 : b] for a, b in zip(starts, [*starts[1:], len(ids)], strict=True)]


def test_rate_zero_shards_are_todays(tok: Tokenizer, tmp_path: Path) -> None:
    docs = corpus()
    a = build_shards(docs, tok, tmp_path / "a", shard_tokens=300, progress=False)
    b = build_shards(docs, tok, tmp_path / "b", shard_tokens=300, progress=False, fim_chunk_chars=5, seed=9)
    for split in ("train", "val"):
        assert stream(a, split) == plain_reference(tok, docs[split]) == stream(b, split)
    assert a.fim == {} and "fim_chunks" not in a.stats["train"]
    # an index written before FIM existed (no "fim" key) is reused at rate 0
    raw = json.loads((tmp_path / "a" / "index.json").read_text())
    del raw["fim"]
    (tmp_path / "a" / "index.json").write_text(json.dumps(raw))
    build_shards(docs, tok, tmp_path / "a", shard_tokens=300, progress=False)
    assert "fim" not in json.loads((tmp_path / "a" / "index.json").read_text())  # not rebuilt


def test_fim_shards_train_only(tok: Tokenizer, tmp_path: Path) -> None:
    docs = corpus()
    idx = build_shards(docs, tok, tmp_path, shard_tokens=300, progress=False, fim_rate=0.5, fim_chunk_chars=150)
    val = stream(idx, "val")
    assert val == plain_reference(tok, docs["val"])
    assert not set(val) & set(tok.fim_ids() or ())
    train = stream(idx, "train")
    per_doc = split_docs(train, tok.bos_id)
    assert len(per_doc) == len(docs["train"])
    counts = {"psm": 0, "spm": 0}
    for d, ids in zip(docs["train"], per_doc, strict=True):
        text, c = parse_fim_stream(tok, ids)
        assert text == d.text
        counts = {m: counts[m] + c[m] for m in counts}
    st = idx.stats["train"]
    assert st["fim_psm"] + st["fim_spm"] == counts["psm"] + counts["spm"]
    assert st["fim_psm"] >= counts["psm"]  # (a PSM example with an empty prefix reads as SPM)
    n, k = st["fim_chunks"], st["fim_psm"] + st["fim_spm"]
    assert st["fim_psm"] > 5 and st["fim_spm"] > 5 and abs(k - n / 2) <= 4.5 * math.sqrt(n / 4)
    assert st["tokens"] == len(train) and idx.stats["val"]["tokens"] == len(val)
    assert idx.fim == FimConfig(0.5, 0.5, 150, 0).cache_key()


def test_fim_settings_are_in_the_cache_key(tok: Tokenizer, tmp_path: Path) -> None:
    docs = corpus(20, 4)
    kw = dict(shard_tokens=10_000, progress=False, fim_chunk_chars=150)
    first = build_shards(docs, tok, tmp_path, fim_rate=0.5, **kw)
    index_file = tmp_path / "index.json"
    stamp = index_file.stat().st_mtime_ns, index_file.read_text()
    build_shards(docs, tok, tmp_path, fim_rate=0.5, **kw)
    assert (index_file.stat().st_mtime_ns, index_file.read_text()) == stamp  # reused
    base = stream(first, "train")
    for change in [{"fim_rate": 0.3}, {"fim_rate": 0.5, "seed": 1}, {"fim_rate": 0.5, "fim_spm_rate": 0.1}]:
        idx = build_shards(docs, tok, tmp_path, **{**kw, **change})
        assert idx.fim["rate"] == change["fim_rate"] and index_file.read_text() != stamp[1]
        assert stream(idx, "train") != base
    idx = build_shards(docs, tok, tmp_path, **{**kw, "fim_chunk_chars": 90, "fim_rate": 0.5})
    assert idx.fim["chunk_chars"] == 90
    idx = build_shards(docs, tok, tmp_path, **{**kw, "fim_rate": 0.0})
    assert idx.fim == {} and stream(idx, "train") == plain_reference(tok, docs["train"])


# ----------------------------------------------------------------------------------------- GGUF and sampling


def tiny_model(vocab_size: int = 512, seed: int = 0):
    from nanochat.model import GPT, GPTConfig

    cfg = GPTConfig(
        vocab_size=vocab_size,
        seq_len=128,
        n_layer=1,
        n_embd=256,
        n_head=4,
        n_kv_head=4,
        mlp_hidden=256,
        residual="standard",
        qk_norm=False,
    )
    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def gguf_value(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def test_gguf_carries_the_fim_ids(tok: Tokenizer, old_tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    import gguf

    from nanochat.export import GGUFError, export_gguf, read_gguf

    path = export_gguf(tiny_model(), tok, tmp_path / "fim.gguf")
    r = gguf.GGUFReader(path)
    K = gguf.Keys.Tokenizer
    assert [gguf_value(r, k) for k in (K.FIM_PRE_ID, K.FIM_SUF_ID, K.FIM_MID_ID)] == [7, 8, 9]
    assert r.get_field(K.FIM_PRE_ID).types == [gguf.GGUFValueType.UINT32]
    toks = gguf_value(r, K.LIST)
    assert [toks[i] for i in (7, 8, 9)] == list(FIM_TOKENS)
    assert read_gguf(path).tokenizer.fim_ids() == (7, 8, 9)

    old = export_gguf(tiny_model(), old_tok, tmp_path / "old.gguf")
    r = gguf.GGUFReader(old)
    assert all(r.get_field(k) is None for k in (K.FIM_PRE_ID, K.FIM_SUF_ID, K.FIM_MID_ID))
    assert read_gguf(old).tokenizer.fim_ids() is None

    # keys that name other tokens than the sentinels: refused on load, not silently ignored
    monkeypatch.setattr(Tokenizer, "fim_ids", lambda self: (8, 7, 9))
    bad = export_gguf(tiny_model(), tok, tmp_path / "bad.gguf")
    monkeypatch.undo()
    with pytest.raises(GGUFError, match="FIM token ids"):
        read_gguf(bad)


def test_sample_fills_in_the_middle(tok: Tokenizer, old_tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from nanochat.engine import Engine
    from nanochat.engine.cli import app
    from nanochat.export import export_gguf, load

    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    # the PSM prompt and stop set, spelled out by hand
    prompt = [0, 7, *tok.encode(prefix), 8, *tok.encode(suffix), 9]
    assert infill_prompt(tok, prefix, suffix) == prompt
    assert middle_stop_ids(tok) == {0, 1, 7, 8, 9}
    # a model that never picks a special token (zero rows of the tied head: logit 0 under the best token's) ...
    model = tiny_model(seed=1)
    with torch.no_grad():
        model.wte.weight[:10] = 0.0
    free = export_gguf(model, tok, tmp_path / "free.gguf")
    run = Engine(load(free)).generate(prompt, max_new_tokens=12, temperature=0, stop_token_ids=())
    assert len(run.token_ids) == 12 and not set(run.token_ids) & {0, 1, 7, 8, 9}
    # ... then eos made the best token a few steps in: the middle must end there, eos not printed
    with torch.no_grad():
        model.wte.weight[1] = 1.5 * model.wte.weight[run.token_ids[3]]
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    want = Engine(load(path)).generate(prompt, max_new_tokens=12, temperature=0, stop_token_ids={0, 1, 7, 8, 9})
    assert want.finish_reason == "stop" and 0 < len(want.token_ids) < 12

    calls = []
    real_start = Engine.start

    def spy(self, prompts, **kw):
        calls.append((list(prompts[0]), kw.get("stop_token_ids")))
        return real_start(self, prompts, **kw)

    monkeypatch.setattr(Engine, "start", spy)
    args = ["--model", str(path), "--max-tokens", "12", "--temperature", "0", "--threads", "1"]
    r = CliRunner().invoke(app, [*args, "--prefix", prefix, "--suffix", suffix])
    assert r.exit_code == 0, r.output
    assert r.output == want.text + "\n"  # the middle only, not the prefix
    assert calls == [(prompt, {0, 1, 7, 8, 9})]

    r = CliRunner().invoke(app, [*args, "--suffix", "return x\n"])  # an empty prefix is fine
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*args, "--prefix", "a", "--prompt", "b"])
    assert r.exit_code == 2 and "not both" in " ".join(r.output.replace("│", " ").split())
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--prefix/--suffix for infilling" in " ".join(r.output.replace("│", " ").split())

    old = export_gguf(tiny_model(), old_tok, tmp_path / "old.gguf")
    r = CliRunner().invoke(app, ["--model", str(old), "--prefix", "a", "--suffix", "b", "--max-tokens", "2"])
    assert r.exit_code == 2 and "no FIM tokens" in r.output
