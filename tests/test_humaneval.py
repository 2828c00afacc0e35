"""HumanEval harness: problems, program assembly, the self-check (canonical solutions pass, empty ones do not),
pass@k aggregation, the generation-callback flow, atomic results, and the CLI (--samples, and --model on a tiny
random model through the real loader and engine)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from rich.console import Console
from serve_fakes import build_tiny_model
from typer.testing import CliRunner

from nanochat.eval import cli
from nanochat.eval.humaneval import (
    NUM_PROBLEMS,
    STOP_SEQUENCES,
    build_program,
    evaluate_samples,
    load_problems,
    load_samples,
    print_summary,
    run_humaneval,
    truncate_at_stop,
    write_json_atomic,
)
from nanochat.eval.sandbox import UNSAFE_WARNING, Sandbox, bwrap_usable

needs_bwrap = pytest.mark.skipif(not bwrap_usable(), reason="bubblewrap cannot create namespaces on this machine")


@pytest.fixture(scope="module")
def problems():  # type: ignore[no-untyped-def]
    return load_problems()


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if not bwrap_usable():
        pytest.skip("bubblewrap cannot create namespaces on this machine")
    return Sandbox(timeout=20.0)


# ---------------------------------------------------------------------------------------------------------
# Problems and programs


def test_load_problems(problems) -> None:  # type: ignore[no-untyped-def]
    assert len(problems) == NUM_PROBLEMS
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"] and list(problems)[-1] == "HumanEval/163"
    for p in problems.values():
        assert p.prompt and p.test and p.entry_point and p.canonical_solution
        assert f"def {p.entry_point}" in p.prompt and "def check(" in p.test


def test_truncate_at_stop() -> None:
    body = "    return a + b\n"
    assert truncate_at_stop(body) == body
    assert truncate_at_stop(body + "\ndef other():\n    pass\n") == body
    assert truncate_at_stop(body + "\nprint(f(1))\n# trailing\n") == body  # earliest of two stops
    assert truncate_at_stop(body + "\nclass X: pass") == body
    assert truncate_at_stop(body + '\nif __name__ == "__main__":\n    main()') == body
    assert (
        truncate_at_stop(body + "    # a comment inside the body stays\n")
        == body + "    # a comment inside the body stays\n"
    )
    assert truncate_at_stop("x\n#y", stop=["\n#"]) == "x" and truncate_at_stop("", STOP_SEQUENCES) == ""
    assert truncate_at_stop("abc", stop=["", "c"]) == "ab"  # an empty stop string is ignored


def test_build_program(problems) -> None:  # type: ignore[no-untyped-def]
    p = problems["HumanEval/0"]
    prog = build_program(p, "    return True\n")
    assert prog == p.prompt + "    return True\n" + "\n" + p.test + "\ncheck(has_close_elements)\n"
    compile(prog, "<program>", "exec")


def test_load_samples(tmp_path: Path) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n\n{"task_id": "HumanEval/1", "completion": ""}\n')
    assert [s["task_id"] for s in load_samples(f)] == ["HumanEval/0", "HumanEval/1"]
    f.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(ValueError, match="completion"):
        load_samples(f)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match=":1: not JSON"):
        load_samples(f)


# ---------------------------------------------------------------------------------------------------------
# The self-check


@needs_bwrap
@pytest.mark.slow
def test_canonical_solutions_pass_and_empty_completions_fail(problems, sandbox: Sandbox) -> None:  # type: ignore[no-untyped-def]
    """All 164 canonical solutions pass and all 164 empty completions fail, in one run with 2 workers."""
    samples = []
    for task_id, p in problems.items():
        samples.append({"task_id": task_id, "completion": p.canonical_solution})
        samples.append({"task_id": task_id, "completion": ""})
    t0 = time.monotonic()
    res = evaluate_samples(samples, ks=(1, 2), workers=2, problems=problems, sandbox=sandbox)
    elapsed = time.monotonic() - t0
    print(f"\nHumanEval self-check: {len(samples)} programs with 2 workers in {elapsed:.1f} s")
    recs = res["records"]
    canonical, empty = recs[0::2], recs[1::2]
    assert [r["task_id"] for r in canonical] == list(problems)
    failed_canonical = [(r["task_id"], r["status"], r["reason"]) for r in canonical if not r["passed"]]
    assert failed_canonical == []
    assert sum(r["passed"] for r in empty) == 0
    assert all(r["status"] == "failed" for r in empty)
    assert res["status_counts"] == {"passed": 164, "failed": 164}
    assert res["pass_at_k"] == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1.0)}
    assert res["per_problem"]["HumanEval/7"] == {"n": 2, "c": 1, "pass@1": 0.5, "pass@2": 1.0}
    assert res["sandbox"]["backend"] == "bwrap" and res["warnings"] == []


@needs_bwrap
def test_early_exit_is_not_a_pass(problems, sandbox: Sandbox) -> None:  # type: ignore[no-untyped-def]
    samples = [
        {"task_id": "HumanEval/0", "completion": "    import sys\n    sys.exit(0)\n"},
        {"task_id": "HumanEval/0", "completion": "    import os\n    os._exit(0)\n"},
        {"task_id": "HumanEval/0", "completion": "    while True:\n        pass\n"},
        {"task_id": "HumanEval/0", "completion": problems["HumanEval/0"].canonical_solution},
    ]
    res = evaluate_samples(samples, ks=(1,), problems=problems, sandbox=sandbox, timeout=1.5)
    statuses = [(r["status"], r["reason"]) for r in res["records"]]
    assert statuses[0] == ("failed", "exited before the tests finished")
    assert statuses[1] == ("failed", "exited before the tests finished")
    assert statuses[2][0] == "timeout"
    assert statuses[3] == ("passed", "")
    assert [r["sample_index"] for r in res["records"]] == [0, 1, 2, 3]
    assert res["pass_at_k"]["pass@1"] == pytest.approx(0.25)


@needs_bwrap
def test_k_larger_than_n_dropped_with_note(problems, sandbox: Sandbox) -> None:  # type: ignore[no-untyped-def]
    good = problems["HumanEval/2"].canonical_solution
    samples = [{"task_id": "HumanEval/2", "completion": good}] * 3 + [{"task_id": "HumanEval/3", "completion": ""}]
    res = evaluate_samples(samples, ks=(1, 2, 5), problems=problems, sandbox=sandbox)
    assert res["per_problem"]["HumanEval/2"] == {"n": 3, "c": 3, "pass@1": 1.0, "pass@2": 1.0}
    assert res["per_problem"]["HumanEval/3"] == {"n": 1, "c": 0, "pass@1": 0.0}
    assert res["pass_at_k"] == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1.0)}
    assert res["pass_at_k_problems"] == {"pass@1": 2, "pass@2": 1}
    notes = " | ".join(res["notes"])
    assert "pass@5 dropped: no problem has at least 5 samples" in notes
    assert "pass@2 dropped for 1 problem(s)" in notes


def test_unknown_task_id_rejected(problems) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown task_id"):
        evaluate_samples([{"task_id": "HumanEval/999", "completion": ""}], problems=problems, unsafe_no_sandbox=True)


# ---------------------------------------------------------------------------------------------------------
# The generation callback


class FakeGenerate:
    """Answers even-numbered problems with the canonical solution plus trailing junk (cut by the stop
    sequences) and odd ones with a wrong body; records its calls."""

    def __init__(self, problems) -> None:  # type: ignore[no-untyped-def]
        self.by_prompt = {p.prompt: p for p in problems.values()}
        self.calls: list[tuple[int, int, float, int, list[str], int]] = []
        self.tokens_generated = 0

    def __call__(self, prompts, n, temperature, max_new_tokens, stop, seed):  # type: ignore[no-untyped-def]
        self.calls.append((len(prompts), n, temperature, max_new_tokens, stop, seed))
        out = []
        for prompt in prompts:
            p = self.by_prompt[prompt]
            number = int(p.task_id.split("/")[1])
            text = p.canonical_solution + "\ndef junk(:\n" if number % 2 == 0 else "    return None\n"
            self.tokens_generated += 10 * n
            out.append([text] * n)
        return out


@needs_bwrap
def test_run_humaneval_with_generate_callback(problems, sandbox: Sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gen = FakeGenerate(problems)
    out = tmp_path / "sub" / "he.json"
    info = {"name": "fake", "params": 1234, "config": {"d": 2}, "file_hash": "abc"}
    res = run_humaneval(
        gen,
        n=2,
        ks=(1, 2, 10),
        temperature=0.7,
        max_new_tokens=64,
        limit=6,
        workers=2,
        batch_size=4,
        seed=100,
        model_info=info,
        out=out,
        sandbox=sandbox,
        progress=False,
        problems=problems,
    )
    assert [c[0] for c in gen.calls] == [4, 2]  # batched across prompts
    assert [c[5] for c in gen.calls] == [100, 104]  # seed of each batch's first prompt
    assert gen.calls[0][1:5] == (2, 0.7, 64, STOP_SEQUENCES)
    assert res["pass_at_k"] == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(0.5)}
    assert "dropped k > n=2: 10" in res["notes"]
    assert [(r["task_id"], r["sample_index"]) for r in res["records"]] == [
        (f"HumanEval/{i}", s) for i in range(6) for s in range(2)
    ]
    assert all("junk" not in r["completion"] for r in res["records"])
    assert res["timing"]["tokens_generated"] == 6 * 2 * 10 and res["timing"]["tokens_per_s"] > 0
    on_disk = json.loads(out.read_text())
    assert on_disk["model"] == info and on_disk["settings"]["n"] == 2 and on_disk["settings"]["ks"] == [1, 2]
    assert on_disk["pass_at_k"] == res["pass_at_k"] and on_disk["sandbox"]["backend"] == "bwrap"
    assert [p.name for p in out.parent.iterdir()] == ["he.json"]  # no temporary files left behind


def test_generate_returning_wrong_shape_is_an_error(problems) -> None:  # type: ignore[no-untyped-def]
    def bad(prompts, n, temperature, max_new_tokens, stop, seed):  # type: ignore[no-untyped-def]
        return [["    return 1\n"]] * (len(prompts) - 1)

    with pytest.raises(ValueError, match="generate must return"):
        run_humaneval(bad, n=1, limit=3, problems=problems, unsafe_no_sandbox=True, progress=False)


def test_write_json_atomic_replaces(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        write_json_atomic(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 2}  # a failed write leaves the old file intact
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_print_summary_shows_pass_at_k_and_warnings() -> None:
    console = Console(record=True, width=120)
    print_summary(
        {
            "model": {"name": "m"},
            "pass_at_k": {"pass@1": 0.25},
            "pass_at_k_problems": {"pass@1": 4},
            "status_counts": {"passed": 1, "failed": 3},
            "sandbox": {"backend": "none", "sandboxed": False},
            "warnings": [UNSAFE_WARNING],
            "notes": ["a note"],
        },
        console,
    )
    text = console.export_text()
    assert "HumanEval — m" in text and "25.00%" in text and "UNSANDBOXED" in text
    assert "UNSAFE" in text and "a note" in text


# ---------------------------------------------------------------------------------------------------------
# CLI


def _write_samples(path: Path, problems) -> None:  # type: ignore[no-untyped-def]
    rows = [
        {"task_id": f"HumanEval/{i}", "completion": problems[f"HumanEval/{i}"].canonical_solution} for i in range(3)
    ]
    rows.append({"task_id": "HumanEval/3", "completion": "    return 'wrong'\n"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@needs_bwrap
def test_cli_samples_flow_writes_valid_json(problems, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    samples, out = tmp_path / "samples.jsonl", tmp_path / "out.json"
    _write_samples(samples, problems)
    r = CliRunner().invoke(
        cli.app,
        ["humaneval", "--samples", str(samples), "-k", "1,10", "--workers", "2", "--timeout", "20", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["benchmark"] == "humaneval" and res["pass_at_k"] == {"pass@1": 0.75}
    assert res["status_counts"] == {"passed": 3, "failed": 1}
    assert len(res["records"]) == 4 and res["model"]["name"] == "samples"
    assert len(res["model"]["samples_sha256"]) == 64
    assert any("pass@10 dropped" in n for n in res["notes"])
    assert "75.00%" in r.output

    r = CliRunner().invoke(cli.app, ["humaneval", "--samples", str(samples), "--limit", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["status_counts"] == {"passed": 2}


def test_cli_unsafe_and_missing_bwrap(problems, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    samples, out = tmp_path / "samples.jsonl", tmp_path / "out.json"
    _write_samples(samples, problems)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap
    r = CliRunner().invoke(cli.app, ["humaneval", "--samples", str(samples), "--out", str(out)])
    assert r.exit_code == 2 and "bubblewrap" in r.output and not out.exists()
    r = CliRunner().invoke(
        cli.app, ["humaneval", "--samples", str(samples), "--out", str(out), "--unsafe-no-sandbox", "--limit", "1"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["warnings"] == [UNSAFE_WARNING] and res["sandbox"]["sandboxed"] is False
    assert res["status_counts"] == {"passed": 1}


def test_cli_model_argument_checks(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\0")
    runner = CliRunner()
    r = runner.invoke(cli.app, ["humaneval", "--model", str(model), "--out", str(tmp_path / "o.json")])
    # the loader's own error, naming the file, and no results file
    text = "".join(r.output.split())  # rich wraps long paths
    assert r.exit_code == 2 and "model.safetensors" in text and not (tmp_path / "o.json").exists(), r.output
    r = runner.invoke(cli.app, ["humaneval", "--model", str(tmp_path / "none.gguf")])
    assert r.exit_code == 2 and "doesnotexist" in "".join(r.output.split())
    r = runner.invoke(cli.app, ["humaneval"])
    assert r.exit_code == 2 and "exactly one of" in r.output
    r = runner.invoke(cli.app, ["humaneval", "--samples", str(tmp_path / "none.jsonl"), "-k", "1,x"])
    assert r.exit_code == 2


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model (tests/serve_fakes.py) with room for HumanEval's longest prompts."""
    return build_tiny_model(tmp_path_factory.mktemp("he-model") / "tiny.gguf", seq_len=2048)


