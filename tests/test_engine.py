"""Inference engine tests: every fast path against its slow twin.

- Rust engine (KV cache, fused projections, batched decode) vs the torch model's full forward in eval mode on CPU
  (its BitLinears run the same exact int8 × ternary products, everything else is torch), to 1e-3 of the logit scale,
  for every residual / MLP / QK-norm / GQA variant; and, looser, vs the pure-torch fake-quant path
  (``torch_path_only``: no Rust at all). Looser because the two torch paths round differently in the last f32 bit,
  and in these random models one flipped int8 activation rounding can move logits by ~1e-2 of their scale.
- Torch KV-cache engine vs the same full forward (incl. a continued prefill, which needs the bottom-right mask).
- Greedy generation vs step-by-step argmax of the full forward without cache; batched vs one at a time.
- Streaming text: stop strings (also across token boundaries), max tokens, UTF-8 characters split across tokens.
- Bad inputs raise clear errors.

Models are small and random (n_embd 256, 2 layers, vocab 320) with every parameter perturbed, so the mHC dynamic
projections, the zero-initialised output projections and the norms all matter.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from nanochat.data.tokenizer import Tokenizer
from nanochat.engine import Engine, TextStream, TorchEngine, decode_fn, make_generator, rust_engine, sample
from nanochat.engine.rust_engine import build_rust_engine, engine_weights, rust_engine_from_weights
from nanochat.model import GPT, GPTConfig, torch_path_only

VOCAB = 320


def make_model(seed: int = 0, **kw) -> GPT:
    base = dict(
        vocab_size=VOCAB,
        seq_len=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=256,
        mlp_hidden=512,
        residual="mhc_lite",
        n_streams=4,
        sinkhorn_iters=8,
    )
    base.update(kw)
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**base)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "mhc" in name:
                p.add_(torch.randn_like(p) * (0.02 if name.endswith("proj") else 0.3))
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif p.dim() == 2 and name != "wte.weight":
                p.normal_(0.0, 0.05)
    return m


@torch.no_grad()
def full_logits(m: GPT, ids: list[int], pure_torch: bool = False) -> torch.Tensor:
    """(T, V) logits of the whole sequence, no cache: the model's eval path, or with ``pure_torch`` its fake-quant
    torch math (``torch_path_only``)."""
    with torch_path_only(pure_torch):
        return m(torch.tensor([ids]))[0].float()


def assert_logits_close(got, want, what: str = "", rel: float = 1e-3) -> None:
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    scale = want.abs().max().item()
    err = (got.float() - want).abs().max().item()
    # Same int8 activations and exact integer products on both sides; the rest differs by f32 summation order
    # (~1e-6 relative, what we see), far below this bound.
    assert err <= rel * scale, f"{what}: max |Δ| {err:.3g} vs logit scale {scale:.3g}"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # Trained on ASCII only, so every non-ASCII character is split into single-byte tokens.
    texts = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "for i in range(10): print(i)\n"]
    return Tokenizer.train(texts * 20, vocab_size=VOCAB)


VARIANTS = [
    pytest.param(dict(residual="standard", mlp="swiglu", qk_norm=False, n_kv_head=4), id="standard-swiglu-mha"),
    pytest.param(dict(residual="standard", mlp="relu2", qk_norm=True, n_kv_head=2), id="standard-relu2-qk-gqa"),
    pytest.param(dict(residual="mhc_lite", mlp="swiglu", qk_norm=True, n_kv_head=2), id="mhc_lite-swiglu-qk-gqa"),
    pytest.param(dict(residual="mhc_lite", mlp="relu2", qk_norm=False, n_kv_head=1), id="mhc_lite-relu2-mqa"),
    pytest.param(dict(residual="mhc", mlp="swiglu", qk_norm=False, n_kv_head=2), id="mhc-swiglu-gqa"),
    pytest.param(dict(residual="mhc", mlp="relu2", qk_norm=True, n_kv_head=4, n_streams=3), id="mhc-relu2-qk-3streams"),
]


# ----------------------------------------------------------------------------- logits vs the full forward


@pytest.mark.parametrize("kw", VARIANTS)
def test_rust_engine_matches_full_forward(kw) -> None:
    m = make_model(1, **kw)
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    want = full_logits(m, ids)
    eng = build_rust_engine(m, threads=2)
    s = eng.new_session()
    assert_logits_close(s.prefill(ids[:10]), want[9], "prefill")
    for t in range(10, 20):
        assert_logits_close(s.decode(ids[t]), want[t], f"decode at {t}")
    # several tokens into a non-empty cache, every position's logits
    rows = s.forward_all(ids[20:])
    assert rows.shape == (4, VOCAB)
    for j in range(4):
        assert_logits_close(rows[j], want[20 + j], f"chunk row {j}")
    assert s.position == 24
    # independent of the Rust kernels altogether (looser, see the module docstring)
    pure = full_logits(m, ids, pure_torch=True)
    s.reset()
    assert_logits_close(s.forward_all(ids), pure, "vs pure torch", rel=5e-2)


@pytest.mark.parametrize("kw", VARIANTS[::2])
def test_torch_engine_matches_full_forward(kw) -> None:
    m = make_model(3, **kw)
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    want = full_logits(m, ids)
    eng = TorchEngine(m)
    s = eng.new_session()
    assert_logits_close(eng.prefill(s, ids[:8]), want[7], "prefill")
    assert_logits_close(eng.decode(s, ids[8]), want[8], "decode")
    got = eng.forward(s, ids[9:], all_logits=True)  # continued prefill: bottom-right causal mask
    for j in range(11):
        assert_logits_close(got[j], want[9 + j], f"continued prefill row {j}")


def test_torch_engine_runs_fp_models() -> None:
    m = make_model(5, quant="fp", residual="standard")
    ids = list(range(3, 15))
    want = full_logits(m, ids)
    eng = TorchEngine(m)
    s = eng.new_session()
    eng.prefill(s, ids[:5])
    got = eng.forward(s, ids[5:], all_logits=True)
    torch.testing.assert_close(got, want[5:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="ternary"):
        build_rust_engine(m)


def test_threads_and_batches_are_bit_identical() -> None:
    m = make_model(6)
    e1 = build_rust_engine(m, threads=1)
    e2 = build_rust_engine(m, threads=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    singles = []
    for p in prompts:
        s = e1.new_session()
        out = [s.prefill(p)]
        for t in (17, 23, 42):
            out.append(s.decode(t))
        singles.append(out)
    ss = [e2.new_session() for _ in prompts]
    batched = [[row] for row in e2.forward(ss, prompts)]
    for t in (17, 23, 42):
        for out, row in zip(batched, e2.decode_batch(ss, [t] * 3), strict=True):
            out.append(row)
    for a, b in zip(singles, batched, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_concurrent_sessions_from_python_threads() -> None:
    """Compute runs without the GIL and the engine serialises on its own lock: threads give serial results."""
    m = make_model(7, residual="standard")
    eng = build_rust_engine(m, threads=2)
    prompts = [[i, i + 1, i + 2] for i in range(4)]
    want = []
    for p in prompts:
        s = eng.new_session()
        s.prefill(p)
        want.append([s.decode(j) for j in range(8)])
    got: dict[int, list[np.ndarray]] = {}

    def run(i: int) -> None:
        s = eng.new_session()
        s.prefill(prompts[i])
        got[i] = [s.decode(j) for j in range(8)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for a, b in zip(got[i], want[i], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("head", "kv", "bound"), [("f16", "f32", 2e-3), ("int8", "f32", 5e-2), ("f32", "f16", 5e-2), ("f16", "f16", 5e-2)]
)
def test_reduced_precision_head_and_cache(head: str, kv: str, bound: float) -> None:
    m = make_model(8, residual="standard")
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    want = full_logits(m, ids)
    eng = build_rust_engine(m, head=head, kv=kv)
    assert (eng.head, eng.kv) == (head, kv)
    s = eng.new_session()
    got = torch.from_numpy(s.forward_all(ids[:4]))
    for t in ids[4:]:
        got = torch.cat([got, torch.from_numpy(s.decode(t))[None]])
    err = (got - want).abs().max().item()
    assert err <= bound * want.abs().max().item(), f"head {head} kv {kv}: error {err}"
    # layers · (k, v) · positions (the context, 64, below one 256-position growth step) · kv_dim · bytes
    assert s.cache_bytes == 2 * 2 * 64 * 128 * (2 if kv == "f16" else 4)


def test_f16_head_on_f16_exact_weights_equals_the_f32_head_up_to_summation_order() -> None:
    """With an embedding whose values are exactly float16, the f16 head (AVX-512 groups of 4 rows, prefetched) and the
    f32 head multiply the same numbers: their logits differ only by f32 summation order (~1e-7 of the scale), for
    decode and all-position rows, at 1 and 2 threads, and for a vocabulary that leaves a partial group of rows."""
    m = make_model(15, residual="standard", vocab_size=VOCAB + 3)
    ternary, dense = engine_weights(m)
    dense = {**dense, "wte.weight": dense["wte.weight"].astype(np.float16).astype(np.float32)}
    ids = [7, 3, 9, 1, 4, 4, 2, 300, 322]
    for threads in (1, 2):
        runs = {}
        for head in ("f16", "f32"):
            eng = rust_engine_from_weights(m.config, ternary, dense, threads=threads, head=head)
            s = eng.new_session()
            rows = [s.forward_all(ids[:5])]
            rows += [s.decode(t)[None] for t in ids[5:]]
            runs[head] = np.concatenate(rows)
        scale = np.abs(runs["f32"]).max()
        err = np.abs(runs["f16"] - runs["f32"]).max()
        assert err <= 1e-5 * scale, f"threads {threads}: max |f16 head - f32 head| {err:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------------- generation


def reference_greedy(m: GPT, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Step-by-step argmax of the full forward (no cache), and the logits it chose from."""
    out, logits = [], []
    seq = list(ids)
    for _ in range(n):
        row = full_logits(m, seq)[-1]
        t = int(row.argmax())
        out.append(t)
        logits.append(row)
        seq.append(t)
    return out, logits


