"""The evaluation commands on a model trained by ``nanochat-train`` (tiny, a few steps): bpb, report,
HumanEval generation through the engine, compare; and export + sample from the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanochat.eval.cli import app as eval_app
from nanochat.train.cli import resolve_config
from nanochat.train.loop import train

TOML = """
[model]
vocab_size = 512
seq_len = 512
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
steps = 4
vocab_size = 512
warmup_steps = 1
eval_every = 2
eval_batches = 1
save_every = 2
log_every = 0
final_eval = false
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    import sysconfig

    tmp = tmp_path_factory.mktemp("evalrun")
    corpus = tmp / "corpus"
    corpus.mkdir()
    std = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py"]:
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


def test_bpb_command(run_dir, tmp_path):
    out = tmp_path / "bpb.json"
    r = CliRunner().invoke(eval_app, ["bpb", "--model", str(run_dir), "--max-tokens", "2048", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert 0 < res["bpb"] < 20 and res["tokens"] > 0 and res["bytes"] > res["tokens"] * 0.5


def test_bpb_of_a_run_lands_in_the_run(run_dir):
    (run_dir / "bpb.json").unlink(missing_ok=True)
    r = CliRunner().invoke(eval_app, ["bpb", "--model", str(run_dir), "--max-tokens", "2048"])
    assert r.exit_code == 0, r.output
    assert json.loads((run_dir / "bpb.json").read_text())["tokens"] > 0


def test_humaneval_with_model_and_report(run_dir):
    he = run_dir / "humaneval.json"
    r = CliRunner().invoke(
        eval_app,
        [
            "humaneval",
            "--model",
            str(run_dir),
            "-n",
            "2",
            "-k",
            "1,2",
            "--limit",
            "2",
            "--temperature",
            "0.8",
            "--max-new-tokens",
            "24",
        ],
    )  # no --out: a run directory collects its own results
    assert r.exit_code == 0, r.output
    res = json.loads(he.read_text())
    assert len(res["records"]) == 4
    # every program ran in the sandbox: a wrong completion fails or times out, but a sandbox that cannot start
    # (status "error") must turn this red
    errors = [(s["task_id"], s.get("reason")) for s in res["records"] if s["status"] == "error"]
    assert not errors, errors
    assert {s["status"] for s in res["records"]} <= {"passed", "failed", "timeout"}
    assert "pass@1" in res["pass_at_k"]
    r = CliRunner().invoke(eval_app, ["report", str(run_dir)])
    assert r.exit_code == 0, r.output
    report = (run_dir / "report.md").read_text()
    assert "## Training" in report and "HumanEval" in report and "loss.png" in report


def test_export_and_sample(run_dir, tmp_path):
    from nanochat.engine import Engine
    from nanochat.export import export_gguf, load

    m = load(run_dir)
    gguf_path = export_gguf(m.torch_model(), m.tokenizer, tmp_path / "m.gguf")
    g = load(gguf_path)
    ids = [m.tokenizer.bos_id, *m.tokenizer.encode("def f(x):")]
    a = Engine(m).generate(ids, max_new_tokens=8, temperature=0.0)
    b = Engine(g).generate(ids, max_new_tokens=8, temperature=0.0)
    # a trained model's greedy tokens survive the fp16 scales/embedding of the GGUF
    assert a.token_ids == b.token_ids