@needs_bwrap
def test_cli_model_flow_on_a_tiny_model(problems, tiny_gguf: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--model through the real loader and engine: every recorded completion is what the engine generates for that
    prompt and sample alone (BOS + prompt, seed (seed + j) * 100_003 + i, cut at the stop sequences), the model
    is described by the file's own hash, and pass@k is computed from the sandbox's statuses."""
    import hashlib

    from nanochat.engine import Engine
    from nanochat.export import load
    from nanochat.model import GPT

    out = tmp_path / "he.json"
    args = ["humaneval", "--model", str(tiny_gguf), "--limit", "3", "-n", "2", "-k", "1,2", "--temperature", "0.9",
            "--max-new-tokens", "24", "--seed", "7", "--batch-size", "4", "--timeout", "20", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    recs = res["records"]
    assert [(x["task_id"], x["sample_index"]) for x in recs] == [
        (f"HumanEval/{j}", i) for j in range(3) for i in range(2)
    ]

    loaded = load(tiny_gguf)
    engine, tok = Engine(loaded), loaded.tokenizer
    for x in recs:
        j, i = int(x["task_id"].split("/")[1]), x["sample_index"]
        alone = engine.generate(
            [tok.bos_id, *tok.encode(problems[x["task_id"]].prompt)],
            max_new_tokens=24,
            temperature=0.9,
            seed=(7 + j) * 100_003 + i,
            stop=STOP_SEQUENCES,
            stop_token_ids={tok.bos_id, tok.eos_id},
        )
        assert x["completion"] == truncate_at_stop(alone.text), x["task_id"]
    assert len({x["completion"] for x in recs}) > 1  # sampled, seeded per prompt and sample
    assert all(x["status"] in ("passed", "failed", "timeout") for x in recs), [x["status"] for x in recs]
    passes = [sum(x["status"] == "passed" for x in recs if x["task_id"] == f"HumanEval/{j}") for j in range(3)]
    assert res["pass_at_k"]["pass@1"] == pytest.approx(sum(c / 2 for c in passes) / 3)
    assert res["pass_at_k"]["pass@2"] == pytest.approx(sum(c > 0 for c in passes) / 3)

    info = res["model"]
    assert info["path"] == str(tiny_gguf) and info["format"] == "gguf"
    assert info["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert info["params"] == sum(p.numel() for p in GPT(loaded.config).parameters())
    assert res["settings"]["problems"] == 3 and res["settings"]["n"] == 2
