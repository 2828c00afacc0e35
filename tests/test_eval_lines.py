"""Line-level HumanEval (``nanochat.eval.lines``) and HumanEval bits-per-byte.

What is checked, and against what:
- the tasks rebuild every canonical program exactly, one per non-blank line (counted independently);
- every original line (and block) put back passes, in all 1,033 tasks, through the shortcut; a sample runs in the
  real sandbox with the shortcuts off, which checks the shortcut's premise; a model that writes the canonical text
  and keeps going is cut exactly at the end of the line/block;
- an empty line fails every task whose line matters: all tasks through the compile check, a sample in the sandbox,
  and the 26 lines whose deletion the tests cannot see are listed (and shown to pass);
- known wrong lines fail; span blocks and cut points on hand-written examples;
- prompt ids: left to right and FIM (PSM) layouts, truncation, the token-boundary claim, a clear FIM error;
- the CLI end to end on a tiny trained model (run directory and GGUF), report and compare;
- humaneval_bpb against a brute-force computation from the logits.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from nanochat.eval.cli import app as eval_app
from nanochat.eval.humaneval import build_program, load_problems
from nanochat.eval.lines import (
    LINE_KINDS,
    FimUnavailable,
    LineTask,
    _Judge,
    build_prompts,
    evaluate_written,
    generation_cut,
    humaneval_bpb,
    indentation,
    line_kind,
    make_tasks,
    span_end,
)
from nanochat.eval.sandbox import Sandbox, bwrap_usable

NUM_LINE_TASKS = 1033  # non-blank lines of the 164 canonical solutions (counted again in a test)

# Lines whose deletion the problem's tests cannot detect (found by running all 622 empty-line programs that compile
# and differ from the canonical one, in the sandbox): the rest of the solution already covers them, or the tests
# never reach them. A comment line (HumanEval/99/L4) also does not matter; it is decided without running.
DONT_MATTER = {
    # an initialisation that every path overwrites before reading it
    "HumanEval/20/L1": "closest_pair = None",
    "HumanEval/33/L1": "l = list(l)",  # the input is already a list
    "HumanEval/109/L4": "my_arr=[]",
    "HumanEval/129/L2": "val = n * n + 1",
    # an early exit for an input the general code handles the same way
    "HumanEval/66/L1": 'if s == "": return 0',
    "HumanEval/68/L1": "if(len(arr) == 0): return []",
    "HumanEval/92/L5": "return False  (falls through to the same result)",
    # a `break` after which the loop changes nothing the tests look at
    "HumanEval/95/L9": "break",
    "HumanEval/95/L19": "break",
    "HumanEval/96/L7": "break",
    "HumanEval/150/L6": "break",
    # a block header whose body then joins the block before it (same indentation), where the tests do not tell
    "HumanEval/81/L17": "elif gpa > 2.0:",
    "HumanEval/111/L8": "if t>0:",
    "HumanEval/118/L6": "if word[i] in vowels:",
    "HumanEval/127/L4": "if num == 2:",
    "HumanEval/127/L6": "for i in range(2, num):",
    "HumanEval/127/L7": "if num%i == 0:",
    "HumanEval/129/L10": "if j != 0:",
    # branches and statements the tests never exercise
    "HumanEval/20/L9": "closest_pair = tuple(sorted([elem, elem2]))  (the else branch sets it too)",
    "HumanEval/46/L7": "results.pop(0)",
    "HumanEval/105/L7": '6: "Six",',
    "HumanEval/105/L8": '7: "Seven",',
    "HumanEval/124/L2": "date = date.strip()",
    "HumanEval/124/L7": "if month in [1,3,5,7,8,10,12] and day < 1 or day > 31:",
    "HumanEval/124/L11": "if month == 2 and day < 1 or day > 29:",
    "HumanEval/127/L9": "return True",
}

needs_bwrap = pytest.mark.skipif(not bwrap_usable(), reason="bubblewrap cannot create namespaces on this machine")


@pytest.fixture(scope="module")
def problems():  # type: ignore[no-untyped-def]
    return load_problems()


@pytest.fixture(scope="module")
def tasks(problems) -> list[LineTask]:  # type: ignore[no-untyped-def]
    return make_tasks(problems)


@pytest.fixture(scope="module")
def span_tasks(problems) -> list[LineTask]:  # type: ignore[no-untyped-def]
    return make_tasks(problems, span=True)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if not bwrap_usable():
        pytest.skip("bubblewrap cannot create namespaces on this machine")
    return Sandbox(timeout=10.0)


# ---------------------------------------------------------------------------------------------------------
# Tasks


def test_tasks_rebuild_every_canonical_program(problems, tasks, span_tasks) -> None:  # type: ignore[no-untyped-def]
    nonblank = sum(1 for p in problems.values() for line in p.canonical_solution.split("\n") if line.strip())
    assert len(tasks) == len(span_tasks) == nonblank == NUM_LINE_TASKS
    assert len({t.task_id for t in tasks}) == len(tasks)
    for t in tasks + span_tasks:
        p = t.problem
        assert t.prefix + t.expected + "\n" + t.after == p.prompt + p.canonical_solution
        assert t.source(t.expected) == p.prompt + p.canonical_solution
        assert t.program(t.expected) == build_program(p, p.canonical_solution)
        assert t.prefix == t.prefix.rstrip() and not t.gap.strip() and "\n" in t.gap
        assert t.original.strip() and not t.original.endswith("\n")
        if not t.span:
            assert t.end == t.line + 1 and "\n" not in t.original
    assert make_tasks(problems, limit=2) == [t for t in tasks if t.problem.task_id in ("HumanEval/0", "HumanEval/1")]
    with pytest.raises(ValueError, match="limit"):
        make_tasks(problems, limit=0)


def test_original_lines_pass_every_task(tasks, span_tasks) -> None:  # type: ignore[no-untyped-def]
    """All tasks, both modes: the original put back passes (shortcut: the canonical syntax tree), the same line
    written with other spacing or a trailing comment too, and a model writing the canonical text on and on is cut
    exactly at the end of the line or block."""
    judge = _Judge()
    for t in tasks + span_tasks:
        assert judge(t, t.expected) == (True, "same syntax tree as the canonical program", "same_as_original")
        respaced = "\n" + t.expected.lstrip("\n")
        if "#" not in t.original and '"""' not in t.original and "'''" not in t.original:
            respaced += "  # written by a model"
        assert judge(t, respaced) is not None and judge(t, respaced)[0], t.task_id  # type: ignore[index]
        for tail in ("\n\n\ndef check(candidate):\n    pass\n", "\n", ""):
            text = t.expected + t.suffix + tail
            cut = t.cut(text)
            written = (text if cut is None else text[:cut]).rstrip()
            assert written == t.expected.rstrip(), (t.task_id, tail)
    records = evaluate_written(tasks, [[t.expected] for t in tasks])  # no sandbox needed: all decided
    assert len(records) == NUM_LINE_TASKS and all(r["passed"] for r in records)


