"""n samples of one prompt share one prefill (issue 12): ``Engine.start`` prefills a repeated prompt once and forks
its KV cache (Rust ``EngineSession.fork``, torch ``KVCache.fork``). Each sample must equal its own one-at-a-time
generation with the same seed, and only the unique prompts' tokens may be prefilled."""

from __future__ import annotations

import pytest
import torch

from nanochat.data.tokenizer import Tokenizer
from nanochat.engine import Engine
from nanochat.model import GPT, GPTConfig

VOCAB = 320
TEXTS = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "for i in range(10): print(i)\n"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS * 20, vocab_size=VOCAB)


def make_model(quant: str) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, mlp_hidden=512,
                    residual="standard", quant=quant)  # fmt: skip
    m = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and name != "wte.weight":
                p.normal_(0.0, 0.05)
    return m


@pytest.mark.parametrize(("backend", "quant"), [("rust", "ternary"), ("torch", "fp")])
def test_repeated_prompt_is_prefilled_once_and_each_sample_equals_its_solo_run(tok, backend, quant) -> None:
    eng = Engine(make_model(quant), tok, backend=backend)
    prompt = tok.encode("def fib(n):")
    other = tok.encode("for i in")
    prompts = [prompt, other, prompt, prompt, other]
    seeds = [11, 12, 13, 14, 15]
    got = eng.generate_batch(prompts, max_new_tokens=10, temperature=1.0, seed=seeds, stop_token_ids=())
    assert eng.prefilled_tokens == len(prompt) + len(other)  # two unique prompts, each prefilled once
    solo = [Engine(make_model(quant), tok, backend=backend) for _ in range(1)][0]
    for p, s, r in zip(prompts, seeds, got, strict=True):
        want = solo.generate(p, max_new_tokens=10, temperature=1.0, seed=s, stop_token_ids=())
        assert r.token_ids == want.token_ids and r.text == want.text
    # the forked samples really diverge (independent caches, independent generators)
    assert len({tuple(r.token_ids) for r, p in zip(got, prompts, strict=True) if p == prompt}) > 1


def test_kv_cache_fork_is_independent() -> None:
    m = make_model("fp")
    ids = torch.tensor([[1, 2, 3, 4]])
    cache = m.new_kv_cache(16)
    with torch.no_grad():
        m(ids, kv_cache=cache)
        twin = cache.fork()
        m(torch.tensor([[7]]), kv_cache=cache)  # the two continue differently from position 4
        m(torch.tensor([[5]]), kv_cache=twin)
        assert cache.pos == twin.pos == 5
        c = m(torch.tensor([[6]]), kv_cache=twin)[0, -1]
        d = m(torch.tensor([[8]]), kv_cache=cache)[0, -1]
        assert torch.allclose(c, m(torch.tensor([[1, 2, 3, 4, 5, 6]]))[0, -1], atol=1e-5)
        assert torch.allclose(d, m(torch.tensor([[1, 2, 3, 4, 7, 8]]))[0, -1], atol=1e-5)
