"""Start-up cost of the command lines: what each imports, and what ``nanochat-sample --stats`` reports.

Importing torch costs ~1 s of the ~0.1 s llama.cpp needs for a first token, so:
- ``--help`` of every console script imports no torch (each runs in a fresh interpreter, where ``sys.modules`` says
  what was imported);
- ``nanochat-sample`` serving a GGUF with the Rust engine (numpy + ``_core`` + tokenizers) imports no torch;
- the lazy package re-exports (:func:`nanochat.lazy_exports`) give exactly the objects the submodules define, also
  when a submodule shares its name with an export (``nanochat.export.load``) and was imported first.

No timing is asserted: times depend on the machine's load. ``benches/bench_load.py`` measures them.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

# Runs a console script's entry point with the given argv in this fresh interpreter, then reports the heavy modules
# it imported. The entry point is called the way the console-script wrapper calls it: `func()` with sys.argv set.
RUN_ENTRY = r"""
import importlib, json, sys
target, argv = sys.argv[1], sys.argv[2:]
mod_name, func = target.split(":")
sys.argv = [mod_name] + argv
code = 0
try:
    getattr(importlib.import_module(mod_name), func)()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
heavy = sorted(m for m in ("torch", "fastapi", "uvicorn", "nanochat.model.gpt") if m in sys.modules)
print("\n@@" + json.dumps({"code": code, "heavy": heavy}))
"""


def run_entry(script: str, *argv: str, cwd: Path | None = None) -> tuple[dict, str, str]:
    """Run console script ``script`` in a fresh interpreter: ``(report, stdout before the report, stderr)``."""
    r = subprocess.run(
        [sys.executable, "-c", RUN_ENTRY, SCRIPTS[script], *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(cwd or ROOT), "NO_COLOR": "1"},
    )
    out, sep, report = r.stdout.rpartition("\n@@")
    assert sep, f"no report from {script}: stdout={r.stdout!r} stderr={r.stderr[-2000:]!r}"
    return json.loads(report), out, r.stderr


def test_every_console_script_is_covered() -> None:
    assert set(SCRIPTS) == {"nanochat-train", "nanochat-eval", "nanochat-sample", "nanochat-export", "nanochat-serve"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_imports_no_torch_and_shows_examples_and_defaults(script: str) -> None:
    report, out, err = run_entry(script, "--help")
    assert report["code"] == 0, err
    assert report["heavy"] == [], f"{script} --help imported {report['heavy']}"
    assert "Usage:" in out
    assert "Examples" in out, f"{script} --help shows no example"
    assert re.search(r"\b" + re.escape(script) + r" \S", out.split("Usage:", 1)[1]), "the examples name the command"
    if script == "nanochat-train":  # config-driven options: the chosen config's values, which --dry-run prints
        assert "--dry-run prints them" in out
    elif script != "nanochat-eval":  # a command group: its defaults are in each command's --help
        assert "[default:" in out, f"{script} --help shows no default"


def test_eval_subcommand_help_gives_every_option_a_description() -> None:
    for cmd in ("humaneval", "lines"):
        report, out, err = run_entry("nanochat-eval", cmd, "--help")
        assert report["code"] == 0 and report["heavy"] == [], (report, err)
        for opt in ("--temperature", "--max-new-tokens", "--seed"):
            line = next(ln for ln in out.splitlines() if opt + " " in ln)
            # the option's row holds more than its type, range and default
            described = re.sub(r"<[^>]*>|\[[^\]]*\]|--?[\w-]+|[│ ]", "", line)
            assert described, f"nanochat-eval {cmd} {opt} has no help text: {line!r}"


# ----------------------------------------------------------------------------- lazy package re-exports

PACKAGES = ["nanochat.data", "nanochat.engine", "nanochat.export", "nanochat.model", "nanochat.ops", "nanochat.serve"]


@pytest.mark.parametrize("package", PACKAGES)
def test_lazy_exports_are_the_submodules_objects(package: str) -> None:
    pkg = importlib.import_module(package)
    assert pkg.__all__, package
    for name in pkg.__all__:
        sub = importlib.import_module(f"{package}.{pkg._EXPORTS[name]}")
        assert getattr(pkg, name) is getattr(sub, name), f"{package}.{name}"
        assert name in dir(pkg)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        pkg.no_such_name  # noqa: B018


def test_an_export_named_like_its_submodule_survives_the_submodule_import() -> None:
    """``import nanochat.export.load`` binds the submodule to ``nanochat.export.load``; the function must win."""
    code = (
        "import sys, nanochat.export.load, nanochat.export as pkg\n"
        "mod = sys.modules['nanochat.export.load']\n"
        "from nanochat.export import load\n"
        "assert callable(load) and load is mod.load and pkg.load is mod.load, (load, pkg.load)\n"
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ----------------------------------------------------------------------------- nanochat-sample on a GGUF


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> tuple[Path, list[int]]:
    """A small random ternary GGUF (standard residual) and the token ids of the prompt used below."""
    import torch

    from nanochat.data.tokenizer import Tokenizer
    from nanochat.export import export_gguf
    from nanochat.model import GPT, GPTConfig

    tok = Tokenizer.train(["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"] * 20, vocab_size=320)
    cfg = GPTConfig(
        vocab_size=320,
        seq_len=64,
        n_layer=2,
        n_head=4,
        n_kv_head=4,
        n_embd=256,
        mlp_hidden=512,
        residual="standard",
        qk_norm=False,
    )
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    path = export_gguf(model, tok, tmp_path_factory.mktemp("startup") / "m.gguf")
    return path, tok.encode("def fib(n):")


LOAD_AND_PREFILL = r"""
import json, sys
import nanochat
from nanochat.engine.rust_engine import rust_engine_from_weights
m = nanochat.load(sys.argv[1])
ternary, dense = m.packed_weights()
eng = rust_engine_from_weights(m.config, ternary, dense, threads=1)
logits = eng.new_session(0).forward_all(json.loads(sys.argv[2]))
print(json.dumps({"torch": "torch" in sys.modules, "logits": logits.tolist()}))
"""


def test_gguf_load_and_rust_engine_import_no_torch_and_compute_the_models_logits(gguf) -> None:
    """``nanochat.load`` of a GGUF, the Rust engine built from its memory-mapped blocks and a prefill need no torch;
    the logits are those of the torch model materialised from the same file (its full forward, no cache)."""
    import torch

    from nanochat.export import load

    path, ids = gguf
    r = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREFILL, str(path), json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["torch"] is False, "loading a GGUF into the Rust engine imported torch"
    with torch.no_grad():
        want = load(path).torch_model()(torch.tensor([ids]))[0].float()  # (T, V)
    err = (torch.tensor(got["logits"]) - want).abs().max().item()
    assert err <= 1e-3 * want.abs().max().item(), err


RSS_AFTER_ENGINE = r"""
import json, sys
import nanochat
from nanochat.engine import Engine
def rss():  # (anonymous, file-backed) resident bytes
    got = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            got[line.split(":")[0]] = int(line.split()[1]) * 1024
    return got["RssAnon"], got["RssFile"]