@needs_bwrap
def test_original_lines_pass_in_the_sandbox(tasks, span_tasks, sandbox) -> None:  # type: ignore[no-untyped-def]
    """The shortcut's premise, checked for real: original-line programs (the canonical ones, and the ones with a
    re-spaced line) pass when run, shortcuts off."""
    sample = tasks[::37] + span_tasks[5::61]
    written = [[t.expected, "\n" + t.expected.lstrip("\n").rstrip() + "   "] for t in sample]
    records = evaluate_written(sample, written, sandbox=sandbox, shortcuts=False)
    assert len(records) == 2 * len(sample) >= 40
    assert all(r["decided_by"] == "sandbox" for r in records)
    assert [r["task_id"] for r in records if not r["passed"]] == []


@needs_bwrap
@pytest.mark.slow
def test_empty_line_fails_where_the_line_matters(tasks, sandbox) -> None:  # type: ignore[no-untyped-def]
    judge = _Judge()
    decided = {t.task_id: judge(t, "") for t in tasks}
    not_compiling = [tid for tid, d in decided.items() if d is not None and d[2] == "compile"]
    same = [tid for tid, d in decided.items() if d is not None and d[2] == "same_as_original"]
    to_run = [t for t in tasks if decided[t.task_id] is None]
    # deleting a block header leaves an indented body (or an empty block): it does not compile
    assert all(not decided[tid][0] for tid in not_compiling) and len(not_compiling) == 410  # type: ignore[index]
    assert same == ["HumanEval/99/L4"]  # a comment line
    assert len(to_run) == NUM_LINE_TASKS - 410 - 1
    assert set(DONT_MATTER) <= {t.task_id for t in to_run}
    # the sandbox on a sample of the rest, every known don't-matter line, and (the compile shortcut's premise)
    # a sample of the programs that do not compile
    by_id = {t.task_id: t for t in tasks}
    sample = to_run[::15]
    sample += [by_id[tid] for tid in DONT_MATTER if by_id[tid] not in sample]
    sample += [by_id[tid] for tid in not_compiling[::41]]
    records = evaluate_written(sample, [[""]] * len(sample), sandbox=sandbox, shortcuts=False, timeout=5.0)
    assert len(to_run[::15]) >= 30 and len(records) == len(sample)
    passed = {r["task_id"] for r in records if r["passed"]}
    assert passed == set(DONT_MATTER)
    for r in records:
        if r["task_id"] in not_compiling:
            assert "Error" in r["reason"] or r["status"] == "failed"