def assert_same_greedy(got: list[int], want: list[int], logits: list[torch.Tensor], rel_tie: float = 1e-3) -> None:
    """Equal tokens; a divergence is only accepted at a near-tie (``rel_tie`` of the largest |logit|) of the
    reference's top two logits."""
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            top2 = logits[i].topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap <= rel_tie * logits[i].abs().max().item(), f"step {i}: {a} != {b} with top-2 gap {gap}"
            return
    assert len(got) == len(want)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("residual", ["standard", "mhc_lite", "mhc"])
def test_greedy_generation_matches_uncached_argmax(tokenizer, backend: str, residual: str) -> None:
    m = make_model(9, residual=residual)
    prompt = tokenizer.encode("def fib(n):")
    want, logits = reference_greedy(m, prompt, 16)
    eng = Engine(m, tokenizer, backend=backend)
    assert eng.backend_name == backend
    res = eng.generate(prompt, max_new_tokens=16, temperature=0, stop_token_ids=[])
    # The Rust engine reproduces the full forward to ~1e-7, so only float near-ties may split. The torch engine's
    # cached attention sums in another order than the full causal SDPA; a 1-ulp difference can flip one int8
    # activation code (a step of max|x|/127), which moves the logits by up to ~2% of their scale (measured
    # 1.7e-2 on this model): ties within that may split.
    assert_same_greedy(res.token_ids, want, logits, rel_tie=1e-3 if backend == "rust" else 3e-2)
    assert res.finish_reason == "length"
    assert res.prompt_tokens == len(prompt)


