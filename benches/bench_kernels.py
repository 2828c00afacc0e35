"""Ternary GEMV/GEMM kernels (``nanochat._core.ternary_gemm_i32``) vs torch fp32 ``F.linear`` and the scalar oracle.

For each shape (rows × cols of the weight) and thread count, times one GEMV (one activation row) with every kernel
this CPU runs, plus the baselines ``torch_fp32`` (``F.linear`` on an fp32 weight of the same shape, with
``torch.set_num_threads`` set to the same count) and ``scalar`` (the oracle kernel). On shapes above 4M weights
the scalar kernel is timed on a slice of the rows and scaled up (marked ``~`` in the table, ``"scaled": true`` in
the JSON). A second table compares a batched call (n activation rows at once) with n separate GEMV calls. A third
(``--stream-shape``, default 65536×65536: 1 GiB of packed weights, twice this machine's 480 MiB L3) streams the
weights from RAM, not from cache, and compares the GEMV's GB/s with a plain read of the same bytes (numpy summing
them as uint64, the rows split over the same number of threads) measured in the same run.

    python benches/bench_kernels.py
    python benches/bench_kernels.py --quick
    python benches/bench_kernels.py --threads 1,2 --shapes 2048x2048,16384x14336 --json runs/bench_kernels.json

Times are per call, medians over ``--repeat`` short rounds (each repeats the call for at least ``--min-time``
seconds), and include the binding's Python call overhead (about a microsecond). The best round is reported too: on
a machine shared with other work the median moves with the neighbours' load, the best round much less, so it is the
better estimate of what the kernel does on an idle machine (the load average is printed before and after).

``--json PATH`` writes a list of records with keys:

    section   "gemv", "batched" or "stream" (kernel "read": the plain read of the same bytes)
    rows      weight rows (output features)
    cols      weight columns (input features)
    threads   thread count (kernel threads; torch intra-op threads for torch_fp32)
    kernel    kernel name ("avx512_vnni", "avx2", "avx2_lut", "scalar") or "torch_fp32"
    n         activation rows per call (1 in the gemv section)
    mode      "batched" (one call with n rows) or "looped" (n calls with one row); "batched" in the gemv section
    us        median microseconds per call (for "looped": per n calls)
    best_us   best round's microseconds per call
    gmacs     rows * cols * n / us / 1e3: billions of multiply-adds per second
    gbps      rows * cols / 4 / us / 1e3: GB/s of packed ternary weights (2 bits each) streamed per call
    scaled    true when timed on a slice of the rows and scaled to the full shape
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from nanochat import _core

DEFAULT_SHAPES = "768x768,3072x768,2048x2048,2560x6912,8192x8192,16384x14336"
QUICK_SHAPES = "768x768,2048x2048,2560x6912"
SCALAR_FULL_MAX = 4 * 1024 * 1024  # weights above this: time the scalar kernel on a slice of the rows
BATCH_NS = (1, 4, 8, 16)


def _time(fn: Callable[[], object], repeat: int, min_time: float) -> tuple[float, float]:
    """(median, best) microseconds per call over ``repeat`` rounds, each spanning at least ``min_time`` seconds."""
    fn()  # warm up: thread pools, allocations, caches
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
    return statistics.median(rounds) * 1e6, min(rounds) * 1e6


def packed_weights(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random trits in the kernel layout (``rows × cols/4`` uint8, four 2-bit codes in {0,1,2} per byte)."""
    # Every byte of four base-3 digits, indexed by its value 0..80.
    digits = np.arange(81)
    table = sum(((digits // 3**j) % 3) << (2 * j) for j in range(4)).astype(np.uint8)
    return table[rng.integers(0, 81, size=(rows, cols // 4), dtype=np.uint8)]


def record(
    section: str,
    rows: int,
    cols: int,
    threads: int,
    kernel: str,
    n: int,
    mode: str,
    us: float,
    best: float,
    scaled: bool = False,
) -> dict:
    return {
        "section": section,
        "rows": rows,
        "cols": cols,
        "threads": threads,
        "kernel": kernel,
        "n": n,
        "mode": mode,
        "us": us,
        "best_us": best,
        "gmacs": rows * cols * n / us / 1e3,
        "gbps": rows * cols / 4 / us / 1e3,
        "scaled": scaled,
    }


def bench_gemv(
    rows: int, cols: int, threads: list[int], kernels: list[str], args: argparse.Namespace, rng: np.random.Generator
) -> list[dict]:
    packed = packed_weights(rows, cols, rng)
    x = rng.integers(-127, 128, size=(1, cols), dtype=np.int8)
    wf = torch.randn(rows, cols) if not args.no_torch else None  # fp32, same shape
    xf = torch.randn(1, cols)
    out = []
    for t in threads:
        for k in kernels:
            if k == "scalar" and rows * cols > SCALAR_FULL_MAX:
                sub = max(32, SCALAR_FULL_MAX // cols // 32 * 32)
                fn = functools.partial(_core.ternary_gemm_i32, packed[:sub], x, kernel="scalar", threads=t)
                us, best = _time(fn, max(3, args.repeat // 3), args.min_time)
                out.append(record("gemv", rows, cols, t, k, 1, "batched", us * rows / sub, best * rows / sub, True))
                continue
            fn = functools.partial(_core.ternary_gemm_i32, packed, x, kernel=k, threads=t)
            us, best = _time(fn, args.repeat, args.min_time)
            out.append(record("gemv", rows, cols, t, k, 1, "batched", us, best))
        if wf is not None:
            torch.set_num_threads(t)
            with torch.inference_mode():
                us, best = _time(lambda: F.linear(xf, wf), args.repeat, args.min_time)
            out.append(record("gemv", rows, cols, t, "torch_fp32", 1, "batched", us, best))
    return out


def _looped(packed: np.ndarray, x: np.ndarray, kernel: str, threads: int) -> Callable[[], None]:
    """n GEMV calls, one per activation row: what the batched call replaces."""
    rows = [np.ascontiguousarray(x[i : i + 1]) for i in range(x.shape[0])]

    def run() -> None:
        for xi in rows:
            _core.ternary_gemm_i32(packed, xi, kernel=kernel, threads=threads)

    return run


def bench_batched(
    rows: int, cols: int, threads: list[int], kernels: list[str], args: argparse.Namespace, rng: np.random.Generator
) -> list[dict]:
    packed = packed_weights(rows, cols, rng)
    out = []
    for t in threads:
        for k in kernels:
            for n in BATCH_NS:
                x = rng.integers(-127, 128, size=(n, cols), dtype=np.int8)
                fn = functools.partial(_core.ternary_gemm_i32, packed, x, kernel=k, threads=t)
                us, best = _time(fn, args.repeat, args.min_time)
                out.append(record("batched", rows, cols, t, k, n, "batched", us, best))
                us, best = _time(_looped(packed, x, k, t), args.repeat, args.min_time)
                out.append(record("batched", rows, cols, t, k, n, "looped", us, best))
    return out


def _plain_read(packed: np.ndarray, threads: int) -> Callable[[], None]:
    """Read every byte of ``packed`` once (summed as uint64), its rows split over ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    parts = [p.reshape(-1).view(np.uint64) for p in np.array_split(packed, threads)]
    pool = ThreadPoolExecutor(threads)

    def run() -> None:
        list(pool.map(np.sum, parts))  # numpy releases the GIL inside the reduction

    return run


def bench_stream(
    rows: int, cols: int, threads: list[int], kernels: list[str], args: argparse.Namespace, rng: np.random.Generator
) -> list[dict]:
    """GEMV on a matrix larger than the last-level cache vs a plain read of the same bytes, same thread counts."""
    packed = packed_weights(rows, cols, rng)
    x = rng.integers(-127, 128, size=(1, cols), dtype=np.int8)
    out = []
    repeat = max(3, args.repeat // 5)
    for t in threads:
        us, best = _time(_plain_read(packed, t), repeat, 0.0)
        out.append(record("stream", rows, cols, t, "read", 1, "batched", us, best))
        for k in kernels:
            fn = functools.partial(_core.ternary_gemm_i32, packed, x, kernel=k, threads=t)
            us, best = _time(fn, repeat, 0.0)
            out.append(record("stream", rows, cols, t, k, 1, "batched", us, best))
    return out


def stream_table(recs: list[dict]) -> Table:
    tab = Table(title="Streaming from RAM: GEMV on a matrix larger than the L3 vs a plain read of the same bytes")
    for col in ("shape", "MiB packed", "threads", "kernel", "median ms", "best ms", "GB/s (best)", "vs plain read"):
        tab.add_column(col, justify="left" if col in ("shape", "kernel") else "right")
    for r in recs:
        read = next(x for x in recs if x["threads"] == r["threads"] and x["kernel"] == "read")
        tab.add_row(
            f"{r['rows']}×{r['cols']}",
            f"{r['rows'] * r['cols'] / 4 / 2**20:.0f}",
            str(r["threads"]),
            r["kernel"],
            f"{r['us'] / 1e3:.1f}",
            f"{r['best_us'] / 1e3:.1f}",
            f"{r['rows'] * r['cols'] / 4 / r['best_us'] / 1e3:.1f}",
            f"{read['best_us'] / r['best_us']:.2f}",
        )
    return tab


def gemv_table(recs: list[dict]) -> Table:
    tab = Table(title="Ternary GEMV (1 activation row): time, throughput, ratios (same shape, same thread count)")
    for col in (
        "shape",
        "thr",
        "kernel",
        "µs med",
        "µs best",
        "G MAC/s med / best",
        "GB/s packed med / best",
        "× torch fp32",
        "× scalar",
    ):
        tab.add_column(col, justify="left" if col in ("shape", "kernel") else "right")
    groups: dict[tuple[int, int, int], list[dict]] = {}
    for r in recs:
        groups.setdefault((r["rows"], r["cols"], r["threads"]), []).append(r)
    for (rows, cols, t), rs in groups.items():
        base = {r["kernel"]: r["us"] for r in rs}
        for r in sorted(rs, key=lambda r: r["us"]):
            mark = "~" if r["scaled"] else ""
            vs_torch = f"{base['torch_fp32'] / r['us']:.1f}×" if "torch_fp32" in base else "-"
            vs_scalar = f"{base['scalar'] / r['us']:.1f}×" if "scalar" in base else "-"
            best_gmacs = r["gmacs"] * r["us"] / r["best_us"]
            best_gbps = r["gbps"] * r["us"] / r["best_us"]
            tab.add_row(
                f"{rows}×{cols}",
                str(t),
                r["kernel"],
                f"{mark}{r['us']:.1f}",
                f"{mark}{r['best_us']:.1f}",
                f"{r['gmacs']:.1f} / {best_gmacs:.1f}",
                f"{r['gbps']:.1f} / {best_gbps:.1f}",
                vs_torch,
                vs_scalar,
            )
        tab.add_section()
    return tab


def batched_table(recs: list[dict]) -> Table:
    tab = Table(title="Batched GEMM (n activation rows in one call) vs n GEMV calls")
    cols = (
        "shape",
        "thr",
        "kernel",
        "n",
        "batched µs med / best",
        "looped µs med / best",
        "batched G MAC/s med",
        "speedup med",
        "speedup best",
    )
    for col in cols:
        tab.add_column(col, justify="left" if col in ("shape", "kernel") else "right")
    by_key = {(r["rows"], r["cols"], r["threads"], r["kernel"], r["n"], r["mode"]): r for r in recs}
    for (rows, cols, t, k, n, mode), r in by_key.items():
        if mode != "batched":
            continue
        loop = by_key[(rows, cols, t, k, n, "looped")]
        tab.add_row(
            f"{rows}×{cols}",
            str(t),
            k,
            str(n),
            f"{r['us']:.1f} / {r['best_us']:.1f}",
            f"{loop['us']:.1f} / {loop['best_us']:.1f}",
            f"{r['gmacs']:.1f}",
            f"{loop['us'] / r['us']:.2f}×",
            f"{loop['best_us'] / r['best_us']:.2f}×",
        )
    return tab


def parse_shapes(s: str) -> list[tuple[int, int]]:
    shapes = []
    for item in s.split(","):
        rows, cols = (int(v) for v in item.lower().split("x"))
        if cols % 256:
            raise SystemExit(f"--shapes: cols of {item} must be a multiple of 256")
        shapes.append((rows, cols))
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", default=None, help=f"comma-separated ROWSxCOLS (default {DEFAULT_SHAPES})")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--kernels", default=None, help="comma-separated kernels (default: all available)")
    ap.add_argument("--batch-shapes", default="2048x2048,3072x768", help="shapes of the batched section ('' = skip)")
    ap.add_argument(
        "--stream-shape", default="65536x65536", help="the larger-than-L3 shape of the streaming section ('' = skip)"
    )
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, fewer rounds, no streaming")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds per measurement (default 30, quick 10)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per round (default 0.01, quick 0.005)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch fp32 baseline")
    ap.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    args = ap.parse_args()
    args.repeat = args.repeat or (10 if args.quick else 30)
    args.min_time = args.min_time or (0.005 if args.quick else 0.01)
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))
    batch_shapes = parse_shapes(args.batch_shapes) if args.batch_shapes else []
    if args.quick:
        batch_shapes = batch_shapes[:1]
    threads = [int(t) for t in args.threads.split(",")]
    avail = _core.available_kernels()
    kernels = args.kernels.split(",") if args.kernels else list(avail)
    for k in kernels:
        if k not in avail:
            raise SystemExit(f"--kernels: '{k}' is not available here (available: {', '.join(avail)})")

    con = Console(width=max(Console().width, 130))
    con.print(f"kernels available: {', '.join(avail)}; default {_core.default_kernel()}")
    con.print(f"cpu count {os.cpu_count()}, load average before: {os.getloadavg()}")
    rng = np.random.default_rng(0)
    recs: list[dict] = []
    for rows, cols in shapes:
        con.print(f"[dim]gemv {rows}×{cols} ...[/dim]")
        recs += bench_gemv(rows, cols, threads, kernels, args, rng)
    con.print(gemv_table(recs))
    simd = [k for k in kernels if k != "scalar"]
    brecs: list[dict] = []
    for rows, cols in batch_shapes:
        con.print(f"[dim]batched {rows}×{cols} ...[/dim]")
        brecs += bench_batched(rows, cols, threads, simd, args, rng)
    if brecs:
        con.print(batched_table(brecs))
    srecs: list[dict] = []
    if args.stream_shape and not args.quick:
        (rows, cols), *_ = parse_shapes(args.stream_shape)
        con.print(f"[dim]stream {rows}×{cols} ({rows * cols / 4 / 2**30:.2f} GiB packed) ...[/dim]")
        srecs = bench_stream(rows, cols, threads, simd, args, rng)
        con.print(stream_table(srecs))
    brecs += srecs
    con.print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(recs + brecs, indent=1))
        con.print(f"wrote {len(recs) + len(brecs)} records to {args.json}")


if __name__ == "__main__":
    main()