@needs_bwrap
def test_known_wrong_lines_fail(problems, sandbox) -> None:  # type: ignore[no-untyped-def]
    by_id = {t.task_id: t for t in make_tasks(problems, limit=13)}
    span_by_id = {t.task_id: t for t in make_tasks(problems, limit=13, span=True)}
    cases = [
        (by_id["HumanEval/0/L6"], "\n                    return False"),  # the opposite answer
        (by_id["HumanEval/0/L6"], "\n            return True"),  # the right statement, one block too far out
        (by_id["HumanEval/2/L1"], "\n    return number // 1.0"),  # integer part instead of the fraction
        (by_id["HumanEval/3/L5"], "\n        if balance <= 0:"),  # off by one
        (by_id["HumanEval/12/L5"], "\n    for s in reversed(strings):"),  # the last longest, not the first
        (span_by_id["HumanEval/0/L1"], "\n    for idx, elem in enumerate(numbers):\n        pass"),  # block gutted
    ]
    good = [(t, t.expected) for t, _ in cases[:2]]
    records = evaluate_written(
        [t for t, _ in cases + good], [[w] for _, w in cases + good], sandbox=sandbox, timeout=5.0
    )
    assert [r["passed"] for r in records] == [False] * len(cases) + [True] * len(good)
    assert [r["decided_by"] for r in records] == ["sandbox", "compile"] + ["sandbox"] * 4 + ["same_as_original"] * 2