def test_batch_equals_one_at_a_time_with_sampling(tokenizer) -> None:
    m = make_model(10)
    eng = Engine(m, tokenizer)
    prompts = ["def fib(n):", "for i in", "x"]
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=1234, stop_token_ids=[])
    batch = eng.generate_batch(prompts, **kw)
    singles = [eng.generate(p, **kw) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]
    assert [r.text for r in batch] == [r.text for r in singles]
    # per-prompt seeds; a different seed gives a different sample
    per = eng.generate_batch(prompts, **{**kw, "seed": [1234, 1234, 99]})
    assert per[0].token_ids == batch[0].token_ids and per[2].token_ids != batch[2].token_ids
    # greedy batches too, and the torch backend agrees with the Rust one token for token at temperature 0
    g_rust = eng.generate_batch(prompts, max_new_tokens=8, temperature=0, stop_token_ids=[])
    g_torch = Engine(m, tokenizer, backend="torch").generate_batch(
        prompts, max_new_tokens=8, temperature=0, stop_token_ids=[]
    )
    assert [r.token_ids for r in g_rust] == [r.token_ids for r in g_torch]


def test_stop_strings_max_tokens_and_stop_tokens(tokenizer) -> None:
    m = make_model(12)
    eng = Engine(m, tokenizer)
    prompt = "def fib(n):"
    free = eng.generate(prompt, max_new_tokens=30, temperature=0, stop_token_ids=[])
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    text = free.text
    clean = [i for i in range(4, len(text) - 4) if "\ufffd" not in text[i - 1 : i + 3]]
    assert clean, "need some clean text to cut"
    cut = clean[len(clean) // 2]
    stop = text[cut : cut + 3]
    first = text.find(stop)
    gen = eng.stream(prompt, max_new_tokens=30, temperature=0, stop=[stop, "never-appears"], stop_token_ids=[])
    deltas = list(gen)
    assert gen.result is not None and gen.result.finish_reason == "stop"
    assert gen.result.text == text[:first]
    assert "".join(deltas) == gen.result.text
    assert all(d for d in deltas)
    # a stop token ends generation before it is added
    res = eng.generate(prompt, max_new_tokens=30, temperature=0, stop_token_ids=[free.token_ids[3]])
    assert res.finish_reason == "stop"
    assert res.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3])]
    # max_new_tokens = 0
    zero = eng.generate(prompt, max_new_tokens=0)
    assert zero.finish_reason == "length" and zero.token_ids == [] and zero.text == ""
    # the context bounds generation: seq_len 64
    long = eng.generate(prompt, max_new_tokens=500, temperature=0, stop_token_ids=[])
    assert long.finish_reason == "length" and long.prompt_tokens + len(long.token_ids) == 64


