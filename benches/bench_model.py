"""Model forward+backward cost of the residual variants, as ratios to the full-precision baseline of the same shape.

For each config (``tiny_cpu``, ``d20``) builds the model four ways: ``fp`` (``quant="fp"``, ``residual="standard"``:
the plain-torch baseline), ``standard``, ``mhc_lite`` and ``mhc`` (all ternary QAT), then times one training
forward+backward (loss, ``backward()``, gradients cleared) on a small random batch. Variants are interleaved
round by round so machine load affects them alike; the table reports the median and the ratio to ``fp``.
On a machine shared with other jobs wall time mostly measures the neighbours: ``--clock cpu`` times this process's
CPU seconds instead (``time.process_time``; with ``--threads 1`` that is the single worker's compute time).

    python benches/bench_model.py
    python benches/bench_model.py --configs tiny_cpu --batch 8 --seq 256 --repeat 7 --json runs/bench_model.json
    python benches/bench_model.py --threads 1 --clock cpu    # on a busy shared machine: CPU time, not wall time

``--json PATH`` writes a list of records, one per (config, variant), with keys:

    bench        "model_fwd_bwd"
    config       config name ("tiny_cpu", "d20")
    variant      "fp" | "standard" | "mhc_lite" | "mhc"
    batch, seq   batch shape (sequences, tokens per sequence)
    threads      torch intra-op threads
    clock        "wall" (time.perf_counter) | "cpu" (time.process_time: this process's CPU time, all threads)
    params       total parameters of the variant
    fwd_bwd_ms   median time of one forward+backward (ms) on that clock
    min_ms       the fastest round
    tokens_per_s batch·seq / (fwd_bwd_ms / 1000)
    ratio        fwd_bwd_ms / the fp variant's fwd_bwd_ms (same config, same run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from nanochat.model import GPT, load_config

VARIANTS: dict[str, dict[str, str]] = {
    "fp": {"quant": "fp", "residual": "standard"},
    "standard": {"quant": "ternary", "residual": "standard"},
    "mhc_lite": {"quant": "ternary", "residual": "mhc_lite"},
    "mhc": {"quant": "ternary", "residual": "mhc"},
}
DEFAULT_SHAPES = {"tiny_cpu": (4, 256), "d20": (2, 512)}


def fwd_bwd(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> None:
    model(idx, targets).backward()
    model.zero_grad(set_to_none=True)


def bench_config(
    name: str, batch: int | None, seq: int | None, repeat: int, threads: int, clock: str = "wall"
) -> list[dict]:
    now = time.perf_counter if clock == "wall" else time.process_time
    cfg, _ = load_config(name)
    B, T = DEFAULT_SHAPES.get(name, (2, cfg.seq_len))
    B, T = batch or B, seq or min(T, cfg.seq_len)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    torch.manual_seed(0)
    models = {v: GPT(cfg.replace(**kw)).train() for v, kw in VARIANTS.items()}
    for m in models.values():
        fwd_bwd(m, idx, targets)  # warm up: allocator, thread pool, first-call dispatch
    times: dict[str, list[float]] = {v: [] for v in models}
    for _ in range(repeat):
        for v, m in models.items():
            t0 = now()
            fwd_bwd(m, idx, targets)
            times[v].append((now() - t0) * 1e3)
    base = statistics.median(times["fp"])
    records = []
    for v, m in models.items():
        ms = statistics.median(times[v])
        records.append(
            {
                "bench": "model_fwd_bwd",
                "config": name,
                "variant": v,
                "batch": B,
                "seq": T,
                "threads": threads,
                "clock": clock,
                "params": m.param_counts()["total"],
                "fwd_bwd_ms": round(ms, 3),
                "min_ms": round(min(times[v]), 3),
                "tokens_per_s": round(B * T / (ms / 1e3), 1),
                "ratio": round(ms / base, 3),
            }
        )
    return records


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", default="tiny_cpu,d20", help="comma-separated config names")
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default: per config)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: per config)")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds per variant (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or this process's CPU time")
    ap.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    records: list[dict] = []
    for name in args.configs.split(","):
        records += bench_config(name.strip(), args.batch, args.seq, args.repeat, threads, args.clock)

    table = Table(
        title=f"model forward+backward (training path), {threads} thread(s), {args.clock} clock; ratio = time / fp"
    )
    for col in ("config", "variant", "batch×seq", "params", "fwd+bwd ms", "min ms", "tokens/s", "ratio"):
        table.add_column(col, justify="left" if col in ("config", "variant") else "right")
    for r in records:
        table.add_row(
            r["config"],
            r["variant"],
            f"{r['batch']}×{r['seq']}",
            f"{r['params'] / 1e6:.2f}M",
            f"{r['fwd_bwd_ms']:.1f}",
            f"{r['min_ms']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['ratio']:.2f}×",
        )
    Console().print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
