"""Sinkhorn-Knopp for mHC: the Rust-backed ``nanochat::sinkhorn`` op vs the plain-torch log-domain reference.

Times the forward and the forward+backward of ``ops.sinkhorn`` (CPU -> Rust) and of ``ops.sinkhorn_reference``
(torch autograd) on batches of ``n × n`` logits, e.g. one ``H_res`` per token (``B*T = 4096``) or one per
sublayer (``24``), and prints a table with the speedup of the op over the reference.

    python benches/bench_sinkhorn.py
    python benches/bench_sinkhorn.py --threads 1 --iters 20 --json runs/bench_sinkhorn.json
    python benches/bench_sinkhorn.py --shapes 4096x4x4,24x4x4,1024x8x8 --dtype float64

``--json PATH`` writes a list of records, one per (shape, dtype, pass), with keys:

    bench        "sinkhorn"
    shape        [batch, n, n]
    dtype        "float32" | "float64"
    iters        Sinkhorn iterations
    pass         "fwd" | "fwd+bwd"
    threads      thread budget (torch intra-op threads and the Rust pool)
    rust_ms      median wall time of ops.sinkhorn (ms)
    torch_ms     median wall time of ops.sinkhorn_reference (ms)
    speedup      torch_ms / rust_ms
    max_abs_err  max |rust - torch| of the output (fwd) or of the logits' gradient (fwd+bwd)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from nanochat import ops

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _time(fn: Callable[[], object], repeat: int, min_time: float) -> float:
    """Median milliseconds per call over ``repeat`` rounds, each long enough to span ``min_time`` seconds."""
    fn()  # warm up (allocations, thread pools)
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / once))
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        rounds.append((time.perf_counter() - t0) / inner)
    return statistics.median(rounds) * 1e3


def bench_one(shape: tuple[int, ...], dtype: torch.dtype, iters: int, repeat: int, min_time: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2
    up = torch.randn(shape, generator=g, dtype=dtype)
    out = []

    # Forward only.
    with torch.no_grad():
        err = (ops.sinkhorn(x, iters) - ops.sinkhorn_reference(x, iters)).abs().max().item()
        rust = _time(lambda: ops.sinkhorn(x, iters), repeat, min_time)
        ref = _time(lambda: ops.sinkhorn_reference(x, iters), repeat, min_time)
    out.append({"pass": "fwd", "rust_ms": rust, "torch_ms": ref, "max_abs_err": err})

    # Forward + backward.
    xr = x.clone().requires_grad_(True)

    def fwd_bwd(f: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        (grad,) = torch.autograd.grad(f(xr, iters), xr, up)
        return grad

    err = (fwd_bwd(ops.sinkhorn) - fwd_bwd(ops.sinkhorn_reference)).abs().max().item()
    rust = _time(lambda: fwd_bwd(ops.sinkhorn), repeat, min_time)
    ref = _time(lambda: fwd_bwd(ops.sinkhorn_reference), repeat, min_time)
    out.append({"pass": "fwd+bwd", "rust_ms": rust, "torch_ms": ref, "max_abs_err": err})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="4096x4x4,24x4x4", help="comma-separated BxNxN batch shapes")
    ap.add_argument("--dtype", default="float32", choices=[*DTYPES, "both"])
    ap.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations")
    ap.add_argument("--threads", type=int, default=0, help="thread budget for torch and Rust (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=7, help="timing rounds (median reported)")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timing round")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the records to PATH")
    args = ap.parse_args()

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    ops.set_num_threads(threads)
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes.split(",")]
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]

    records = []
    for shape in shapes:
        for dt in dtypes:
            for r in bench_one(shape, DTYPES[dt], args.iters, args.repeat, args.min_time):
                records.append(
                    {
                        "bench": "sinkhorn",
                        "shape": list(shape),
                        "dtype": dt,
                        "iters": args.iters,
                        "threads": threads,
                        **r,
                        "speedup": r["torch_ms"] / r["rust_ms"],
                    }
                )

    table = Table(title=f"Sinkhorn-Knopp, {args.iters} iterations, {threads} thread(s): Rust op vs torch reference")
    for col in ("shape", "dtype", "pass", "Rust op (ms)", "torch ref (ms)", "speedup", "max |diff|"):
        table.add_column(col, justify="left" if col in ("shape", "dtype", "pass") else "right")
    for r in records:
        table.add_row(
            "×".join(map(str, r["shape"])),
            r["dtype"],
            r["pass"],
            f"{r['rust_ms']:.3f}",
            f"{r['torch_ms']:.3f}",
            f"{r['speedup']:.1f}×",
            f"{r['max_abs_err']:.1e}",
        )
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
        Console().print(f"wrote {len(records)} records to {args.json}")


if __name__ == "__main__":
    main()
