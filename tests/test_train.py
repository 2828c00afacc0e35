"""Training loop: exact resume, checkpoints (retention, disk guard, atomicity), logs, signals, CLI, DDP, NUMA,
distillation. Small models and a small user corpus keep each run to seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nanochat.eval.lines import make_tasks
from nanochat.train import checkpoint as ckpt_mod
from nanochat.train.checkpoint import CheckpointManager, load_checkpoint
from nanochat.train.cli import app, resolve_config
from nanochat.train.config import TrainConfig
from nanochat.train.loop import train
from nanochat.train.metrics import MetricsLog
from nanochat.train.numa import numa_nodes, parse_cpulist, pin_to_node

TINY = """
[model]
vocab_size = 512
seq_len = 32
n_layer = 1
n_head = 4
n_kv_head = 2
n_embd = 256
mlp_hidden = 256
residual = "{residual}"

[train]
batch_size = 2
seq_len = 32
steps = 6
vocab_size = 512
warmup_steps = 1
decay_frac = 0.5
eval_every = 3
eval_batches = 1
save_every = 2
keep_last = 1
log_every = 0
final_eval = false
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus of real Python source: a few standard-library modules."""
    import sysconfig

    d = tmp_path_factory.mktemp("corpus")
    std = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "colorsys.py", "shlex.py"]:
        (d / name).write_text((std / name).read_text())
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def make_cfg(tmp_path: Path, corpus: Path, data_dir: Path, residual: str = "mhc_lite", **kw) -> TrainConfig:
    toml = tmp_path / f"tiny_{residual}.toml"
    toml.write_text(TINY.format(residual=residual))
    cli = {"config": str(toml), "data": str(corpus), "data_dir": str(data_dir), "threads": 1, **kw}
    return resolve_config(cli)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in MetricsLog.read(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize(
    "compile_,optimizer",
    [(False, "muon"), pytest.param(True, "muon", marks=pytest.mark.slow), (False, "adamw")],
    ids=["eager", "compiled", "adamw"],
)
def test_exact_resume(tmp_path, corpus, data_dir, compile_, optimizer):
    """Under the default dtype (bf16 on this CPU), eager and torch.compile'd, with Muon or AdamW on the hidden
    matrices: N steps straight and N/2 + resume + N/2 give bit-identical losses and weights."""
    kw = {"compile": compile_, "optimizer": optimizer}
    straight = train(make_cfg(tmp_path, corpus, data_dir, out=str(tmp_path / "a"), **kw))
    assert straight["finished"] and straight["steps"] == 6
    from nanochat.model.bitlinear import get_matmul_dtype

    assert get_matmul_dtype() == torch.float32  # the run's bf16 choice does not leak into the caller
    first = train(make_cfg(tmp_path, corpus, data_dir, out=str(tmp_path / "b"), stop_after=3, **kw))
    assert first["steps"] == 3 and not first["finished"]
    state = json.loads((CheckpointManager(tmp_path / "b").latest() / "state.json").read_text())
    assert state["optimizers"][0]["param_groups"][0]["name"] == optimizer  # the hidden matrices' optimizer
    resumed = train(resolve_config({"resume": str(tmp_path / "b"), "threads": 1}))
    assert resumed["finished"]
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert a == b  # bit for bit on CPU
    assert straight["final_val_loss"] == resumed["final_val_loss"]
    # and the final weights are identical
    from nanochat.model import GPT, GPTConfig

    ma, mb = (GPT(GPTConfig.from_dict(straight["model_config"])) for _ in range(2))
    load_checkpoint(CheckpointManager(tmp_path / "a").latest(), ma)
    load_checkpoint(CheckpointManager(tmp_path / "b").latest(), mb)
    for (n, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), n


def test_run_outputs_and_retention(tmp_path, corpus, data_dir):
    out = tmp_path / "run"
    summary = train(make_cfg(tmp_path, corpus, data_dir, residual="standard", out=str(out)))
    recs = MetricsLog.read(out / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tok_s"} <= set(r)
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 6] and all(r["val_bpb"] > 0 for r in vals)
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["final_loss"] == summary["final_loss"]
    assert (out / "tokenizer.json").exists()
    # keep_last = 1 plus the best: at most two checkpoint dirs, the newest is step 6
    mgr = CheckpointManager(out)
    dirs = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert "step_000006" in dirs and len(dirs) <= 2
    best = mgr.best()
    assert best is not None and best["dir"] in dirs
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_disk_guard_skips_without_corrupting(tmp_path, monkeypatch):
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.save(1, model, [opt], {"x": 1}) is not None
    before = (tmp_path / "checkpoints" / "step_000001" / "model.safetensors").read_bytes()
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda p: 1024)  # a nearly full disk
    with pytest.warns(RuntimeWarning, match="checkpoint at step 2 skipped"):
        assert mgr.save(2, model, [opt], {"x": 2}) is None
    assert mgr.latest().name == "step_000001"
    assert (tmp_path / "checkpoints" / "step_000001" / "model.safetensors").read_bytes() == before
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_disk_guard_prunes_to_make_room(tmp_path, monkeypatch):
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for s in range(1, 4):
        mgr.save(s, model, [opt], {})
    # room only once two old checkpoints are gone
    calls = {"n": 0}

    def fake_free(p):
        left = len([d for d in (tmp_path / "checkpoints").iterdir() if d.name.startswith("step_")])
        calls["n"] += 1
        return 10**12 if left <= 1 else 1024

    monkeypatch.setattr(ckpt_mod, "free_bytes", fake_free)
    assert mgr.save(4, model, [opt], {}) is not None
    names = sorted(d.name for d in (tmp_path / "checkpoints").iterdir() if d.is_dir())
    assert names[-1] == "step_000004" and "step_000001" not in names


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(256, 4)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, model, [], {})

    def boom(*a, **k):  # a full disk is skipped with a warning (tests/test_faults.py); other errors raise
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(OSError):
        mgr.save(2, model, [], {})
    assert mgr.latest().name == "step_000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus, data_dir):
    toml = tmp_path / "t.toml"
    toml.write_text(TINY.format(residual="standard"))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "nanochat.train",
        "--config",
        str(toml),
        "--data",
        str(corpus),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--steps",
        "100000",
        "--save-every",
        "0",
        "--eval-every",
        "0",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(MetricsLog.read(out / "metrics.jsonl")) >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output  # stopped, not finished: as a shell reports it
    assert "stopped at step" in output and "of 100000" in output
    assert output.strip().splitlines()[-1].endswith(f"nanochat-train --resume {out}")  # the last line says how
    latest = CheckpointManager(out).latest()
    assert latest is not None
    assert json.loads((latest / "state.json").read_text())["step"] >= 2


def test_cli_dry_run_and_errors(tmp_path):
    r = CliRunner().invoke(app, ["--config", "tiny_cpu", "--dry-run"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["params"]["total"] > 0 and "non_embedding" in report["params"]
    r = CliRunner().invoke(app, ["--config", "no_such_config"])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["--config", "tiny_cpu", "--steps", "0", "--dry-run"])
    assert r.exit_code == 2 and "steps" in r.output
    r = CliRunner().invoke(app, ["--config", "tiny_cpu", "--residual", "bogus", "--dry-run"])
    assert r.exit_code == 2 and "residual" in r.output
    r = CliRunner().invoke(app, ["--resume", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "config.json" in r.output
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0 and "--resume" in r.output and "Optimisation" in r.output


def test_resume_command_verbatim_on_a_non_default_config(tmp_path, corpus, data_dir):
    """The README's resume command, on a run whose config is not d20, continues that run's model and settings."""
    toml = tmp_path / "small.toml"
    toml.write_text(TINY.format(residual="standard"))
    out = tmp_path / "R"
    base = ["--data", str(corpus), "--data-dir", str(data_dir), "--threads", "1"]
    r = CliRunner().invoke(app, ["--config", str(toml), "--steps", "6", "--stop-after", "3", "--out", str(out), *base])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["--resume", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 6 and summary["config"] == str(toml)
    times = [x["time"] for x in MetricsLog.read(out / "metrics.jsonl") if "loss" in x]
    assert times == sorted(times) and summary["elapsed_s"] == times[-1]  # one clock across both segments
    # asking for fewer steps than the checkpoint holds, or another model, is a one-line error
    r = CliRunner().invoke(app, ["--resume", str(out), "--steps", "4"])
    assert r.exit_code == 2 and "nothing to train" in r.output, r.output
    r = CliRunner().invoke(app, ["--resume", str(out), "--config", "d20"])
    assert r.exit_code == 2 and "different model" in r.output, r.output
    r = CliRunner().invoke(app, ["--config", str(toml), "--keep-last", "0", "--dry-run"])
    assert r.exit_code == 2 and "keep_last" in r.output


def test_final_evaluation_lands_in_summary_and_run_dir(tmp_path, corpus, data_dir):
    """A finished run ends with HumanEval bpb and line completion (left to right, and FIM when trained with FIM)."""
    out = tmp_path / "ev"
    s = train(
        make_cfg(tmp_path, corpus, data_dir, out=str(out), final_eval=True, eval_lines_problems=2, final_eval_batches=3)
    )
    assert s["finished"] and s["humaneval_bpb"] > 0
    lines = json.loads((out / "lines.json").read_text())
    assert s["lines_tasks"] == lines["tasks"] > 0 and 0 <= s["lines_pass_rate"] <= 1
    assert s["lines_passed"] == round(s["lines_pass_rate"] * s["lines_tasks"])
    assert s["lines_passed_per_kind"] == {kind: e["passed"] for kind, e in lines["per_kind"].items()}
    assert set(s["lines_passed_per_kind"]) == {t.kind for t in make_tasks(limit=2)}
    assert sum(s["lines_passed_per_kind"].values()) == s["lines_passed"]
    assert (out / "lines_fim.json").exists() and "lines_fim_pass_rate" in s
    assert s["val_tokens"] > 0 and s["final_val_bpb"] > 0
    last_val = [r for r in MetricsLog.read(out / "metrics.jsonl") if "val_loss" in r][-1]
    assert last_val["final_val_tokens"] == s["val_tokens"] == 3 * last_val["val_tokens"]  # bigger set, logged apart
    seen = json.loads((out / "data.json").read_text())  # what the run saw, copied from the data cache
    assert seen and "fingerprint" in json.dumps(seen)


def test_time_budget_fixes_the_step_count_from_the_measured_pace(tmp_path, corpus, data_dir):
    out = tmp_path / "tb"
    s = train(make_cfg(tmp_path, corpus, data_dir, out=str(out), time_budget=4.0, steps=100000, save_every=0))
    saved = json.loads((out / "config.json").read_text())["train"]
    recs = [r for r in MetricsLog.read(out / "metrics.jsonl") if "loss" in r]
    assert s["finished"] and s["planned_steps"] == saved["steps"] == s["steps"] == len(recs)
    assert 6 < s["steps"] < 100000
    # planned at step 6 from the pace of steps 2..6, then again at a quarter of that plan from the pace since;
    # the second plan is the run's length, and the run ends near the budget, not at 100,000 steps
    first, second = s["budget_plans"]
    assert first["at_step"] == 6 and second["at_step"] == max(7, int(0.25 * first["steps"]))
    assert second["steps"] == s["steps"]
    assert recs[-1]["time"] < 4.0 * 3
    # d20 trains on a time budget by default; an explicit --steps replaces it
    d20 = json.loads(CliRunner().invoke(app, ["--config", "d20", "--dry-run"]).output)["train"]
    assert d20["time_budget"] and d20["time_budget"] > 0
    fixed = json.loads(CliRunner().invoke(app, ["--config", "d20", "--steps", "7", "--dry-run"]).output)["train"]
    assert fixed["time_budget"] is None and fixed["steps"] == 7
    from nanochat.train.cli import parse_duration

    assert [parse_duration(x) for x in ("90", "90s", "20m", "1.5h")] == [90, 90, 1200, 5400]
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")


def test_json_outputs_are_strict(tmp_path):
    """No NaN or Infinity in any JSON the trainer writes: non-finite floats become null."""
    ckpt_mod.write_json_atomic(tmp_path / "s.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2.5})
    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": None,
        "b": [1.0, None],
        "c": 2.5,
    }
    assert not list(tmp_path.glob(".s.json.tmp-*"))


def test_distillation_from_teacher(tmp_path, corpus, data_dir):
    teacher = tmp_path / "teacher"
    train(make_cfg(tmp_path, corpus, data_dir, residual="standard", out=str(teacher), steps=2))
    s = train(
        make_cfg(
            tmp_path,
            corpus,
            data_dir,
            residual="standard",
            out=str(tmp_path / "student"),
            steps=2,
            teacher=str(teacher),
            distill_weight=0.5,
        )
    )
    assert s["finished"] and all(torch.isfinite(torch.tensor(losses(tmp_path / "student"))))


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync(tmp_path, corpus, data_dir):
    toml = tmp_path / "t.toml"
    toml.write_text(TINY.format(residual="mhc_lite"))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "nanochat.train",
        "--config",
        str(toml),
        "--data",
        str(corpus),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--steps",
        "3",
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True
    assert summary["tokens"] == 3 * 2 * 32 * 2  # steps × batch × seq × ranks


def test_numa_topology_parsing(tmp_path):
    assert parse_cpulist("0-3,8-11,16") == [0, 1, 2, 3, 8, 9, 10, 11, 16]
    assert parse_cpulist("0-6:2\n") == [0, 2, 4, 6]
    root = tmp_path / "node"
    for i, cl in enumerate(["0-1", "2-3"]):
        (root / f"node{i}").mkdir(parents=True)
        (root / f"node{i}" / "cpulist").write_text(cl + "\n")
    (root / "possible").write_text("0-1\n")
    assert numa_nodes(root) == {0: [0, 1], 1: [2, 3]}
    with pytest.raises(ValueError, match="NUMA node 5 does not exist"):
        pin_to_node(5, root)
    single = tmp_path / "single"
    (single / "node0").mkdir(parents=True)
    (single / "node0" / "cpulist").write_text("0-1\n")
    cpus, msg = pin_to_node(0, single)
    assert "1 NUMA node" in msg and cpus
    cpus, msg = pin_to_node(0, tmp_path / "absent")
    assert "NUMA node" in msg


def test_metrics_log_survives_a_full_disk(tmp_path):
    """A full disk while logging warns once and stops the log; the run itself goes on."""
    import errno

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 1.0})

    class Full:
        def write(self, s: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None: ...

        def close(self) -> None: ...

    log._f = Full()
    with pytest.warns(RuntimeWarning, match="disk is full"):
        log.write({"step": 2, "loss": float("nan")})
    log.write({"step": 3, "loss": 0.5})  # no second warning, no exception
    log.close()
    assert [r["step"] for r in MetricsLog.read(tmp_path / "metrics.jsonl")] == [1]


@pytest.mark.parametrize(
    "flags", [["--residual", "standard"], ["--llama-compatible"]], ids=["residual-standard", "llama-compatible"]
)
def test_a_standard_model_from_the_cli_exports_as_llama_cpps_bitnet(tmp_path, corpus, data_dir, flags):
    """Issue 15 item 6: `--residual standard` (or `--llama-compatible`) on a config with QK-norm on trains a model
    the `bitnet` GGUF export accepts, with no hand-written TOML; `--qk-norm` keeps QK-norm (and `nanochat` arch)."""
    from nanochat.export import load
    from nanochat.export.cli import app as export_app
    from nanochat.export.gguf_io import read_gguf

    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY.format(residual="mhc_lite"))  # qk_norm is not set: GPTConfig's default, true
    out = tmp_path / "run"
    base = ["--config", str(toml), "--data", str(corpus), "--data-dir", str(data_dir), "--threads", "1"]
    r = CliRunner().invoke(app, [*base, "--steps", "2", "--save-every", "0", "--out", str(out), *flags])
    assert r.exit_code == 0, r.output
    m = load(out)
    assert (m.config.residual, m.config.qk_norm, m.config.mlp, m.config.tie_embeddings) == (
        "standard",
        False,
        "swiglu",
        True,
    )
    gguf_path = tmp_path / "model.gguf"
    r = CliRunner().invoke(export_app, [str(out), "--format", "gguf", "--out", str(gguf_path), "--arch", "bitnet"])
    assert r.exit_code == 0, r.output
    g = read_gguf(gguf_path)
    assert g.arch == "bitnet"
    ids = m.tokenizer.encode("def add(a, b):")
    with torch.no_grad():
        want = m.torch_model()(torch.tensor([ids]))[0]
        got = load(gguf_path).torch_model()(torch.tensor([ids]))[0]
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # the flag is what made the difference: --qk-norm keeps QK-norm, which the bitnet export refuses
    r = CliRunner().invoke(app, [*base, "--residual", "standard", "--qk-norm", "--dry-run"])
    assert r.exit_code == 0 and json.loads(r.output)["model"]["qk_norm"] is True


def test_resume_past_a_checkpoint_whose_state_json_is_gone_says_so(tmp_path, corpus, data_dir):
    """Issue 14 item 12: the newest checkpoint lost its state.json; resume falls back to the older one, and says which
    step was skipped and why (never silently), then finishes the run."""
    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY.format(residual="standard"))
    out = tmp_path / "run"
    base = ["--data", str(corpus), "--data-dir", str(data_dir), "--threads", "1"]
    r = CliRunner().invoke(
        app, ["--config", str(toml), "--stop-after", "4", "--keep-last", "3", "--out", str(out), *base]
    )
    assert r.exit_code == 0, r.output
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000002", "step_000004"]
    (ckpts / "step_000004" / "state.json").unlink()
    with pytest.warns(RuntimeWarning, match=r"step_000004.*state\.json.*falling back to the older step_000002"):
        r = CliRunner().invoke(app, ["--resume", str(out), *base])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "step_000002 at step 2" in r.output.replace("\n", "")
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_distillation_loss_matches_a_plain_python_reference():
    """compute_loss with a teacher: (1 - w)·CE + w·τ²·KL(teacher_τ ‖ student_τ), both averaged over tokens, written
    out with math.exp/log per token; and the KL term reaches the gradient."""
    import math
    import types

    from nanochat.train.loop import compute_loss

    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 3, 5
    s_logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    t_logits = torch.randn(B, T, V, generator=g) * 2
    x = torch.zeros(B, T, dtype=torch.long)
    y = torch.randint(0, V, (B, T), generator=g)

    def log_softmax(row: list[float], tau: float) -> list[float]:
        z = [v / tau for v in row]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        return [v - lse for v in z]

    for w, tau in [(0.5, 1.0), (0.3, 2.0), (1.0, 0.5)]:
        cfg = types.SimpleNamespace(distill_weight=w, distill_temp=tau)
        loss, ce = compute_loss(lambda _x: s_logits, x, y, lambda _x: t_logits, cfg)  # type: ignore[arg-type]
        ces, kls = [], []
        for b in range(B):
            for t in range(T):
                srow, trow = s_logits[b, t].tolist(), t_logits[b, t].tolist()
                ces.append(-log_softmax(srow, 1.0)[int(y[b, t])])
                ls, lt = log_softmax(srow, tau), log_softmax(trow, tau)
                kls.append(sum(math.exp(a) * (a - c) for a, c in zip(lt, ls, strict=True)))
        want_ce = sum(ces) / len(ces)
        want = (1 - w) * want_ce + w * tau * tau * sum(kls) / len(kls)
        assert ce.item() == pytest.approx(want_ce, rel=1e-5)
        assert loss.item() == pytest.approx(want, rel=1e-5)
        assert abs(want - want_ce) > 0.05  # the KL term is not negligible here
    # at w = 1 the gradient is the KL's alone: zero when the student equals the teacher, non-zero otherwise
    cfg = types.SimpleNamespace(distill_weight=1.0, distill_temp=1.0)
    same = t_logits.clone().requires_grad_()
    compute_loss(lambda _x: same, x, y, lambda _x: t_logits, cfg)[0].backward()  # type: ignore[arg-type]
    assert same.grad is not None and same.grad.abs().max() < 1e-6
    compute_loss(lambda _x: s_logits, x, y, lambda _x: t_logits, cfg)[0].backward()  # type: ignore[arg-type]
    assert s_logits.grad is not None and s_logits.grad.abs().max() > 1e-3


def test_distillation_kl_term_changes_the_result(tmp_path, corpus, data_dir):
    """Same data, same init, three students: no teacher, a teacher at weight 0, a teacher at weight 1. Weight 0 gives
    the no-teacher weights (the teacher path alone changes nothing); weight 1 gives other weights, and a student
    closer to its teacher (lower KL on held-out text) than the plain one."""
    import torch.nn.functional as F

    from nanochat.export import load

    teacher = tmp_path / "teacher"
    # another init and 8 steps: not the point a plain student passes through on its way
    train(make_cfg(tmp_path, corpus, data_dir, residual="standard", out=str(teacher), steps=8, seed=7))
    runs = {
        "plain": {},
        "w0": {"teacher": str(teacher), "distill_weight": 0.0},
        "kl": {"teacher": str(teacher), "distill_weight": 1.0},
    }
    models = {}
    for name, kw in runs.items():
        out = tmp_path / name
        s = train(make_cfg(tmp_path, corpus, data_dir, residual="standard", out=str(out), steps=6, **kw))
        assert s["finished"]
        models[name] = load(out).torch_model().eval()
    sd = {name: m.state_dict() for name, m in models.items()}
    for k in sd["plain"]:
        torch.testing.assert_close(sd["w0"][k], sd["plain"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(sd["kl"][k], sd["plain"][k], rtol=1e-3, atol=1e-4) for k in sd["plain"])

    t_model = load(teacher).torch_model().eval()
    tok = load(teacher).tokenizer
    ids = torch.tensor([tok.encode((corpus / "shlex.py").read_text()[:2000])[:32]])
    with torch.no_grad():
        t_logp = F.log_softmax(t_model(ids).float(), -1)

        def kl_to_teacher(m: torch.nn.Module) -> float:
            return F.kl_div(F.log_softmax(m(ids).float(), -1), t_logp, log_target=True, reduction="sum").item()

        kl_plain, kl_kl = kl_to_teacher(models["plain"]), kl_to_teacher(models["kl"])
    assert kl_kl < kl_plain, (kl_kl, kl_plain)


REPLICA_SCRIPT = """
import sys, types
import torch, torch.distributed as dist
from nanochat.train.loop import check_replicas_in_sync

rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
rt = types.SimpleNamespace(ddp=True, device=torch.device("cpu"), world_size=2, rank=rank)
for mode in ["same", "swap", "ulp"]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    if rank == 1:
        with torch.no_grad():
            w = model[0].weight.view(-1)
            if mode == "swap":  # same sum and sum of squares, different tensors
                w[0], w[1] = w[1].clone(), w[0].clone()
            elif mode == "ulp":  # one element one float32 step away
                w[5] = torch.nextafter(w[5], torch.tensor(1.0))
    print(mode, check_replicas_in_sync(model, rt))
dist.destroy_process_group()
"""


def test_replica_check_compares_the_tensors(tmp_path):
    """Two gloo ranks: identical replicas are in sync; two swapped elements (which a sum/sum-of-squares checksum
    cannot see) or one element one ulp away are not, and both ranks say so."""
    script = tmp_path / "replica.py"
    script.write_text(REPLICA_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script)]
    procs = [
        subprocess.Popen(
            [*cmd, str(r), str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )  # fmt: skip
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.split() == ["same", "True", "swap", "False", "ulp", "False"], out + err
