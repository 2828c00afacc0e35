"""``nanochat-sample``: generate a completion (or, with ``--prefix``/``--suffix``, fill in the middle) from a model file
and print it as it streams.

Examples::

    nanochat-sample --model runs/d20 --prompt "def fib(n):"
    nanochat-sample --model model.gguf --prompt "def fib(n):" --max-tokens 128 --temperature 0.8 --top-p 0.95 --seed 1
    nanochat-sample --model model.gguf --prompt "import os" --temperature 0 --stop $'\\n\\n' --threads 2
    nanochat-sample --model model.gguf --prompt "x = " --backend torch --device cuda
    nanochat-sample --model runs/d20 --prefix $'def add(a, b):\\n    ' --suffix $'\\n    return c\\n' --temperature 0

``--model`` is anything ``nanochat.export.load.load`` reads: a GGUF file (ternary tensors go straight to the Rust
engine, memory-mapped), a training run or checkpoint directory, or a safetensors export.

With ``--stats``, one line on stderr (stdout stays the prompt and the completion) gives the start-up (interpreter and
imports), the model load, the engine build, the first token (after the prompt was submitted, and since the process
started), throughput, and the resident set size beside the file's size. A GGUF loads into the Rust engine without
torch; once the output is out, the console script exits without the interpreter's teardown.

Infilling (``--prefix``/``--suffix``, either may be empty) sends the PSM prompt ``<|bos|><|fim_prefix|>prefix
<|fim_suffix|>suffix<|fim_middle|>`` (:func:`nanochat.data.fim.infill_prompt`) and prints only the generated middle,
which ends at ``<|eos|>`` (the end-of-middle marker FIM training writes), ``<|bos|>`` or a FIM sentinel. A model whose
tokenizer has no FIM tokens is refused with exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False)


def _load(path: Path) -> Any:
    """A ``LoadedModel``: GGUF weights feed the Rust engine memory-mapped, without a torch copy."""
    from nanochat.export.load import load

    return load(path)


def _rss_mib() -> tuple[float, float]:
    """``(current, peak)`` resident set size of this process in MiB (Linux ``/proc``; ``getrusage`` elsewhere)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, peak
    except OSError:  # pragma: no cover - not Linux
        return peak, peak


