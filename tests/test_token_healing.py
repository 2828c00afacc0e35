"""Token healing of text prompts (issue 16 item 8): a prompt that ends mid-merge has its last token taken off, and the
first generated token must re-spell it. Checked against a brute-force scan of the vocabulary, a brute-force argmax
over the model's own logits, and the identity ``prompt + completion == decode(prompt ids fed + generated ids)``."""

from __future__ import annotations

import pytest
import torch

from nanochat.data.tokenizer import Tokenizer
from nanochat.engine import Engine
from nanochat.model import GPT, GPTConfig

VOCAB = 400
CODE = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for item in items:\n    if item:\n        print(item)\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CODE * 30, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, mlp_hidden=512,
                    residual="standard", quant="fp")  # fmt: skip
    m = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and name != "wte.weight":
                p.normal_(0.0, 0.05)
    return m


def brute_allowed(tok: Tokenizer, tail: str) -> set[int]:
    special = set(tok.special_ids.values())
    return {i for i in range(VOCAB) if i not in special and tok.decode([i]).startswith(tail)}


PROMPTS = ["def fib(n):\n    ", "class Point:\n    def __in", "for item in it"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_heal_takes_off_the_last_token_and_allows_what_extends_it(tok: Tokenizer, model: GPT, prompt: str) -> None:
    eng = Engine(model, tok, backend="torch")
    ids = tok.encode(prompt)
    fed, allowed, tail = eng._heal(list(ids))
    assert tail == tok.decode([ids[-1]]) and fed == ids[:-1]
    assert allowed is not None and set(allowed) == brute_allowed(tok, tail) and ids[-1] in allowed
    assert len(allowed) > 1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_healed_generation_respells_the_tail_and_loses_nothing(tok: Tokenizer, model: GPT, prompt: str) -> None:
    eng = Engine(model, tok, backend="torch")
    ids = tok.encode(prompt)
    allowed = brute_allowed(tok, tok.decode([ids[-1]]))
    for seed in range(6):
        res = eng.generate(prompt, max_new_tokens=6, temperature=1.0, seed=seed, stop_token_ids=())
        assert res.token_ids[0] in allowed
        assert res.prompt_tokens == len(ids) - 1
        assert prompt + res.text == tok.decode(ids[:-1] + res.token_ids, skip_special=True)
    # greedy: the first token is the argmax of the model's logits after the shortened prompt, over the allowed ids
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0, -1].float()
    best = max(allowed, key=lambda i: logits[i].item())
    res = eng.generate(prompt, max_new_tokens=3, temperature=0, stop_token_ids=())
    assert res.token_ids[0] == best
    assert prompt + res.text == tok.decode(ids[:-1] + res.token_ids, skip_special=True)


def test_without_healing_the_prompt_is_fed_whole(tok: Tokenizer, model: GPT) -> None:
    eng = Engine(model, tok, backend="torch")
    prompt = PROMPTS[0]
    ids = tok.encode(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1].float()
    res = eng.generate(prompt, max_new_tokens=3, temperature=0, stop_token_ids=(), heal=False)
    assert res.prompt_tokens == len(ids) and res.token_ids[0] == int(logits.argmax())
    assert prompt + res.text == tok.decode(ids + res.token_ids, skip_special=True)


def test_what_is_not_healed(tok: Tokenizer, model: GPT) -> None:
    eng = Engine(model, tok, backend="torch")
    ids = tok.encode(PROMPTS[0])
    assert eng._heal([ids[-1]]) == ([ids[-1]], None, "")  # one token: nothing left to prefill
    eos = tok.eos_id
    assert eng._heal([*ids, eos]) == ([*ids, eos], None, "")  # a special token
    dot = tok.encode("class Point:\n    def __init__(self, x, y):\n        self.")
    assert tok.decode([dot[-1]]) == "." and brute_allowed(tok, ".") == {dot[-1]}
    assert eng._heal(list(dot)) == (dot, None, "")  # no other token extends "."
    # an id prompt is used as given, even if it ends mid-merge
    res = eng.generate(ids, max_new_tokens=2, temperature=0, stop_token_ids=())
    assert res.prompt_tokens == len(ids)
