"""``nanochat-export``: write a trained model as GGUF (TQ2_0/TQ1_0) or safetensors.

Examples::

    nanochat-export runs/d20-20261124-101500 --format gguf --out d20.gguf
    nanochat-export runs/d20-20261124-101500 --format gguf --quant tq1_0 --out d20-tq1.gguf
    nanochat-export runs/d20-20261124-101500 --format safetensors --out d20.safetensors
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    source: Annotated[Path, typer.Argument(help="run directory, checkpoint directory, GGUF or safetensors file")],
    out: Annotated[Path, typer.Option(help="output file")],
    format: Annotated[str, typer.Option("--format", help="gguf | safetensors")] = "gguf",
    quant: Annotated[str, typer.Option(help="ternary GGUF type: tq2_0 | tq1_0")] = "tq2_0",
    arch: Annotated[
        str | None, typer.Option(help="GGUF architecture: bitnet | nanochat (default: by residual)")
    ] = None,
) -> None:
    """Export a nanochat model (a training run, a checkpoint, or another export) as GGUF or safetensors.

    Examples:

        nanochat-export runs/d20-20261124-101500 --out d20.gguf

        nanochat-export runs/d20-20261124-101500 --quant tq1_0 --out d20-tq1.gguf

        nanochat-export runs/d20-20261124-101500 --format safetensors --out d20.safetensors

    Then: nanochat-sample --model d20.gguf --prompt "def fib(n):", or nanochat-serve --model d20.gguf.
    `standard`-residual models are written as llama.cpp's `bitnet` architecture, mHC models as `nanochat`.
    """
    from nanochat.export import GGUFError, export_gguf, export_safetensors
    from nanochat.export.load import load

    try:
        m = load(source)
        model = m.torch_model()
        if format == "gguf":
            path = export_gguf(model, m.tokenizer, out, quant=quant, arch=arch, name=source.stem)
        elif format == "safetensors":
            path = export_safetensors(model, m.tokenizer, out)
        else:
            raise ValueError(f"unknown format {format!r} (gguf or safetensors)")
    except (GGUFError, ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")


def entry() -> None:
    app(prog_name="nanochat-export")