def test_stream_close_stops_early(tokenizer) -> None:
    eng = Engine(make_model(13, residual="standard"), tokenizer)
    gen = eng.stream("def", max_new_tokens=50, temperature=0, stop_token_ids=[])
    first = next(iter(gen))
    gen.close()
    assert gen.result is not None and gen.result.text == first
    assert list(gen) == []


# ----------------------------------------------------------------------------- text streaming


def test_utf8_characters_split_across_tokens_are_never_split_in_the_stream(tokenizer) -> None:
    text = "héllo wörld → 日本語 😀 done, ça va? ✓"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 2  # the non-ASCII characters are byte tokens
    dec = decode_fn(tokenizer)
    assert any("\ufffd" in dec([i]) for i in ids)  # some tokens are partial characters on their own
    ts = TextStream(dec)
    deltas = [ts.push(i) for i in ids] + [ts.finish()]
    assert "".join(deltas) == text == ts.text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_across_token_boundaries_is_never_emitted(tokenizer) -> None:
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text)
    for stop in ["a gam", "ta", "delta", "gamma delta", "a", "zeta"]:
        ts = TextStream(decode_fn(tokenizer), [stop])
        deltas = []
        for i in ids:
            deltas.append(ts.push(i))
            if ts.stopped:
                break
        deltas.append(ts.finish())
        want = text[: text.find(stop)] if stop in text else text
        assert "".join(deltas) == want == ts.text, stop
        assert ts.stopped == (stop in text)
        # no delta ever carried a piece of the stop string beyond the final text
        assert not any(stop in "".join(deltas[: k + 1]) for k in range(len(deltas)))


