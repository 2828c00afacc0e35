"""GGUF load: time to first token ready, the memory loading adds, and what a command-line user waits.

    python benches/bench_load.py [--config nano_125m] [--model FILE] [--repeat 3] [--json PATH] [--no-cli]

Writes a random-weight model of the config as a TQ2_0 GGUF (the exporter's normal path; its tokenizer is a small
one trained here), or takes ``--model FILE`` as it is (e.g. an export with a real 16k-token vocabulary), then
measures, each in a fresh Python process (so imports and allocator state do not blur the numbers):

- **in process**, after importing the loader and engine modules (the baseline): ``nanochat.load(path)`` (memory-mapped
  read, checksum, tokenizer, TQ2_0 → kernel layout), building the Rust engine from the loaded blocks (then
  ``release_pages()``, as ``Engine`` does: the engine holds the one copy of the weights), and one prefill of
  ``<|bos|>`` into a 64-position session — the time to the first token ready — and the resident-set growth (RSS after
  minus before) against the file size, at the first token and before the session (KV cache and workspace excluded);
  and whether any of it imported torch (it should not: the Rust engine serves a GGUF with numpy alone);
- **the command line** (unless ``--no-cli``): wall time of ``nanochat-sample --max-tokens 1`` on the file
  (interpreter start-up, imports, load, engine, one token, exit: what issue 13 compares with ``llama-simple -n 1``),
  its RSS after the token (from ``--stats``), and the wall time of ``--help`` of every console script.

Best of ``--repeat`` runs each; the load average is printed before and after, since this is a shared machine.
Aims (DESIGN §6, issues 13 and 16): ≤ 50 ms to first token ready; RSS growth ≤ 1.2× the file (no dequantized
copies); ≤ 0.5 s for ``nanochat-sample --max-tokens 1`` and for each ``--help``.
``--json`` keys: ``config, file_mb, load_ms, engine_ms, first_token_ms, total_ms, rss_delta_mb, rss_ratio,
rss_weights_ratio`` (before the session), ``torch_imported, cli_sample_s, cli_sample_rss_mb, cli_help_s`` (``cli_help_s``: script name → seconds; the
``cli_*`` keys are null with ``--no-cli``), ``loadavg`` (1-minute load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import numpy  # the baseline: the modules the load and the engine use (imports are timed by the CLI run below)
import gguf, nanochat, nanochat.export.load, nanochat.engine.rust_engine, nanochat.ops.native
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
r0 = rss(); t0 = time.perf_counter()
m = nanochat.load(sys.argv[1])
t1 = time.perf_counter()
from nanochat.engine.rust_engine import rust_engine_from_weights
ternary, dense = m.packed_weights()
eng = rust_engine_from_weights(m.config, ternary, dense)
del ternary, dense
m.release_pages()
t2 = time.perf_counter()
r_weights = rss()
s = eng.new_session(64)
s.prefill([m.tokenizer.bos_id])
t3 = time.perf_counter()
print(json.dumps({"load_ms": (t1 - t0) * 1e3, "engine_ms": (t2 - t1) * 1e3, "first_token_ms": (t3 - t2) * 1e3,
                  "total_ms": (t3 - t0) * 1e3, "rss_delta": rss() - r0, "rss_weights": r_weights - r0,
                  "torch_imported": "torch" in sys.modules}))
"""

SCRIPTS = ["nanochat-train", "nanochat-eval", "nanochat-sample", "nanochat-export", "nanochat-serve"]


def loadavg() -> float:
    return os.getloadavg()[0]


def wall(cmd: list[str], repeat: int) -> float:
    """Best wall time of ``cmd`` over ``repeat`` runs (it must succeed)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def cli_rss_mib(cmd: list[str]) -> float:
    """The RSS in MiB that ``cmd`` (``nanochat-sample ... --stats``) reports after its token. Not its peak: the
    kernel's peak survives ``exec``, so a child forked from this process (torch, a 125M model) inherits ours."""
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    m = re.search(r"RSS (\d+) MiB", r.stderr)
    if m is None:
        raise SystemExit(f"error: no RSS in the --stats line: {r.stderr[-500:]!r}")
    return float(m.group(1))


