"""Serving throughput and latency: ``python -m nanochat.serve`` under 1, 8 and 50 concurrent streaming clients, and
time to first token over a multi-turn chat with and without the prompt cache.

Starts the server in a subprocess on 127.0.0.1 (a free port) with the model given by ``--model``, or a random model
written on the fly: ``--shape tiny`` (the default: 2 layers, width 256, a 400-token vocabulary: it measures the
server and engine overhead, not a real model) or ``--shape d20`` (``configs/d20.toml``'s model: 6 layers, width 256,
SwiGLU 2048, mHC-lite, a 16k BPE vocabulary trained on the Python standard library's sources, context 512: a real
model's per-token cost, with random weights). Each
client is an ``httpx`` async task that sends ``--requests`` streaming chat completions one after another
(``ignore_eos`` so every reply is exactly ``--max-tokens`` tokens, a fixed seed per request; with ``--json-object``
constrained to a JSON object, which ends the reply when it closes); all clients of a level
start together. Reported per level: aggregate completion tokens/s (all tokens / wall time of the level), the median
per-stream decode rate, time to first token (request sent -> first content chunk) p50/p99 and request latency (sent
-> [DONE]) p50/p99. The server runs with ``--max-concurrent`` = the largest level, so every client of a level is
generating at once (batched decode).

Then (``--cache-turns``, 0 = skip) a conversation of that many turns runs against two in-process servers on the same
model, with the prompt cache (``EngineBackend(prompt_cache=4)``) and without (``prompt_cache=0``): each turn sends
the whole conversation so far (greedy, ``--cache-reply-tokens`` per reply), so with the cache only the new turn is
prefilled. Reported: TTFT per turn (mean, last turn) and the prompt tokens the cache saved.

Then (``--burst N``, 0 = skip) N streaming requests arrive at once at a server with ``--burst-concurrent`` slots and a
queue of ``--burst-queue``: reported are the requests served, those refused with 503 + ``Retry-After`` (the bounded
queue) and any other failure, with TTFT p50/p95 of the served ones.

    python benches/bench_serve.py
    python benches/bench_serve.py --model runs/d20-20261124-101500 --max-tokens 128 --json runs/bench_serve.json
    python benches/bench_serve.py --levels 1,2,4,8,16 --requests 4 --threads 2 --cache-turns 0
    python benches/bench_serve.py --shape d20 --requests 1 --max-tokens 32 --cache-turns 10 --burst 200

``--json PATH`` writes a list of records, one per concurrency level, with keys:

    bench              "serve"
    model              model id the server reports
    engine             the server's generation mode (e.g. "engine:rust"), from /health
    concurrency        clients streaming at once
    requests           requests completed at this level (clients x --requests)
    errors             requests that failed (non-200 or no [DONE])
    max_tokens         completion tokens per request
    prompt_tokens      prompt tokens per request
    completion_tokens  completion tokens received in total
    wall_s             wall time of the level (s)
    tokens_per_s       completion_tokens / wall_s (aggregate throughput)
    speedup            tokens_per_s / tokens_per_s at the first level
    stream_tps_p50     median per-request decode rate: (tokens - 1) / (last chunk - first chunk) (tokens/s)
    ttft_p50_ms        time to first token, median (ms)
    ttft_p95_ms        time to first token, 95th percentile (ms)
    ttft_p99_ms        time to first token, 99th percentile (ms)
    latency_p50_ms     request sent -> [DONE], median (ms)
    latency_p99_ms     request sent -> [DONE], 99th percentile (ms)
    threads            --threads given to the server (null: its default)

and, for the prompt-cache comparison, one record per setting with keys:

    bench              "serve_prompt_cache"
    model, engine      as above
    prompt_cache       idle sessions kept (0 = off)
    turns              conversation turns (one request each)
    prompt_tokens_last prompt tokens of the last turn
    reused_tokens      prompt tokens taken from the cache over all turns (not prefilled)
    ttft_mean_ms       time to first token, mean over turns (ms)
    ttft_last_ms       time to first token of the last (longest) turn (ms)
    ttft_speedup       ttft_mean_ms without the cache / with it (1.0 on the record without)

and, for the burst, one record with keys:

    bench              "serve_burst"
    model, engine      as above
    burst              requests sent at once
    max_concurrent     the server's slots
    max_queue          the server's queue bound
    served             requests answered 200 and streamed to [DONE]
    rejected           requests refused with 503 and Retry-After
    other_errors       anything else
    ttft_p50_ms        time to first token of the served ones, median (ms)
    ttft_p95_ms        time to first token of the served ones, 95th percentile (ms)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny model and server helpers
from serve_fakes import ServerProcess, build_tiny_model  # noqa: E402

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring and a test."


@dataclass
class Result:
    ok: bool
    status: int = 0  # the HTTP status (0: no response)
    retry_after: bool = False  # a Retry-After header came with it
    ttft: float = 0.0  # s, request sent -> first content chunk
    decode_s: float = 0.0  # s, first -> last content chunk
    latency: float = 0.0  # s, request sent -> [DONE]
    tokens: int = 0
    prompt_tokens: int = 0


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


JSON_OBJECT = False  # --json-object: every request asks for response_format json_object (constrained decoding)


async def one_request(client: httpx.AsyncClient, max_tokens: int, seed: int) -> Result:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if JSON_OBJECT:
        body["response_format"] = {"type": "json_object"}
    t0 = time.perf_counter()
    first = last = None
    usage: dict[str, Any] | None = None
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(ok=False, status=r.status_code, retry_after="retry-after" in r.headers)
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
    except httpx.HTTPError:
        return Result(ok=False)
    if not done or usage is None or first is None or last is None:
        return Result(ok=False)
    end = time.perf_counter()
    return Result(
        True,
        200,
        False,
        first - t0,
        last - first,
        end - t0,
        int(usage["completion_tokens"]),
        int(usage["prompt_tokens"]),
    )


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker(c: int) -> list[Result]:
            return [await one_request(client, max_tokens, seed=1000 * c + i) for i in range(requests)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(worker(c) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def build_d20_model(out: Path, console: Console) -> Path:
    """A random model of ``configs/d20.toml``'s shape, with a 16k BPE tokenizer trained on the standard library's
    Python sources (local files: nothing is downloaded), written as GGUF."""
    import sysconfig

    import torch

    from nanochat.data.tokenizer import Tokenizer
    from nanochat.export import export_gguf
    from nanochat.model import GPT
    from nanochat.model.config import load_config

    cfg, _ = load_config("d20")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:150]
    with console.status(f"training a {cfg.vocab_size}-token BPE on {len(files)} stdlib files"):
        tok = Tokenizer.train([f.read_text(errors="replace") for f in files], vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = GPT(cfg.replace(vocab_size=tok.vocab_size)).eval()
    return export_gguf(model, tok, out)


async def burst(url: str, n: int, max_tokens: int) -> list[Result]:
    """``n`` streaming requests at once, one connection each."""
    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        return list(await asyncio.gather(*(one_request(client, max_tokens, seed=i) for i in range(n))))


def cache_chat(
    model: Path, turns: int, reply_tokens: int, threads: int | None, model_id: str, engine: str
) -> list[dict[str, Any]]:
    """TTFT over a ``turns``-turn chat on in-process servers with and without the prompt cache (module docstring)."""
    from serve_fakes import ServerThread

    from nanochat.serve import EngineBackend, Settings, create_app

    out: list[dict[str, Any]] = []
    for size in (4, 0):
        backend = EngineBackend.from_path(model, threads=threads, prompt_cache=size)
        messages: list[dict[str, str]] = []
        ttfts: list[float] = []
        prompt_tokens = 0
        with ServerThread(create_app(backend, Settings(log_requests=False))) as srv, httpx.Client(timeout=600) as c:
            for turn in range(turns):
                messages.append({"role": "user", "content": f"Turn {turn}: now add a test for case {turn}."})
                body = {"messages": messages, "max_tokens": reply_tokens, "temperature": 0.0, "stream": True,
                        "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
                t0 = time.perf_counter()
                first: float | None = None
                reply = ""
                with c.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                            continue
                        chunk = json.loads(line[5:])
                        if chunk.get("usage"):
                            prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                        for ch in chunk.get("choices") or []:
                            if ch["delta"].get("content"):
                                first = first if first is not None else time.perf_counter()
                                reply += ch["delta"]["content"]
                ttfts.append(((first or time.perf_counter()) - t0) * 1e3)
                messages.append({"role": "assistant", "content": reply})
        out.append(
            {
                "bench": "serve_prompt_cache",
                "model": model_id,
                "engine": engine,
                "prompt_cache": size,
                "turns": turns,
                "prompt_tokens_last": prompt_tokens,
                "reused_tokens": backend.batcher.cache.reused_tokens,
                "ttft_mean_ms": round(statistics.fmean(ttfts), 2),
                "ttft_last_ms": round(ttfts[-1], 2),
                "ttft_speedup": 1.0,
            }
        )
    on, off = out
    on["ttft_speedup"] = round(off["ttft_mean_ms"] / on["ttft_mean_ms"], 2) if on["ttft_mean_ms"] else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model to serve (default: a random one of --shape)")
    ap.add_argument("--shape", choices=("tiny", "d20"), default="tiny", help="the random model's shape, if no --model")
    ap.add_argument("--burst", type=int, default=0, help="requests sent at once in the burst test (0 = skip it)")
    ap.add_argument("--burst-concurrent", type=int, default=4, help="the burst server's --max-concurrent")
    ap.add_argument("--burst-queue", type=int, default=32, help="the burst server's --max-queue")
    ap.add_argument("--levels", default="1,8,50", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--cache-turns", type=int, default=10, help="turns of the prompt-cache chat (0 = skip it)")
    ap.add_argument("--cache-reply-tokens", type=int, default=24, help="tokens per reply in the prompt-cache chat")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--threads", type=int, default=None, help="--threads for the server")
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    ap.add_argument("--json-object", action="store_true", help="requests ask for response_format json_object")
    args = ap.parse_args()
    global JSON_OBJECT
    JSON_OBJECT = args.json_object
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    console = Console(width=max(Console().width, 120))  # the table is ~105 columns wide

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        model = args.model
        if model is None and args.shape == "d20":
            model = build_d20_model(Path(tmp) / "d20-random.gguf", console)
            console.print(f"[dim]no --model: serving a random d20-shaped model ({model.name})[/dim]")
        elif model is None:
            model = build_tiny_model(Path(tmp) / "tiny-random.gguf", seq_len=1024)
            console.print(f"[dim]no --model: serving a tiny random model ({model.name}, context 1024)[/dim]")
        server_args = ["--max-concurrent", str(max(levels)), "--log-level", "warning"]
        if args.threads is not None:
            server_args += ["--threads", str(args.threads)]
        log = Path(tmp) / "server.log"
        with ServerProcess(model, server_args, log_path=log, env={"NANOCHAT_API_KEY": ""}) as srv:
            info = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]
            model_id = info["id"]
            engine = str(httpx.get(srv.url + "/health", timeout=30).json().get("engine", "?"))
            if args.max_tokens > info["max_completion_tokens"]:
                raise SystemExit(f"--max-tokens {args.max_tokens} > the server's limit {info['max_completion_tokens']}")
            asyncio.run(run_level(srv.url, 1, 1, min(8, args.max_tokens)))  # warm up (first-request costs)
            records: list[dict[str, Any]] = []
            for c in levels:
                results, wall = asyncio.run(run_level(srv.url, c, args.requests, args.max_tokens))
                ok = [r for r in results if r.ok]
                tokens = sum(r.tokens for r in ok)
                tps = tokens / wall if wall > 0 else 0.0
                ttft = [r.ttft * 1e3 for r in ok] or [float("nan")]
                latency = [r.latency * 1e3 for r in ok] or [float("nan")]
                stream_tps = [(r.tokens - 1) / r.decode_s for r in ok if r.decode_s > 0 and r.tokens > 1]
                records.append(
                    {
                        "bench": "serve",
                        "model": model_id,
                        "engine": engine,
                        "concurrency": c,
                        "requests": len(ok),
                        "errors": len(results) - len(ok),
                        "max_tokens": args.max_tokens,
                        "prompt_tokens": ok[0].prompt_tokens if ok else 0,
                        "completion_tokens": tokens,
                        "wall_s": round(wall, 4),
                        "tokens_per_s": round(tps, 2),
                        "speedup": 0.0,
                        "stream_tps_p50": round(statistics.median(stream_tps), 2) if stream_tps else 0.0,
                        "ttft_p50_ms": round(percentile(ttft, 50), 2),
                        "ttft_p95_ms": round(percentile(ttft, 95), 2),
                        "ttft_p99_ms": round(percentile(ttft, 99), 2),
                        "latency_p50_ms": round(percentile(latency, 50), 2),
                        "latency_p99_ms": round(percentile(latency, 99), 2),
                        "threads": args.threads,
                    }
                )
            base = records[0]["tokens_per_s"] if records else 0.0
            for rec in records:
                rec["speedup"] = round(rec["tokens_per_s"] / base, 2) if base else 0.0
        cache_records = []
        if args.cache_turns > 0:
            cache_records = cache_chat(model, args.cache_turns, args.cache_reply_tokens, args.threads, model_id, engine)
        burst_records = []
        if args.burst > 0:
            burst_args = ["--max-concurrent", str(args.burst_concurrent), "--max-queue", str(args.burst_queue),
                          "--log-level", "warning"]  # fmt: skip
            if args.threads is not None:
                burst_args += ["--threads", str(args.threads)]
            with ServerProcess(model, burst_args, log_path=log, env={"NANOCHAT_API_KEY": ""}) as srv:
                results = asyncio.run(burst(srv.url, args.burst, args.max_tokens))
            served = [r for r in results if r.ok]
            ttft = [r.ttft * 1e3 for r in served] or [float("nan")]
            rejected = sum(1 for r in results if r.status == 503 and r.retry_after)
            burst_records.append({
                "bench": "serve_burst", "model": model_id, "engine": engine, "burst": args.burst,
                "max_concurrent": args.burst_concurrent, "max_queue": args.burst_queue, "served": len(served),
                "rejected": rejected, "other_errors": len(results) - len(served) - rejected,
                "ttft_p50_ms": round(percentile(ttft, 50), 2), "ttft_p95_ms": round(percentile(ttft, 95), 2),
            })  # fmt: skip

    table = Table(title=f"nanochat.serve {model_id} ({engine}), {args.max_tokens} tokens/request, streamed")
    for col in (
        "clients",
        "reqs",
        "errors",
        "tok/s",
        "vs 1st",
        "tok/s/stream",
        "TTFT p50",
        "TTFT p95",
        "TTFT p99",
        "lat p50",
        "lat p99",
    ):
        table.add_column(col, justify="right", no_wrap=True)
    for r in records:
        table.add_row(
            str(r["concurrency"]),
            str(r["requests"]),
            str(r["errors"]),
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['stream_tps_p50']:.1f}",
            f"{r['ttft_p50_ms']:.0f} ms",
            f"{r['ttft_p95_ms']:.0f} ms",
            f"{r['ttft_p99_ms']:.0f} ms",
            f"{r['latency_p50_ms']:.0f} ms",
            f"{r['latency_p99_ms']:.0f} ms",
        )
    console.print(table)
    if cache_records:
        t2 = Table(title=f"prompt cache: a {args.cache_turns}-turn chat, {args.cache_reply_tokens} tokens per reply")
        for col in ("prompt cache", "last prompt", "reused tokens", "TTFT mean", "TTFT last turn", "speedup"):
            t2.add_column(col, justify="right", no_wrap=True)
        for r in cache_records:
            cells = [str(r["prompt_tokens_last"]), str(r["reused_tokens"]), f"{r['ttft_mean_ms']:.1f} ms"]
            cells += [f"{r['ttft_last_ms']:.1f} ms", f"{r['ttft_speedup']:.2f}x"]
            t2.add_row("on" if r["prompt_cache"] else "off", *cells)
        console.print(t2)
        records += cache_records
    for r in burst_records:
        t3 = Table(title=f"burst: {r['burst']} requests at once, {r['max_concurrent']} slots, queue {r['max_queue']}")
        for col in ("sent", "served", "rejected (503)", "other errors", "TTFT p50", "TTFT p95"):
            t3.add_column(col, justify="right", no_wrap=True)
        t3.add_row(str(r["burst"]), str(r["served"]), str(r["rejected"]), str(r["other_errors"]),
                   f"{r['ttft_p50_ms']:.0f} ms", f"{r['ttft_p95_ms']:.0f} ms")  # fmt: skip
        console.print(t3)
    records += burst_records
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")
        console.print(f"wrote {len(records)} records to {args.json}")


if __name__ == "__main__":
    main()