Engine(nanochat.load(sys.argv[2]), threads=1)  # a warm-up on another file: the lazy imports and the allocator
anon0, file0 = rss()
m = nanochat.load(sys.argv[1])
eng = Engine(m, threads=1)  # builds the Rust engine, then m.release_pages()
anon1, file1 = rss()
print(json.dumps({"anon": anon1 - anon0, "file": file1 - file0, "weights": eng.rust.weight_bytes}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_loaded_gguf_is_resident_once_after_the_engine_is_built(gguf, tmp_path: Path) -> None:
    """Issue 13: RSS growth over load + engine build ≤ 1.2× the file. The engine holds the one copy of the weights;
    the file's pages, the packed arrays and the heap they were freed to are handed back (old code: ~2.7×)."""
    import torch

    from nanochat.data.tokenizer import Tokenizer
    from nanochat.export import export_gguf
    from nanochat.model import GPT, GPTConfig

    tok = Tokenizer.train(["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"] * 20, vocab_size=320)
    cfg = GPTConfig(vocab_size=8192, seq_len=64, n_layer=4, n_head=8, n_kv_head=8, n_embd=512, mlp_hidden=1536)
    torch.manual_seed(0)
    model = GPT(cfg.replace(residual="standard", qk_norm=False)).eval()
    path = export_gguf(model, tok, tmp_path / "big.gguf")
    size = path.stat().st_size
    r = subprocess.run(
        [sys.executable, "-c", RSS_AFTER_ENGINE, str(path), str(gguf[0])], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["weights"] <= size  # the engine's copy: the embedding in f16 and the ternary blocks without their d
    assert got["file"] <= 0.1 * size, got  # the mapping's pages were dropped
    assert got["anon"] + got["file"] <= 1.2 * size, (got, size)


def test_sample_on_a_gguf_imports_no_torch(gguf) -> None:
    path, _ = gguf
    report, out, err = run_entry(
        "nanochat-sample", "--model", str(path), "--prompt", "def fib(n):", "--max-tokens", "3", "--temperature", "0"
    )
    assert report["code"] == 0, err
    assert out.startswith("def fib(n):")
    assert report["heavy"] == [], f"nanochat-sample on a GGUF imported {report['heavy']}"


def test_sample_stats_reports_load_engine_first_token_and_rss(gguf) -> None:
    path, prompt_ids = gguf
    report, out, err = run_entry(
        "nanochat-sample", "--model", str(path), "--prompt", "def fib(n):", "--max-tokens", "4", "--temperature", "0",
        "--stats",
    )  # fmt: skip
    assert report["code"] == 0, err
    line = err.strip().splitlines()[-1]
    ms = {k: float(v) for k, v in re.findall(r"(start-up|load|engine build|first token)\D*?(\d+) ms", line)}
    assert set(ms) == {"start-up", "load", "engine build", "first token"}, line
    after_start = float(re.search(r"(\d+) ms after the process started", line).group(1))
    # the first token comes after start-up, load and engine build: the parts add up to no more than the whole, up to
    # rounding (1 ms per term) and the 10 ms clock ticks of /proc's process start time and uptime (twice)
    assert after_start + 4 + 20 >= ms["start-up"] + ms["load"] + ms["engine build"] + ms["first token"], line
    assert f"{len(prompt_ids)} prompt + 4 new tokens" in line
    rss, peak = map(float, re.search(r"RSS (\d+) MiB \(peak (\d+)\)", line).groups())
    size = float(re.search(r"file ([\d.]+) MiB", line).group(1))
    assert 0 < rss <= peak
    assert size == pytest.approx(path.stat().st_size / 2**20, abs=0.05)


def test_sample_console_script_output_is_complete_when_piped(gguf) -> None:
    """The console script ends its process without the interpreter's teardown (torch's is slow): everything it
    wrote must still arrive, in order, through pipes."""
    path, _ = gguf
    exe = Path(sys.executable).with_name("nanochat-sample")
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    args = ["--model", str(path), "--prompt", "def fib(n):", "--max-tokens", "4", "--temperature", "0", "--stats"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # pipes block-buffered, as for users
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def fib(n):") and r.stdout.endswith("\n"), repr(r.stdout)
    assert "4 new tokens" in r.stderr.strip().splitlines()[-1]


def test_train_help_shows_the_default_configs_values() -> None:
    """Issue 16 item 7: config-driven options show d20's value, read here from the TOML independently."""
    import tomllib

    doc = tomllib.loads((Path(__file__).parents[1] / "python/nanochat/configs/d20.toml").read_text())
    report, out, err = run_entry("nanochat-train", "--help")
    assert report["code"] == 0, err
    flat = re.sub(r"[│\s]+", " ", out)  # rich wraps help text across table rows
    checked = 0
    for key, flag in [("steps", "--steps"), ("batch_size", "--batch-size"), ("lr_muon", "--lr-muon"),
                      ("seq_len", "--seq-len"), ("quant", "--quant"), ("residual", "--residual")]:  # fmt: skip
        v = doc["train"].get(key, doc["model"].get(key))
        shown = f"{v:g}" if isinstance(v, float) else str(v)
        section = flat.split(flag + " <", 1)[1][:400]  # its row of the options table (not an example)
        assert f"(d20: {shown})" in section, (flag, section[:200])
        checked += 1
    assert checked == 6
    assert "(d20: 900 s)" in flat  # the time budget, with its unit
