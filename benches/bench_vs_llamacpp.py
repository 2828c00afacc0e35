"""Side by side with llama.cpp on the same GGUF file: prefill, decode and start-up, interleaved A B A B.

    python benches/bench_vs_llamacpp.py --llama-bin ~/llama.cpp/build/bin --model model.gguf
    python benches/bench_vs_llamacpp.py --llama-bin DIR --model F --threads 1,2 --pp 128 --tg 64 --rounds 3 \\
        --json runs/bench_vs_llamacpp.json

Needs a llama.cpp build (CI does not build one: without ``--llama-bin`` or ``$LLAMA_BIN`` it says so and exits 0).
Build it outside this repository, CPU only::

    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j --target llama-bench llama-simple llama-tokenize

What runs, for each thread count and round (llama.cpp first, then ours, so a burst of load hits both):

- ``pp``: prompt processing of ``--pp`` tokens into an empty cache. llama.cpp: ``llama-bench -p N -n 0``; ours: a
  fresh engine session's ``prefill`` of N random ids (the best of ``--reps``).
- ``tg``: generating ``--tg`` tokens one at a time. llama.cpp: ``llama-bench -p 0 -n N``; ours: ``decode`` N times
  after a one-token prefill, greedy argmax in Python (what a user of the engine pays).
- ``tg (no spin)``, 2+ threads: llama.cpp with ``--poll 0`` (its threads sleep instead of spinning between ops, as
  ours do), the fair comparison for a shared machine; its default spins.
- ``start``: wall time of a fresh process that loads the file and writes one token: ``llama-simple -n 1`` vs
  ``nanochat-sample --max-tokens 1`` (imports included; the median of ``--reps``). Once, at the default threads.

A second table sets our decode against the read limit: the bytes one token must read (every weight once, the tied
head included, plus the KV cache at the run's mean position) times tokens/s, against a plain read (numpy summing
uint64) of a buffer of as many bytes, measured in the same run at the same thread count.

Ratios are ours/llama.cpp in tokens per second (above 1: we are faster), and llama.cpp/ours for the start-up
wall time. The load average is printed before and after; the machine is shared, so only ratios within one run mean
anything. ``--json`` writes the records (keys: ``what, threads, round, llama, ours, unit, ratio``) and a summary
with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def find_llama(arg: str | None) -> Path | None:
    """The directory holding ``llama-bench`` (given, ``$LLAMA_BIN``, or on ``PATH``), or None."""
    for cand in (arg, os.environ.get("LLAMA_BIN")):
        if cand:
            p = Path(cand).expanduser()
            p = p.parent if p.is_file() else p
            if (p / "llama-bench").exists():
                return p
            raise SystemExit(f"error: no llama-bench in {p}")
    found = shutil.which("llama-bench")
    return Path(found).parent if found else None


def llama_bench(bin_dir: Path, model: Path, threads: int, pp: int, tg: int, reps: int, poll: int | None) -> float:
    """Tokens per second that ``llama-bench`` reports for one test (``pp`` or ``tg``, the other 0)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(pp), "-n", str(tg)]
    cmd += ["-r", str(reps), "-o", "json"]
    if poll is not None:
        cmd += ["--poll", str(poll)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    records = json.loads(out.stdout)
    return float(records[0]["avg_ts"])


class Ours:
    """Our engine on the file, built once per thread count (the load is timed separately, in ``start``)."""

    def __init__(self, model: Path, threads: int, head: str | None) -> None:
        from nanochat.engine import Engine
        from nanochat.export.load import load

        loaded = load(model)
        kw: dict[str, Any] = {} if head is None else {"head": head}
        self.engine = Engine(loaded, backend="rust", threads=threads, **kw)
        self.vocab = int(loaded.config.vocab_size)
        self.rng = np.random.default_rng(0)
        cfg = loaded.config
        kv_elem = 2 if self.engine.rust.kv == "f16" else 4
        self.weight_bytes = int(self.engine.rust.weight_bytes)  # packed trits + the (tied) head + norms
        self.kv_bytes_per_pos = cfg.n_layer * 2 * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * kv_elem

    def bytes_per_token(self, tg: int) -> float:
        """Bytes one decode step must read: every weight once, plus the KV cache at the mean position of a run."""
        return self.weight_bytes + self.kv_bytes_per_pos * (1 + tg / 2)

    def pp(self, n: int, reps: int) -> float:
        best = float("inf")
        for _ in range(reps):
            ids = [int(i) for i in self.rng.integers(0, self.vocab, n)]
            s = self.engine.rust.new_session()
            t = time.perf_counter()
            s.prefill(ids)
            best = min(best, time.perf_counter() - t)
        return n / best

    def tg(self, n: int, reps: int) -> float:
        rates = []
        for _ in range(reps):
            s = self.engine.rust.new_session()
            tok = int(np.argmax(s.prefill([int(self.rng.integers(0, self.vocab))])))
            t = time.perf_counter()
            for _ in range(n):
                tok = int(np.argmax(s.decode(tok)))
            rates.append(n / (time.perf_counter() - t))
        return statistics.median(rates)


def plain_read_gbps(nbytes: int, threads: int, reps: int = 20) -> float:
    """GB/s of a plain read (numpy summing uint64, split over ``threads``) of a buffer of ``nbytes``: the read
    limit a decode step of that many bytes is held to (the same cache level: the buffer is as big as the model)."""
    from concurrent.futures import ThreadPoolExecutor

    buf = np.random.default_rng(0).integers(0, 2**63, size=max(1, nbytes // 8), dtype=np.uint64)
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))  # numpy releases the GIL inside the reduction
            best = min(best, time.perf_counter() - t)
    return buf.nbytes / best / 1e9


def start_wall(cmd: list[str], reps: int) -> float:
    """Median wall seconds of a fresh process running ``cmd`` to completion."""
    walls = []
    for _ in range(reps):
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        walls.append(time.perf_counter() - t)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return statistics.median(walls)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin", default=None, help="directory of the llama.cpp binaries (or $LLAMA_BIN)")
    ap.add_argument("--model", type=Path, default=None, help="a GGUF file both can run (TQ2_0/TQ1_0 bitnet)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens for the prefill test")
    ap.add_argument("--tg", type=int, default=64, help="generated tokens for the decode test")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the median is reported)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions inside one measurement")
    ap.add_argument("--head", default=None, help="our LM-head precision (default: the engine's default)")
    ap.add_argument("--no-start", action="store_true", help="skip the start-up (fresh process) comparison")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    bin_dir = find_llama(args.llama_bin)
    if bin_dir is None:
        console.print("skipped: no llama.cpp given (--llama-bin DIR or $LLAMA_BIN); see this file's docstring")
        return 0
    if args.model is None or not args.model.is_file():
        raise SystemExit("error: --model FILE (a GGUF both engines can run) is required")
    threads = [int(t) for t in args.threads.split(",")]
    console.print(f"llama.cpp: {bin_dir}   model: {args.model}   load average before: {loadavg()}")

    records: list[dict[str, Any]] = []
    ours = {t: Ours(args.model, t, args.head) for t in threads}
    for r in range(args.rounds):
        for t in threads:
            pairs = [
                ("pp", lambda t=t: llama_bench(bin_dir, args.model, t, args.pp, 0, args.reps, None),
                 lambda t=t: ours[t].pp(args.pp, args.reps)),
                ("tg", lambda t=t: llama_bench(bin_dir, args.model, t, 0, args.tg, args.reps, None),
                 lambda t=t: ours[t].tg(args.tg, args.reps)),
            ]  # fmt: skip
            if t > 1:
                pairs.append(
                    ("tg (no spin)", lambda t=t: llama_bench(bin_dir, args.model, t, 0, args.tg, args.reps, 0),
                     lambda t=t: ours[t].tg(args.tg, args.reps))
                )  # fmt: skip
            for what, theirs_fn, ours_fn in pairs:
                a = theirs_fn()
                b = ours_fn()
                records.append({"what": what, "threads": t, "round": r, "llama": a, "ours": b, "unit": "tok/s",
                                "ratio": b / a})  # fmt: skip
                console.print(f"  round {r} t={t} {what:13s} llama.cpp {a:9.1f}  ours {b:9.1f} tok/s  ({b / a:.2f}x)")
    if not args.no_start:
        simple = bin_dir / "llama-simple"
        sample = [str(Path(sys.executable).parent / "nanochat-sample"), "--model", str(args.model), "--prompt", "def"]
        sample += ["--max-tokens", "1"]
        if simple.exists():
            for r in range(args.rounds):
                a = start_wall([str(simple), "-m", str(args.model), "-n", "1", "def"], args.reps)
                b = start_wall(sample, args.reps)
                records.append({"what": "start (1 token, fresh process)", "threads": 0, "round": r, "llama": a,
                                "ours": b, "unit": "s", "ratio": a / b})  # fmt: skip
        else:
            console.print(f"(no {simple}: start-up comparison skipped)")

    summary: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in records:
        key = (rec["what"], rec["threads"])
        s = summary.setdefault(key, {"what": key[0], "threads": key[1], "unit": rec["unit"], "llama": [], "ours": []})
        s["llama"].append(rec["llama"])
        s["ours"].append(rec["ours"])
    table = Table(title=f"ours vs llama.cpp on {args.model.name} (medians of {args.rounds} interleaved rounds)")
    for col in ("test", "threads", "llama.cpp", "ours", "ours vs llama.cpp"):
        table.add_column(col, justify="right" if col != "test" else "left")
    rows = []
    for s in summary.values():
        la, ou = statistics.median(s["llama"]), statistics.median(s["ours"])
        ratio = ou / la if s["unit"] == "tok/s" else la / ou
        rows.append({"what": s["what"], "threads": s["threads"], "unit": s["unit"], "llama": la, "ours": ou,
                     "ratio": ratio})  # fmt: skip
        fmt = "{:.1f} " + s["unit"] if s["unit"] == "tok/s" else "{:.3f} s"
        table.add_row(s["what"], str(s["threads"] or "-"), fmt.format(la), fmt.format(ou), f"{ratio:.2f}x")
    console.print(table)
    bw = Table(
        title="our decode against the read limit: bytes a token must read × tok/s vs a plain read of as many bytes"
    )
    for col in ("threads", "MB / token", "decode tok/s", "achieved GB/s", "plain read GB/s", "of the limit"):
        bw.add_column(col, justify="right")
    bandwidth = []
    for r in rows:
        if r["what"] != "tg":
            continue
        t, eng = r["threads"], ours[r["threads"]]
        nbytes = eng.bytes_per_token(args.tg)
        read = plain_read_gbps(int(nbytes), t)
        got = nbytes * r["ours"] / 1e9
        bandwidth.append({"threads": t, "bytes_per_token": nbytes, "tok_s": r["ours"], "achieved_gbps": got,
                          "plain_read_gbps": read, "fraction": got / read})  # fmt: skip
        bw.add_row(str(t), f"{nbytes / 1e6:.1f}", f"{r['ours']:.1f}", f"{got:.1f}", f"{read:.1f}", f"{got / read:.0%}")
    console.print(bw)
    console.print(f"load average after: {loadavg()}  (ratio > 1: ours faster)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"model": str(args.model), "llama_bin": str(bin_dir), "records": records, "summary": rows,
               "bandwidth": bandwidth, "load_avg_after": os.getloadavg()}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