def _since_process_start() -> float | None:
    """Seconds since this process was started (interpreter start-up and imports included), or None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _unescape(s: str) -> str:
    """``\\n``, ``\\t``, ``\\x41``... as the characters (non-ASCII text passes through)."""
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape")


@app.command()
def main(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model file or run directory.", rich_help_panel="Model")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Text to continue.", rich_help_panel="Model")
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option(help="Infilling: the text before the gap (needs a FIM-trained model).", rich_help_panel="Infill"),
    ] = None,
    suffix: Annotated[
        str | None, typer.Option(help="Infilling: the text after the gap.", rich_help_panel="Infill")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.", rich_help_panel="Sampling")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.", rich_help_panel="Sampling")] = 0.8,
    top_k: Annotated[
        int, typer.Option(help="Keep the k most likely tokens (0 = off).", rich_help_panel="Sampling")
    ] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (1 = off).", rich_help_panel="Sampling")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: random).", rich_help_panel="Sampling")] = None,
    heal: Annotated[
        bool,
        typer.Option(
            "--heal/--no-heal",
            help="Token healing: a prompt ending mid-token (trailing spaces, half a word) has its last token re-chosen "
            "by the model, as in HF transformers.",
            rich_help_panel="Sampling",
        ),
    ] = True,
    stop: Annotated[
        list[str] | None,
        typer.Option(help="Stop string (repeatable; \\n-style escapes work); not printed.", rich_help_panel="Sampling"),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="CPU threads (0 = every core, or NANOCHAT_THREADS).", rich_help_panel="Runtime")
    ] = 0,
    backend: Annotated[str, typer.Option(help="auto | rust | torch.", rich_help_panel="Runtime")] = "auto",
    device: Annotated[str, typer.Option(help="cpu | cuda (torch backend).", rich_help_panel="Runtime")] = "cpu",
    head: Annotated[str, typer.Option(help="Rust LM head: f32 | f16 | int8.", rich_help_panel="Runtime")] = "f32",
    kv: Annotated[str, typer.Option(help="Rust KV cache: f32 | f16.", rich_help_panel="Runtime")] = "f32",
    stats: Annotated[
        bool,
        typer.Option(
            help="Print start-up, load, engine build and first-token times and RSS to stderr.",
            rich_help_panel="Runtime",
        ),
    ] = False,
) -> None:
    """Generate a completion of --prompt with the model at --model, streaming it to stdout.

    Examples:

        nanochat-sample --model runs/d20 --prompt "def fib(n):"

        nanochat-sample -m model.gguf -p "def fib(n):" --max-tokens 128 --temperature 0.8 --top-p 0.95 --seed 1

        nanochat-sample -m model.gguf -p "import os" --temperature 0 --stop "\\n\\n" --threads 2 --stats

        nanochat-sample -m runs/d20 --prefix $'def add(a, b):\\n    ' --suffix $'\\n    return c\\n' --temperature 0

    --model is a GGUF file, a training run or checkpoint directory, or a safetensors export. With --prefix and/or
    --suffix the model fills in the middle, which is all that is printed (the texts are taken as they are, like
    --prompt: a shell's $'...' quoting writes newlines).
    """
    t_main = _since_process_start()  # interpreter start-up and the imports so far
    infill = prefix is not None or suffix is not None
    if infill and prompt is not None:
        raise typer.BadParameter("give either --prompt or --prefix/--suffix, not both", param_hint="--prompt")
    if not infill and prompt is None:
        raise typer.BadParameter("give --prompt TEXT, or --prefix/--suffix for infilling", param_hint="--prompt")

    t0 = time.perf_counter()
    try:
        loaded = _load(model)
        t_load = time.perf_counter() - t0
        # imported here, not at the top: `--help` and argument errors stay fast
        from nanochat.engine.generate import Engine

        engine = Engine(loaded, backend=backend, device=device, threads=threads or None, head=head, kv=kv)
    except (OSError, ValueError) as e:  # a missing or damaged file, a bad --backend/--device: one line, exit 2
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(2) from None
    t_engine = time.perf_counter() - t0 - t_load
    source: str | list[int]
    stop_ids = None
    if infill:
        from nanochat.data.fim import FimUnavailableError, infill_prompt, middle_stop_ids

        tok: Any = engine.tokenizer
        try:
            source = infill_prompt(tok, prefix or "", suffix or "")
            stop_ids = middle_stop_ids(tok)
        except (FimUnavailableError, AttributeError) as e:
            typer.secho(f"error: {model} cannot fill in the middle: {e}", err=True, fg="red")
            raise typer.Exit(2) from None
    else:
        assert prompt is not None
        source = prompt
        sys.stdout.write(prompt)
        sys.stdout.flush()
    t1 = time.perf_counter()
    gen = engine.stream(
        source,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p if top_p < 1.0 else None,
        seed=seed,
        stop=[_unescape(s) for s in stop] if stop else None,
        stop_token_ids=stop_ids,
        heal=heal,
    )
    t_first = None
    t_first_abs = None
    for delta in gen:
        if t_first is None:
            t_first = time.perf_counter() - t1
            t_first_abs = _since_process_start()
        sys.stdout.write(delta)
        sys.stdout.flush()
    if t_first is None:  # nothing printable came (a stop token or string at once): the first token is the last
        t_first = time.perf_counter() - t1
        t_first_abs = _since_process_start()
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - t1
    res = gen.result
    if stats and res is not None:
        n = len(res.token_ids)
        rss, peak = _rss_mib()
        size = model.stat().st_size / 2**20 if model.is_file() else None
        start = "" if t_main is None else f"start-up (interpreter + imports) {t_main * 1e3:.0f} ms, "
        wall = "" if t_first_abs is None else f" ({t_first_abs * 1e3:.0f} ms after the process started)"
        typer.echo(
            f"[{engine.backend_name}] {start}load {t_load * 1e3:.0f} ms, engine build {t_engine * 1e3:.0f} ms, "
            f"first token {t_first * 1e3:.0f} ms{wall}; {res.prompt_tokens} prompt + {n} new tokens in "
            f"{elapsed:.2f} s ({n / max(elapsed, 1e-9):.1f} tok/s), finish_reason={res.finish_reason}; "
            f"RSS {rss:.0f} MiB (peak {peak:.0f})" + ("" if size is None else f", file {size:.1f} MiB"),
            err=True,
        )
    _exit_now_if_console_script()


def _exit_now_if_console_script() -> None:
    """End the ``nanochat-sample`` process once its output is out, skipping the interpreter's teardown.

    With torch imported, finalising its modules and unloading its libraries is a good part of a one-token run's wall
    time: ``python -c "import torch"`` took 5.8-7.8 s with a normal exit and 4.2-5.2 s with ``os._exit`` (load 13,
    interleaved). Only for the console script itself, never inside another program (or a test's CliRunner).
    """
    if "torch" in sys.modules and Path(sys.argv[0]).name == "nanochat-sample":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    app()
