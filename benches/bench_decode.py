"""Decode and prefill: the Rust engine (KV cache, ternary kernels) vs torch fp32 with a KV cache, same shapes.

For each config (``d20``, ``nano_125m``; random weights) and thread count, every engine prefills a 128-token prompt
(``--prompt-len``) and then decodes ``--steps`` tokens greedily (argmax in Python, what a user of the engine pays):

- ``rust``: ``nanochat.engine.RustEngine`` with an f32 LM head (exact to the torch model);
- ``rust-h16`` / ``rust-h8``: the same with an fp16 (the engine's default) / int8 copy of the LM head (the head is
  the largest single read of a decode step), and ``rust-h16-kv16`` with an fp16 head and an fp16 KV cache; their
  logit error vs ``rust`` is measured on the same tokens;
- ``torch-fp32``: ``nanochat.engine.TorchEngine`` (the model's own modules with a KV cache) on the same config with
  ``quant="fp"``: dense ``F.linear`` in fp32, ``torch.set_num_threads`` set to the same count.

A second table profiles one Rust decode step by section for the first Rust engine asked for, with its head and KV
precision (Rust-side timers; ``python+binding`` is the rest of the wall time: the Python loop, argument conversion,
numpy output, argmax).

    python benches/bench_decode.py
    python benches/bench_decode.py --quick
    python benches/bench_decode.py --configs nano_125m --threads 2 --steps 128 --json runs/bench_decode.json

``--kernels amx,avx512_vnni`` runs every Rust engine once per ternary kernel, interleaved in the same process (the
first kernel is the reference of the ``vs kernel`` ratio column: e.g. the AMX prefill against the VNNI one):

    python benches/bench_decode.py --configs nano_125m --threads 1 --steps 8 --engines rust-h16 --kernels amx,avx512_vnni

The machine is shared: times are medians over tokens (decode) and the best of ``--repeat`` runs (prefill, load);
the load average is printed before and after.

``--json PATH`` writes a list of records with keys:

    config          config name ("d20", "nano_125m")
    threads         thread count (Rust engine team size; torch intra-op threads)
    engine          "rust", "rust-h16", "rust-h8", "rust-h16-kv16" or "torch-fp32"
    kernel          the Rust engine's ternary kernel (absent for torch-fp32)
    load_ms         building the engine from weights in memory: Rust from packed (uint8, scale) + float arrays,
                    what a GGUF load hands it; torch from a state dict into a fresh model (best of --repeat)
    prefill_tok_s   prompt tokens per second for a --prompt-len prompt into an empty cache (best of --repeat)
    ms_per_token    median wall milliseconds per decoded token, Python loop included
    ms_per_token_mean  mean of the same
    prompt_len, steps  as run
    head_err        (reduced-precision engines) max |logit - rust logit| / max |rust logit| over the decoded steps
    top1_agree      (reduced-precision engines) fraction of steps whose argmax equals rust's
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nanochat import ops
from nanochat.engine import TorchEngine
from nanochat.engine.rust_engine import engine_weights, rust_engine_from_weights
from nanochat.model import GPT, load_config

ENGINES = ("rust", "rust-h16", "rust-h8", "rust-h16-kv16", "torch-fp32")
PRECISION = {
    "rust": ("f32", "f32"),
    "rust-h16": ("f16", "f32"),
    "rust-h8": ("int8", "f32"),
    "rust-h16-kv16": ("f16", "f16"),
}


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def random_model(name: str, quant: str, seed: int = 0) -> GPT:
    cfg, _ = load_config(name)
    cfg = cfg.replace(quant=quant)
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = GPT(cfg)
    m.to_empty(device="cpu")
    m.init_weights()
    with torch.no_grad():  # give the zero-initialised projections and the mHC maps some values
        for n, p in m.named_parameters():
            if p.dim() == 2 and n != "wte.weight":
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5)
            elif "mhc" in n:
                p.add_(torch.randn_like(p) * 0.01)
    return m.eval()


def prompt_ids(vocab: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def run_rust(
    m: GPT,
    packed: tuple[dict, dict],
    threads: int,
    engine: str,
    prompt: list[int],
    steps: int,
    repeat: int,
    kernel: str | None = None,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    ternary, dense = packed
    head, kv = PRECISION[engine]
    load = []
    for _ in range(repeat):
        t = time.perf_counter()
        eng = rust_engine_from_weights(m.config, ternary, dense, threads=threads, kernel=kernel, head=head, kv=kv)
        load.append(time.perf_counter() - t)
    prefill = []
    for _ in range(repeat):
        s = eng.new_session()
        t = time.perf_counter()
        logits = s.prefill(prompt)
        prefill.append(time.perf_counter() - t)
    rows, times = [], []
    tok = int(np.argmax(logits))
    for _ in range(steps):
        t = time.perf_counter()
        logits = s.decode(tok)
        tok = int(np.argmax(logits))
        times.append(time.perf_counter() - t)
        rows.append(logits)
    return _record(load, prefill, times, len(prompt)), rows


def run_torch(m: GPT, threads: int, prompt: list[int], steps: int, repeat: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    sd = m.state_dict()
    load = []
    for _ in range(repeat):
        t = time.perf_counter()
        with torch.device("meta"):
            fresh = GPT(m.config)
        fresh.load_state_dict(sd, assign=True)
        eng = TorchEngine(fresh.eval())
        load.append(time.perf_counter() - t)
    prefill = []
    for _ in range(repeat):
        s = eng.new_session()
        t = time.perf_counter()
        logits = eng.prefill(s, prompt)
        prefill.append(time.perf_counter() - t)
    times = []
    tok = int(logits.argmax())
    for _ in range(steps):
        t = time.perf_counter()
        tok = int(eng.decode(s, tok).argmax())
        times.append(time.perf_counter() - t)
    return _record(load, prefill, times, len(prompt))


def _record(load: list[float], prefill: list[float], times: list[float], n_prompt: int) -> dict[str, Any]:
    return {
        "load_ms": min(load) * 1e3,
        "prefill_tok_s": n_prompt / min(prefill),
        "ms_per_token": statistics.median(times) * 1e3,
        "ms_per_token_mean": statistics.fmean(times) * 1e3,
    }


def profile_rust(
    m: GPT, packed: tuple[dict, dict], threads: int, prompt: list[int], steps: int, engine: str = "rust"
) -> dict[str, float]:
    """Per-token milliseconds by section for decode (Rust timers) plus the Python + binding remainder."""
    head, kv = PRECISION[engine]
    eng = rust_engine_from_weights(m.config, *packed, threads=threads, head=head, kv=kv, profile=True)
    s = eng.new_session()
    tok = int(np.argmax(s.prefill(prompt)))
    eng.profile(reset=True)
    t = time.perf_counter()
    for _ in range(steps):
        tok = int(np.argmax(s.decode(tok)))
    wall = time.perf_counter() - t
    p = eng.profile()
    out = {k: v * 1e3 / steps for k, v in p.items() if isinstance(v, float) and k != "total"}
    out["python+binding"] = (wall - p["total"]) * 1e3 / steps
    out["total"] = wall * 1e3 / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="d20,nano_125m", help="comma-separated config names")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64, help="decode steps (64+)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of load and prefill (best is kept)")
    ap.add_argument(
        "--kernels", default="", help="comma-separated ternary kernels to compare (default: the process default)"
    )
    ap.add_argument("--quick", action="store_true", help="nano_125m, 2 threads, rust + torch-fp32, 32 steps")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-section profile table")
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    args = ap.parse_args()
    if args.quick:
        args.configs, args.threads, args.engines, args.steps = "nano_125m", "2", "rust,rust-h16-kv16,torch-fp32", 32
    configs = [c for c in args.configs.split(",") if c]
    threads = [int(t) for t in args.threads.split(",") if t]
    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}; choose from {ENGINES}")

    console = Console(width=160)
    kernels = [k for k in args.kernels.split(",") if k] or [ops.default_kernel()[0]]
    for k in kernels:
        if k not in ops.available_kernels():
            raise SystemExit(f"kernel {k!r} is not available here; choose from {ops.available_kernels()}")
    console.print(f"load average before: {loadavg()}; kernels: {', '.join(kernels)}")
    # The profile runs the first Rust engine asked for (its head and KV precision).
    prof_engine = next((e for e in engines if e in PRECISION), None)
    records: list[dict[str, Any]] = []
    profiles: dict[tuple[str, int], dict[str, float]] = {}
    for name in configs:
        tern = random_model(name, "ternary")
        packed = engine_weights(tern)
        prompt = prompt_ids(tern.config.vocab_size, args.prompt_len)
        fp = random_model(name, "fp") if "torch-fp32" in engines else None
        for t in threads:
            f32_rows: list[np.ndarray] | None = None
            runs = [(e, k) for e in engines for k in (kernels if e != "torch-fp32" else [None])]
            for e, k in runs:
                base = {"config": name, "threads": t, "engine": e, "prompt_len": args.prompt_len, "steps": args.steps}
                if k is not None:
                    base["kernel"] = k
                if e == "torch-fp32":
                    assert fp is not None
                    rec = run_torch(fp, t, prompt, args.steps, args.repeat)
                else:
                    rec, rows = run_rust(tern, packed, t, e, prompt, args.steps, args.repeat, k)
                    if e == "rust" and k == kernels[0]:
                        f32_rows = rows
                    elif f32_rows is not None:
                        # compare step by step while both decoded the same tokens
                        errs, agree = [], []
                        for a, b in zip(rows, f32_rows, strict=True):
                            errs.append(float(np.abs(a - b).max() / np.abs(b).max()))
                            agree.append(int(np.argmax(a) == np.argmax(b)))
                            if not agree[-1]:
                                break
                        rec["head_err"] = max(errs)
                        rec["top1_agree"] = sum(agree) / len(agree)
                records.append({**base, **rec})
                console.print(
                    f"  {name} threads={t} {e}{f' ({k})' if k else ''}: {rec['ms_per_token']:.2f} ms/token, "
                    f"prefill {rec['prefill_tok_s']:.0f} tok/s, load {rec['load_ms']:.0f} ms"
                )
            if not args.no_profile and prof_engine is not None:
                profiles[(name, t)] = profile_rust(tern, packed, t, prompt, args.steps, prof_engine)
    console.print(f"load average after: {loadavg()}")

    table = Table(title=f"decode and prefill (median ms/token; prefill of a {args.prompt_len}-token prompt)")
    cols = ["config", "threads", "engine", "kernel", "load ms", "prefill tok/s", "ms/token", "tok/s", "vs torch-fp32"]
    if len(kernels) > 1:
        cols.append(f"prefill, decode vs {kernels[0]}")
    for col in cols:
        table.add_column(col, justify="right" if col not in ("config", "engine", "kernel") else "left")
    for r in records:
        ref = next(
            (
                x
                for x in records
                if x["config"] == r["config"] and x["threads"] == r["threads"] and x["engine"] == "torch-fp32"
            ),
            None,
        )
        ratio = "" if ref is None or r is ref else f"{ref['ms_per_token'] / r['ms_per_token']:.1f}x faster"
        extra = f" (err {r['head_err']:.1e}, top1 {r['top1_agree']:.0%})" if "head_err" in r else ""
        row = [
            r["config"],
            str(r["threads"]),
            r["engine"] + extra,
            r.get("kernel", ""),
            f"{r['load_ms']:.0f}",
            f"{r['prefill_tok_s']:.0f}",
            f"{r['ms_per_token']:.2f}",
            f"{1e3 / r['ms_per_token']:.0f}",
            ratio,
        ]
        if len(kernels) > 1:
            first = next(
                (
                    x
                    for x in records
                    if (x["config"], x["threads"], x["engine"]) == (r["config"], r["threads"], r["engine"])
                    and x.get("kernel") == kernels[0]
                ),
                None,
            )
            row.append(
                ""
                if first is None or "kernel" not in r
                else f"{r['prefill_tok_s'] / first['prefill_tok_s']:.2f}x, {first['ms_per_token'] / r['ms_per_token']:.2f}x"
            )
        table.add_row(*row)
    console.print(table)

    if profiles:
        keys = list(next(iter(profiles.values())).keys())
        head, kv = PRECISION[prof_engine or "rust"]
        pt = Table(title=f"Rust decode step by section (ms/token, engine `{prof_engine}`: {head} head, {kv} KV)")
        pt.add_column("section")
        for name, t in profiles:
            pt.add_column(f"{name} t={t}", justify="right")
        for k in keys:
            pt.add_row(k, *[f"{profiles[c][k]:.3f}" for c in profiles])
        console.print(pt)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
        console.print(f"wrote {len(records)} records to {args.json}")


if __name__ == "__main__":
    main()