def script(name: str) -> list[str]:
    """The console script beside this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"error: {name} is not installed (pip install -e . puts it beside {sys.executable})")
    return [found]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="nano_125m", help="model config to build (default: nano_125m)")
    ap.add_argument("--model", default=None, help="measure this GGUF file instead of building one")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best is kept (default: 3)")
    ap.add_argument("--json", default=None, help="write the record here")
    ap.add_argument("--no-cli", action="store_true", help="skip the command-line timings")
    args = ap.parse_args()
    import torch

    from nanochat.data.tokenizer import Tokenizer
    from nanochat.export import export_gguf
    from nanochat.model import GPT, load_config

    cfg, _ = load_config(args.config)
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as d:
        if args.model:
            path = Path(args.model)
        else:
            tok = Tokenizer.train(["def f(x):\n    return x\n"] * 50, 300)
            torch.manual_seed(0)
            model = GPT(cfg)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
            path = export_gguf(model, tok, Path(d) / "m.gguf")
            del model
        size = path.stat().st_size
        runs = [
            json.loads(
                subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            for _ in range(args.repeat)
        ]
        cli_sample = cli_help = cli_rss = None
        if not args.no_cli:
            sample = [*script("nanochat-sample"), "--model", str(path), "--prompt", "def f(x):", "--max-tokens", "1"]
            cli_sample = wall([*sample, "--temperature", "0"], args.repeat)
            cli_rss = cli_rss_mib([*sample, "--temperature", "0", "--stats"])
            cli_help = {name: wall([*script(name), "--help"], args.repeat) for name in SCRIPTS}
    best = min(runs, key=lambda r: r["total_ms"])
    rec = {
        "config": args.config,
        "file_mb": size / 2**20,
        "load_ms": best["load_ms"],
        "engine_ms": best["engine_ms"],
        "first_token_ms": best["first_token_ms"],
        "total_ms": best["total_ms"],
        "rss_delta_mb": best["rss_delta"] / 2**20,
        "rss_ratio": best["rss_delta"] / size,
        "rss_weights_ratio": best["rss_weights"] / size,
        "torch_imported": any(r["torch_imported"] for r in runs),
        "cli_sample_s": cli_sample,
        "cli_sample_rss_mb": cli_rss,
        "cli_help_s": cli_help,
        "loadavg": [load_before, loadavg()],
    }
    if args.model:
        rec["config"] = path.name
    print(f"load average {load_before:.2f} before, {rec['loadavg'][1]:.2f} after  [best of {args.repeat}]")
    print(
        f"{args.config}: GGUF {rec['file_mb']:.1f} MiB | load {rec['load_ms']:.1f} ms + engine {rec['engine_ms']:.1f} ms"
        f" + first token {rec['first_token_ms']:.1f} ms = {rec['total_ms']:.1f} ms | RSS +{rec['rss_delta_mb']:.1f} MiB"
        f" ({rec['rss_ratio']:.2f}× the file; {rec['rss_weights_ratio']:.2f}× before the 64-position session)"
        f" | torch imported: {'yes' if rec['torch_imported'] else 'no'}"
    )
    if cli_sample is not None and cli_help is not None:
        print(f"nanochat-sample --max-tokens 1: {cli_sample:.2f} s wall (aim ≤ 0.5 s), RSS {cli_rss:.0f} MiB")
        print("--help: " + ", ".join(f"{name} {t:.2f} s" for name, t in cli_help.items()) + " (aim ≤ 0.5 s each)")
    if args.json:
        Path(args.json).write_text(json.dumps([rec], indent=2))


if __name__ == "__main__":
    main()