class ScriptedGenerator:
    """A test double for the engine's ``generate_ids``: returns scripted texts for the tasks in order, applying the
    ``until`` cut points the way the engine does."""

    def __init__(self, tok, tasks: list[LineTask], script) -> None:  # type: ignore[no-untyped-def]
        self.tok, self.tasks, self.script = tok, tasks, script
        self.tokens_generated = 0
        self.calls: list[tuple[int, int]] = []  # (batch size, max_new_tokens)
        self._next = 0

    def generate_ids(self, prompts, n, temperature, max_new_tokens, seed, until=None, stop_ids=None):  # type: ignore[no-untyped-def]
        self.calls.append((len(prompts), max_new_tokens))
        out = []
        for j in range(len(prompts)):
            task = self.tasks[self._next]
            self._next += 1
            results = []
            for i in range(n):
                text = self.script(task, i)
                cut = until[j](text) if until is not None else None
                ids = list(range(len(text) // 4 + 1))
                self.tokens_generated += len(ids)
                results.append(
                    types.SimpleNamespace(
                        text=text if cut is None else text[:cut],
                        token_ids=ids,
                        finish_reason="stop" if cut is not None else "length",
                    )
                )
            out.append(results)
        return out


@needs_bwrap
def test_run_lines_with_scripted_generations(fim_tok, problems, sandbox, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The whole pipeline on known generations: cut points, judging, the exit-before-tests rule, pass rate,
    per-problem counts and pass@k (against the binomial formula), the results file."""
    from nanochat.eval.lines import run_lines

    tasks = make_tasks(problems, limit=3)

    def script(t: LineTask, i: int) -> str:
        if i == 0:  # the canonical text, and the model goes on: cut at the end of the line
            return t.expected + t.suffix + "\n\ndef check(x):\n    pass\n"
        if i == 1:  # nothing: no line in these problems can be left out
            return ""
        if tasks.index(t) % 2 == 0:  # the line, trailing spaces, no newline yet: passes, spaces dropped
            return t.expected + "   "
        # exits with status 0 before the tests finish (a block header stays a block header)
        stmt = "if __import__('os')._exit(0):" if t.original.rstrip().endswith(":") else "import os; os._exit(0)"
        return "\n" + " " * indentation(t.original) + stmt

    gen = ScriptedGenerator(fim_tok, tasks, script)
    out = tmp_path / "lines.json"
    res = run_lines(
        gen, n=3, ks=(1, 2, 5), limit=3, sandbox=sandbox, out=out, batch_size=4, progress=False, max_seq=100_000
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert gen.calls[0] == (4, 64) and sum(b for b, _ in gen.calls) == len(tasks)
    recs = {(r["task_id"], r["sample_index"]): r for r in res["records"]}
    c_of = {}
    for k, t in enumerate(tasks):
        r0, r1, r2 = (recs[(t.task_id, i)] for i in range(3))
        assert r0["passed"] and r0["written"] == t.expected and r0["decided_by"] == "same_as_original"
        assert not r1["passed"] and r1["written"] == ""
        if k % 2 == 0:
            assert r2["passed"] and r2["written"] == t.expected.rstrip()
        else:
            assert not r2["passed"] and r2["reason"] == "exited before the tests finished", r2
        c_of[t.task_id] = 1 + (k % 2 == 0)
    passed = sum(c_of.values())
    assert (res["passed"], res["samples"], res["tasks"]) == (passed, 3 * len(tasks), len(tasks))
    assert math.isclose(res["pass_rate"], passed / (3 * len(tasks)))
    for k in (1, 2):
        want = sum(1 - math.comb(3 - c, k) / math.comb(3, k) for c in c_of.values()) / len(tasks)
        assert math.isclose(res["pass_at_k"][f"pass@{k}"], want)
    assert "pass@5" not in res["pass_at_k"] and any("dropped k > n=3: 5" in note for note in res["notes"])
    for pid in ("HumanEval/0", "HumanEval/1", "HumanEval/2"):
        mine = [t for t in tasks if t.problem.task_id == pid]
        e = res["per_problem"][pid]
        assert (e["tasks"], e["samples"], e["passed"]) == (len(mine), 3 * len(mine), sum(c_of[t.task_id] for t in mine))
    assert res["timing"]["tokens_generated"] == gen.tokens_generated and res["truncated_prompts"] == 0
    for kind in LINE_KINDS:  # the per-kind counts, against the tasks' kinds and the per-task pass counts
        mine = [t for t in tasks if t.kind == kind]
        if not mine:
            assert kind not in res["per_kind"]
            continue
        e = res["per_kind"][kind]
        assert (e["tasks"], e["samples"], e["passed"]) == (len(mine), 3 * len(mine), sum(c_of[t.task_id] for t in mine))
        assert math.isclose(e["pass_rate"], e["passed"] / e["samples"])
    assert sum(e["samples"] for e in res["per_kind"].values()) == res["samples"]


# ---------------------------------------------------------------------------------------------------------
# Spans and cut points (hand-written)


def test_span_end_by_hand() -> None:
    lines = [
        "    total = 0\n",  # 0
        "    for x in xs:\n",  # 1
        "        if x > 0:\n",  # 2
        "            total += x\n",  # 3
        "\n",  # 4
        "        else:\n",  # 5
        "            total -= x\n",  # 6
        "\n",  # 7
        "    return total\n",  # 8
    ]
    assert span_end(lines, 0) == 1  # a simple statement is its own block
    assert span_end(lines, 1) == 7  # the loop with its body, the blank line inside kept, the one after not
    assert span_end(lines, 2) == 4  # `if` ends where `else` starts (same indentation)
    assert span_end(lines, 5) == 7
    assert span_end(lines, 8) == 9
    cont = ["    return [x for x in xs\n", "            if x]\n", "    # done\n"]
    assert span_end(cont, 0) == 2  # a continuation line indented deeper belongs to the statement
    with pytest.raises(ValueError, match="blank"):
        span_end(lines, 4)


def test_line_kinds_by_hand(tasks) -> None:  # type: ignore[no-untyped-def]
    assert line_kind("    result = []", first_of_body=True) == "first"  # position wins over the text
    assert line_kind("        return max(xs)") == line_kind("return") == "return"
    assert line_kind("    returned = 1") == "other"  # `return` as a word, not a prefix
    for header in ("if x > 0:", "    elif not s:  # empty", "else:", "for i, c in enumerate(s):", "while b:", "try:"):
        assert line_kind(header) == "header", header
    assert line_kind("    def helper(s):") == "header"
    assert line_kind("    x = 1  # note:") == "other"  # a colon in a comment
    assert line_kind("    if_seen = {'a': 1}") == "other"
    assert line_kind("    d = {1: 2}") == "other" and line_kind("    break") == "other"
    # HumanEval/0: the loop header is the first line; the inner loop and `if` are headers
    kinds = {t.task_id: t.kind for t in tasks if t.problem.task_id == "HumanEval/0"}
    assert kinds == {
        "HumanEval/0/L1": "first",
        "HumanEval/0/L2": "header",
        "HumanEval/0/L3": "header",
        "HumanEval/0/L4": "other",
        "HumanEval/0/L5": "header",
        "HumanEval/0/L6": "return",
        "HumanEval/0/L8": "return",
    }
    # every problem has exactly one first line, and every task has a kind
    firsts = [t.problem.task_id for t in tasks if t.kind == "first"]
    assert len(firsts) == len(set(firsts)) == len({t.problem.task_id for t in tasks})
    assert {t.kind for t in tasks} == set(LINE_KINDS)


def test_generation_cut_by_hand() -> None:
    # a line: up to the first newline after its first non-whitespace character
    assert generation_cut("\n    return x\n    y = 2\n") == len("\n    return x")
    assert generation_cut("\n\n    return x") is None  # not finished yet
    assert generation_cut("\n   \n") is None  # only whitespace so far
    assert generation_cut(" + 1\n    z = 0", "    y = x") == len(" + 1")  # continues the previous line
    # a span: until a later line starts at or left of the first line's indentation
    text = "\n    for x in xs:\n        total += x\n\n        print(x)\n    return total\n"
    assert generation_cut(text, "    total = 0", span=True) == text.index("\n\n        print") + len(
        "\n\n        print(x)"
    )
    assert generation_cut("\n    a = 1\n    b = 2\n", span=True) == len("\n    a = 1")
    assert generation_cut("\n    a = 1\n\n  \n    b = 2\n", span=True) == len("\n    a = 1")  # blank lines stay out
    assert generation_cut("\n        a = 1\n    b = 2", span=True) == len("\n        a = 1")  # a dedent
    assert generation_cut("\n    if a:\n        b\n", span=True) is None  # the next line's indentation is unknown
    assert generation_cut("\n    if a:\n        b\n   ", span=True) is None
    assert generation_cut("\n    if a:\n        b\n    ", span=True) is None  # 4 spaces: maybe more to come
    assert generation_cut("\n    if a:\n        b\n    e", span=True) == len("\n    if a:\n        b")
    assert generation_cut("\n    if a:\n        b\ndef f", span=True) == len("\n    if a:\n        b")


# ---------------------------------------------------------------------------------------------------------
# Prompt ids


@pytest.fixture(scope="module")
def fim_tok():  # type: ignore[no-untyped-def]
    from nanochat.data.tokenizer import Tokenizer

    texts = [p.prompt + p.canonical_solution for p in list(load_problems().values())[:60]]
    tok = Tokenizer.train(texts, vocab_size=600)
    if tok.fim_ids() is None:
        pytest.skip("this tokenizer module has no FIM tokens yet")
    return tok


def test_prompt_ids_left_to_right_and_fim(fim_tok, tasks) -> None:  # type: ignore[no-untyped-def]
    tok = fim_tok
    pre, suf, mid = tok.fim_ids()
    sample = tasks[::50]
    l2r, cut = build_prompts(sample, tok)
    assert cut == 0
    fim, cut = build_prompts(sample, tok, fim=True)
    assert cut == 0
    for t, a, b in zip(sample, l2r, fim, strict=True):
        p_ids, s_ids = tok.encode(t.prefix), tok.encode("\n" + t.after)
        assert a == [tok.bos_id, *p_ids]
        assert b == [tok.bos_id, pre, *p_ids, suf, *s_ids, mid]
        # the prompt is cut at a token boundary: the whole file tokenizes with the prompt's tokens as its start
        whole = tok.encode(t.prefix + t.expected + t.suffix)
        assert whole[: len(p_ids)] == p_ids
        try:
            from nanochat.data.fim import infill_prompt
        except ImportError:
            continue
        assert b == infill_prompt(tok, t.prefix, t.suffix)  # the layout FIM training and /infill use


def test_prompt_truncation(fim_tok, tasks) -> None:  # type: ignore[no-untyped-def]
    tok = fim_tok
    pre, suf, mid = tok.fim_ids()
    t = tasks[200]
    p_ids, s_ids = tok.encode(t.prefix), tok.encode(t.suffix)
    budget = 40
    assert len(p_ids) > budget and len(s_ids) > budget // 4
    (l2r,), n = build_prompts([t], tok, budget=budget)
    assert n == 1 and l2r == p_ids[-budget:]
    (fim,), n = build_prompts([t], tok, fim=True, budget=budget)
    room = budget - 4
    k = room // 4  # the suffix gets a quarter of the room when both do not fit
    assert n == 1 and len(fim) == budget
    assert fim == [tok.bos_id, pre, *p_ids[len(p_ids) - (room - k) :], suf, *s_ids[:k], mid]
    # a short prefix leaves the rest of the room to the suffix
    short = LineTask("x/L1", t.problem, 0, 1, "def f():", "\n    ", "return 1", "    pass\n" * 40)
    (fim,), _ = build_prompts([short], tok, fim=True, budget=budget)
    sp = tok.encode(short.prefix)
    assert fim == [tok.bos_id, pre, *sp, suf, *tok.encode(short.suffix)[: room - len(sp)], mid]
    with pytest.raises(ValueError, match="too small"):
        build_prompts([t], tok, budget=4)


def test_fim_needs_fim_tokens(tasks) -> None:  # type: ignore[no-untyped-def]
    no_fim = types.SimpleNamespace(fim_ids=lambda: None, bos_id=0, encode_batch=lambda xs: [[1] for _ in xs])
    with pytest.raises(FimUnavailable, match="fill-in-the-middle tokens"):
        build_prompts(tasks[:2], no_fim, fim=True)
    assert build_prompts(tasks[:2], no_fim)[0] == [[0, 1], [0, 1]]  # left to right does not need them


# ---------------------------------------------------------------------------------------------------------
# A tiny trained model: the CLI end to end, and bits per byte

TOML = """
[model]
vocab_size = 512
seq_len = 256
n_layer = 1
n_head = 4
n_kv_head = 4
n_embd = 256
mlp_hidden = 256
residual = "standard"
qk_norm = false

[train]
batch_size = 2
seq_len = 64
steps = 2
vocab_size = 512
warmup_steps = 1
eval_every = 2
eval_batches = 1
save_every = 2
log_every = 0
final_eval = false  # the end-of-run evaluations are what these tests call themselves
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    import sysconfig

    from nanochat.train.cli import resolve_config
    from nanochat.train.loop import train

    tmp = tmp_path_factory.mktemp("linesrun")
    corpus = tmp / "corpus"
    corpus.mkdir()
    std = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "bisect.py", "heapq.py"]:
        (corpus / name).write_text((std / name).read_text())
    (tmp / "m.toml").write_text(TOML)
    out = tmp / "run"
    cfg = resolve_config(
        {
            "config": str(tmp / "m.toml"),
            "data": str(corpus),
            "data_dir": str(tmp / "data"),
            "out": str(out),
            "threads": 1,
            "val_fraction": 0.3,
        }
    )
    train(cfg)
    return out


@needs_bwrap
@pytest.mark.slow
def test_cli_lines_end_to_end(run_dir, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    r = runner.invoke(eval_app, ["lines", "--model", str(run_dir), "--limit", "2", "--max-new-tokens", "12"])
    assert r.exit_code == 0, r.output
    res = json.loads((run_dir / "lines.json").read_text())  # a run directory gets RUN/lines.json
    n_tasks = len(make_tasks(limit=2))
    assert res["benchmark"] == "humaneval_lines" and res["schema_version"] == 1
    assert res["tasks"] == res["samples"] == len(res["records"]) == n_tasks
    assert res["settings"]["mode"] == "line" and res["settings"]["fim"] is False
    assert res["passed"] == sum(r["passed"] for r in res["records"])
    assert math.isclose(res["pass_rate"], res["passed"] / n_tasks) and res["pass_at_k"]["pass@1"] == res["pass_rate"]
    assert set(res["per_problem"]) == {"HumanEval/0", "HumanEval/1"}
    assert sum(e["tasks"] for e in res["per_problem"].values()) == n_tasks
    assert res["timing"]["tokens_generated"] > 0 and res["timing"]["tokens_per_s"] > 0
    for rec in res["records"]:
        assert rec["status"] in {"passed", "failed", "timeout", "error"} and rec["tokens"] <= 12
        assert rec["decided_by"] in {"sandbox", "compile", "same_as_original"}
    # sampled, FIM, span, on a GGUF export, written where --out says
    from nanochat.export import export_gguf, load

    m = load(run_dir)
    gguf = export_gguf(m.torch_model(), m.tokenizer, tmp_path / "m.gguf")
    out = tmp_path / "lines_fim.json"
    args = ["lines", "--model", str(gguf), "--fim", "--span", "--limit", "1", "-n", "2", "-k", "1,2,5"]
    args += ["--temperature", "0.9", "--max-new-tokens", "16", "--out", str(out)]
    r = runner.invoke(eval_app, args)
    if m.tokenizer.fim_ids() is None:  # a tokenizer from before FIM support: a clear error, exit code 2
        assert r.exit_code == 2 and "fill-in-the-middle" in " ".join(r.output.split())
    else:
        assert r.exit_code == 0, r.output
        res2 = json.loads(out.read_text())
        n1 = len(make_tasks(limit=1))
        assert res2["settings"]["mode"] == "span" and res2["settings"]["fim"] is True
        assert len(res2["records"]) == 2 * n1 and set(res2["pass_at_k"]) == {"pass@1", "pass@2"}
        assert any("dropped k > n=2: 5" in note for note in res2["notes"])
        (run_dir / "lines_span_fim.json").write_text(out.read_text())
    # outside a run directory the default is ./lines_results.json
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(eval_app, ["lines", "--model", str(gguf), "--limit", "1", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output and (tmp_path / "lines_results.json").is_file()
    # HumanEval bpb beside it, then the report and compare read them all
    r = runner.invoke(eval_app, ["bpb", "--model", str(run_dir), "--humaneval", "--limit", "3"])
    assert r.exit_code == 0, r.output
    he = json.loads((run_dir / "bpb_humaneval.json").read_text())
    assert he["benchmark"] == "humaneval_bpb" and 0 < he["bpb"] < 30 and he["problems"] == 3
    r = runner.invoke(eval_app, ["report", str(run_dir)])
    assert r.exit_code == 0, r.output
    report = (run_dir / "report.md").read_text()
    assert "## Line completion (HumanEval lines)" in report and "`lines.json` | lines |" in report
    lines_row = next(row for row in report.splitlines() if row.startswith("| `lines.json` |"))
    kinds = json.loads((run_dir / "lines.json").read_text())["per_kind"]
    assert " · ".join(f"{k} {e['passed']}/{e['samples']}" for k, e in kinds.items()) in lines_row and kinds
    assert "bpb_humaneval.json" in report
    r = runner.invoke(
        eval_app, ["compare", str(run_dir / "lines.json"), str(run_dir / "bpb_humaneval.json"), "--png", "c.png"]
    )
    assert r.exit_code == 0, r.output
    assert "lines pass@1" in r.output and "HumanEval bpb" in r.output and f"{he['bpb']:.4f}" in r.output
    # bad input: a clear error
    r = runner.invoke(eval_app, ["lines", "--model", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())


@needs_bwrap
def test_evaluate_lines_from_a_path_and_in_memory(run_dir) -> None:  # type: ignore[no-untyped-def]
    """The training loop's entry point: a path, or the in-memory model with its tokenizer; greedy decoding gives
    the same lines either way, and the model's train/eval mode is left as it was."""
    from nanochat.eval.lines import evaluate_lines
    from nanochat.export import load

    a = evaluate_lines(run_dir, limit=1, max_new_tokens=6, progress=False)
    assert {"pass_rate", "passed", "tasks"} <= set(a) and a["tasks"] == len(make_tasks(limit=1))
    m = load(run_dir)
    model = m.torch_model().train()
    b = evaluate_lines(model, m.tokenizer, limit=1, max_new_tokens=6, progress=False)
    assert model.training
    assert [r["written"] for r in a["records"]] == [r["written"] for r in b["records"]]
    assert (a["pass_rate"], a["passed"]) == (b["pass_rate"], b["passed"])
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_lines(model)


def test_generate_ids_twin_of_text_generation(run_dir) -> None:  # type: ignore[no-untyped-def]
    """``EngineGenerate.generate_ids`` (token-id prompts) gives what the text interface gives for the same ids and
    seeds, and an ``until`` cut stops a sequence early with its text cut there."""
    from nanochat.eval.generation import EngineGenerate

    gen = EngineGenerate(run_dir, batch_size=3)
    texts = ["def f(x):", "class A:", "import os"]
    ids = [[gen.tok.bos_id, *gen.tok.encode(t)] for t in texts]
    for temperature, n in ((0.0, 1), (0.9, 2)):
        by_text = gen(texts, n, temperature, 10, [], 7)
        by_ids = gen.generate_ids(ids, n, temperature, 10, 7)
        assert [[r.text for r in rs] for rs in by_ids] == by_text
    full = gen.generate_ids(ids, 1, 0.0, 10, 7)
    before = gen.tokens_generated
    cut = gen.generate_ids(ids, 1, 0.0, 10, 7, until=[lambda t: 2 if len(t) >= 3 else None] * 3)
    for (f,), (c,) in zip(full, cut, strict=True):
        assert len(f.text) >= 3 and c.text == f.text[:2] and c.finish_reason == "stop"
        assert c.token_ids == f.token_ids[: len(c.token_ids)]
    assert sum(len(c.token_ids) for (c,) in cut) < sum(len(f.token_ids) for (f,) in full)  # stopped early
    assert gen.tokens_generated - before == sum(len(c.token_ids) for (c,) in cut)


def _brute_force_bpb(model, tok, problems, window: int | None = None) -> float:  # type: ignore[no-untyped-def]
    """Sum of -log p(target) over each solution's tokens, from one plain forward per sequence (or, past the context,
    per window), divided by ln 2 times the UTF-8 bytes of the scored text. The model in eval mode, as evaluated."""
    was_training = model.training
    model.eval()
    nats, nbytes = 0.0, 0
    for p in problems:
        ctx = p.prompt.rstrip()
        scored = p.prompt[len(ctx) :] + p.canonical_solution
        ids = [tok.bos_id, *tok.encode(ctx), *tok.encode(scored)]
        first = len(ids) - len(tok.encode(scored))
        nbytes += len(scored.encode("utf-8"))
        T = window or len(ids)
        chunk = T if len(ids) <= T + 1 else T // 2
        for a in range(first, len(ids), chunk):
            b = min(a + chunk, len(ids))
            w0 = max(0, b - 1 - T)
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([ids[w0 : b - 1]])).double(), dim=-1)[0]  # (L, V)
            for t in range(a, b):
                nats -= float(logp[t - 1 - w0, ids[t]])
    model.train(was_training)
    return nats / (math.log(2) * nbytes)


def test_humaneval_bpb_matches_brute_force(fim_tok, problems) -> None:  # type: ignore[no-untyped-def]
    from nanochat.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = dict(vocab_size=fim_tok.vocab_size, n_layer=1, n_head=4, n_kv_head=4, n_embd=256, mlp_hidden=256)
    chosen = list(problems.values())[:3]
    sub = {p.task_id: p for p in chosen}
    model = GPT(GPTConfig(**cfg, seq_len=2048, residual="standard")).train()
    with torch.no_grad():  # the output projection starts at zero: then the context has no effect on the logits, and
        model.blocks[0].attn.o_proj.weight.normal_(0.0, 1.0)  # a wrong context window would go unnoticed
    res = humaneval_bpb(model, fim_tok, problems=sub, batch_size=2)
    assert model.training  # restored
    assert math.isclose(res["bpb"], _brute_force_bpb(model, fim_tok, chosen), rel_tol=1e-6)
    scored = [p.prompt[len(p.prompt.rstrip()) :] + p.canonical_solution for p in chosen]
    assert res["bytes"] == sum(len(s.encode()) for s in scored) and res["problems"] == 3
    # a short context: the solution is scored in windows of the context, each target with at least half of it
    short = GPT(GPTConfig(**cfg, seq_len=64, residual="standard"))
    short.load_state_dict(model.state_dict())
    res = humaneval_bpb(short, fim_tok, problems=sub, batch_size=3)
    assert math.isclose(res["bpb"], _brute_force_bpb(short, fim_tok, chosen, window=64), rel_tol=1e-6)
    with pytest.raises(ValueError, match="tokenizer"):
        humaneval_bpb(model)