def test_held_stop_prefix_is_released_at_the_end(tokenizer) -> None:
    ts = TextStream(decode_fn(tokenizer), ["!!!"])
    out = "".join(ts.push(i) for i in tokenizer.encode("wow!!"))
    assert out == "wow"  # "!!" might start "!!!"
    assert ts.finish() == "!!" and ts.text == "wow!!"


def test_sampling_rules() -> None:
    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0], dtype=np.float32)
    assert sample(logits, temperature=0) == 1  # the first maximum
    g = make_generator(0)
    draws = {sample(logits, 1.0, top_k=2, generator=g) for _ in range(200)}
    assert draws == {1, 3}  # ties at the k-th value are kept
    draws = {sample(np.array([5.0, 0.0, 0.0, -2.0]), 1.0, top_p=0.5, generator=g) for _ in range(100)}
    assert draws == {0}
    a = [sample(logits, 0.8, generator=make_generator(7)) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(tokenizer) -> None:
    m = make_model(14, residual="standard")
    eng = build_rust_engine(m)
    s = eng.new_session(max_seq=8)
    with pytest.raises(ValueError, match="out of range"):
        s.prefill([1, VOCAB])
    with pytest.raises(ValueError, match="out of range"):
        s.decode(-1)
    with pytest.raises(ValueError, match="no tokens"):
        s.prefill([])
    s.prefill([1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="context overflow"):
        s.prefill([1, 2, 3])
    assert s.position == 6  # unchanged by the failed call
    s.decode(1)
    s.decode(2)
    with pytest.raises(ValueError, match="context overflow"):
        s.decode(3)
    s.reset()
    assert s.position == 0
    s2 = eng.new_session()
    with pytest.raises(ValueError, match="twice"):
        eng.decode_batch([s2, s2], [1, 2])
    with pytest.raises(ValueError, match="another"):
        eng.decode_batch([build_rust_engine(m).new_session()], [1])
    with pytest.raises(ValueError, match="2 sessions but 1 tokens"):
        eng.decode_batch([s2, eng.new_session()], [1])
    # the facade checks prompts before any work
    e = Engine(m, tokenizer)
    with pytest.raises(ValueError, match="out of range"):
        e.generate([VOCAB + 5])
    with pytest.raises(ValueError, match="context"):
        e.generate(list(range(64)))
    with pytest.raises(ValueError, match="backend"):
        Engine(m, tokenizer, backend="tpu")


def test_weight_errors_name_the_tensor() -> None:
    m = make_model(15, residual="mhc")
    ternary, dense = engine_weights(m)
    cfg = m.config
    t2 = dict(ternary)
    del t2["blocks.1.mlp.gate_proj.weight"]
    with pytest.raises(ValueError, match=r"missing weight 'blocks\.1\.mlp\.gate_proj\.weight'"):
        rust_engine_from_weights(cfg, t2, dense)
    d2 = dict(dense, **{"norm.weight": np.ones(10, np.float32)})
    with pytest.raises(ValueError, match=r"norm\.weight"):
        rust_engine_from_weights(cfg, ternary, d2)
    d3 = dict(dense, **{"blocks.0.attn.q_proj.weight": np.zeros((256, 256), np.float32)})
    with pytest.raises(ValueError, match="given both"):
        rust_engine_from_weights(cfg, ternary, d3)
    t3 = dict(ternary, **{"blocks.0.attn.q_proj.weight": (np.zeros((256, 32), np.uint8), 1.0)})
    with pytest.raises(ValueError, match=r"q_proj.*256 × 128"):
        rust_engine_from_weights(cfg, t3, dense)
    d4 = dict(dense, **{"blocks.0.extra": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unexpected"):
        rust_engine_from_weights(cfg, ternary, d4)
    with pytest.raises(ValueError, match="unknown key"):
        rust_engine_from_weights({**cfg.to_dict(), "n_layers": 2}, ternary, dense)
    with pytest.raises(TypeError, match="uint8"):
        from nanochat import _core

        w = {k: v for k, v in dense.items()}
        w.update({k: (p.astype(np.int8), s) for k, (p, s) in ternary.items()})
        _core.EngineModel({k: v for k, v in cfg.to_dict().items() if k != "init_std"}, w)


# ----------------------------------------------------------------------------- CLI


def test_cli_streams_a_completion(tokenizer, tmp_path) -> None:
    from typer.testing import CliRunner

    from nanochat.engine.cli import app
    from nanochat.export.safetensors_io import export_safetensors

    m = make_model(16, residual="standard")
    path = export_safetensors(m, tokenizer, tmp_path / "model.safetensors")
    want = Engine(m, tokenizer).generate("def", max_new_tokens=8, temperature=0).text
    r = CliRunner().invoke(
        app,
        ["--model", str(path), "--prompt", "def", "--max-tokens", "8", "--temperature", "0", "--threads", "1"],
    )
    assert r.exit_code == 0, r.output
    assert r.output.startswith("def" + want)


@pytest.mark.parametrize("residual", ["standard", "mhc"])
def test_engine_from_gguf_matches_the_models_torch_twin(tokenizer, tmp_path, residual: str) -> None:
    """A GGUF's memory-mapped TQ2_0 tensors feed the Rust engine directly (``LoadedModel.packed_weights``): its
    logits equal those of the torch model materialised from the same file."""
    from nanochat.export import export_gguf, load

    kw = dict(residual=residual, qk_norm=False, n_kv_head=4) if residual == "standard" else dict(residual=residual)
    path = export_gguf(make_model(17, **kw), tokenizer, tmp_path / "m.gguf")
    loaded = load(path)
    eng = Engine(loaded)
    assert eng.backend_name == "rust"
    ids = tokenizer.encode("def fib(n):")
    want = full_logits(loaded.torch_model(), ids)
    s = eng.rust.new_session()
    assert_logits_close(s.forward_all(ids), want, "gguf")


def test_sample_cli_bad_model_is_one_line_error(tmp_path) -> None:
    from typer.testing import CliRunner

    from nanochat.engine.cli import app

    for bad in (tmp_path / "missing.gguf", tmp_path):
        r = CliRunner().invoke(app, ["--model", str(bad), "--prompt", "x"])
        assert r.exit_code == 2, r.output
        assert "error:" in r.output and "Traceback" not in r.output


def test_a_model_the_rust_engine_refuses_runs_on_the_cached_torch_forward_or_fails_loudly(
    tokenizer, caplog, monkeypatch
) -> None:
    """A model the Rust engine refuses: ``backend="rust"`` raises that error; "auto" runs the model on the torch
    engine with a warning naming the reason, one token per decode forward (a KV cache, not an uncached O(T²) loop),
    and generates what the full forward's argmax does. (head_dim 768 > 512, the case only the engine used to refuse,
    is now refused up front by GPTConfig's validation, tests/test_schema.py; the engine's refusal is stood in for.)"""
    with pytest.raises(ValueError, match="head_dim"):
        GPTConfig(n_embd=768, n_head=1, n_kv_head=1, mlp_hidden=256)
    m = make_model(16, residual="standard", n_layer=1)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("config: head_dim 768 > 512 is not supported")

    monkeypatch.setattr(rust_engine, "build_rust_engine", refuse)
    with pytest.raises(ValueError, match="head_dim 768 > 512"):
        Engine(m, tokenizer, backend="rust")
    with caplog.at_level(logging.WARNING, logger="nanochat.engine.generate"):
        eng = Engine(m, tokenizer)
    assert eng.backend_name == "torch"
    assert eng.backend_note is not None and "head_dim 768 > 512" in eng.backend_note
    assert "head_dim 768 > 512" in caplog.text
    fed: list[int] = []  # tokens per model forward
    hook = m.wte.register_forward_pre_hook(lambda _m, args: fed.append(args[0].shape[1]))
    prompt = tokenizer.encode("def fib(n):")
    try:
        res = eng.generate(prompt, max_new_tokens=8, temperature=0, stop_token_ids=[])
    finally:
        hook.remove()
    assert fed == [len(prompt)] + [1] * 7
    want, logits = reference_greedy(m, prompt, 8)
    assert_same_greedy(res.token_ids, want, logits, rel_tie=3e-2)
    assert Engine(make_model(17, quant="fp"), tokenizer).backend_note is None  # fp: torch by design, no note


def test_bad_engine_settings_are_the_callers_error_not_a_reason_to_fall_back(tokenizer) -> None:
    m = make_model(18, residual="standard")
    with pytest.raises(ValueError, match="head must be one of"):
        Engine(m, tokenizer, head="f8")
    with pytest.raises(ValueError, match="kv must be one of"):
        Engine(m, tokenizer, kv="int4")
    assert Engine(m, tokenizer, head="f16").backend_name == "rust"


def test_fork_then_decode_equals_a_fresh_prefill_then_decode() -> None:
    """``EngineSession.fork()`` (one prefill shared by n samples) gives exactly the logits of prefilling again."""
    m = make_model(12, residual="mhc")
    eng = build_rust_engine(m, threads=1)
    prompt, conts = [3, 1, 4, 1, 5, 9, 2, 6], ([5, 3, 5], [8, 9], [7])
    parent = eng.new_session()
    parent.prefill(prompt)
    forks = [parent.fork() for _ in conts]
    assert all(f.position == len(prompt) and f.cache_bytes == parent.cache_bytes for f in forks)
    got: list[list[np.ndarray]] = [[] for _ in conts]
    for step in range(3):  # interleaved, so forks sharing a cache would see each other's tokens
        for i, c in enumerate(conts):
            if step < len(c):
                got[i].append(forks[i].decode(c[step]))
    for c, g in zip(conts, got, strict=True):
        fresh = eng.new_session()
        fresh.prefill(prompt)
        for t, row in zip(c, g, strict=True):
            np.testing.assert_array_equal(row, fresh.decode(t))
    assert parent.position == len(prompt)
    # a fork of one engine is still refused by another
    other = build_rust_engine(m, threads=1)
    with pytest.raises(ValueError, match="another EngineModel"):
        other.decode_batch([forks[0]], [1])


def test_default_head_is_f16_and_no_second_copy(tokenizer) -> None:
    """The LM head is read in f16 by default (issue 13): half the bytes of the f32 head, and a tied f16 head adds
    only its 2-byte copy beside the f32 embedding (an untied one replaces the f32 head, nothing kept beside it)."""
    for tied in (True, False):
        m = make_model(13, residual="standard", tie_embeddings=tied)
        e16, e32 = build_rust_engine(m, threads=1), build_rust_engine(m, threads=1, head="f32")
        assert (e16.head, e32.head) == ("f16", "f32")
        vc = VOCAB * m.config.n_embd
        assert e16.weight_bytes - e32.weight_bytes == (2 * vc if tied else -2 * vc)
    eng = Engine(make_model(13), tokenizer, backend="rust")
    assert eng.backend_name == "rust"
    assert eng.backend.eng.head == "f16"


def test_f16_embedding_is_one_copy_for_lookups_and_a_tied_f16_head() -> None:
    """A float16 ``wte.weight`` (what a GGUF's token_embd maps to) gives the logits of the same values in float32,
    bit for bit, and with the default f16 head no f32 embedding is held (4 bytes per value fewer)."""
    m = make_model(14, residual="standard")
    ternary, dense = engine_weights(m)
    wte16 = dense["wte.weight"].astype(np.float16)
    d16 = {**dense, "wte.weight": wte16}
    d32 = {**dense, "wte.weight": wte16.astype(np.float32)}
    ids = [7, 3, 9, 1, 4, 4, 2]
    for head, saved in (("f16", 4), ("f32", 0), ("int8", 0)):
        e16 = rust_engine_from_weights(m.config, ternary, d16, threads=1, head=head)
        e32 = rust_engine_from_weights(m.config, ternary, d32, threads=1, head=head)
        np.testing.assert_array_equal(e16.new_session().forward_all(ids), e32.new_session().forward_all(ids))
        assert e32.weight_bytes - e16.weight_bytes == saved * wte16.size, head
