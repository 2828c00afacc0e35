"""``nanochat-serve`` / ``python -m nanochat.serve``: serve a model over an OpenAI-compatible HTTP API.

Examples::

    nanochat-serve                                   # the newest run under ./runs, on http://127.0.0.1:8000/
    nanochat-serve --model runs/d20-20261124-101500  # a run directory (its latest checkpoint)
    nanochat-serve --model d20.gguf --port 8080      # a GGUF export (or a .safetensors export)
    nanochat-serve --model d20.gguf --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
    NANOCHAT_API_KEY=secret nanochat-serve --model d20.gguf --max-concurrent 8

Then open http://127.0.0.1:8000/ for the chat page, or use any OpenAI client::

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "def fib(n):"}], "max_tokens": 64}'

Exit code 2 when there is no model to serve (none given, none under ./runs) or it cannot be loaded.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from nanochat.serve.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, Settings, find_latest_run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

MODEL = "Model"
NET = "Network and access"
LIMITS = "Limits"
RUN = "Runtime"

NO_MODEL = (
    "error: no model to serve: pass --model PATH (a .gguf or .safetensors export, or a run directory), or train one "
    "first with `nanochat-train --config d20` (runs go to ./runs) or export one with `nanochat-export`"
)


def exposure_warning(settings: Settings) -> str | None:
    """The warning for a server reachable from other machines without an API key, if that is the case."""
    if settings.is_loopback or settings.api_key is not None:
        return None
    return (
        f"warning: binding {settings.host} without an API key: anyone who can reach port {settings.port} can use "
        "the model. Set --api-key or NANOCHAT_API_KEY, or bind 127.0.0.1."
    )


def _fail(msg: str) -> None:
    typer.secho(msg if msg.startswith("error:") else f"error: {msg}", err=True, fg="red")
    raise typer.Exit(2)


@app.command()
def serve(
    model: Annotated[
        Path | None,
        typer.Option(
            help="GGUF file, safetensors export or run directory (default: newest run under ./runs)",
            rich_help_panel=MODEL,
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="model id in the API (default: from the path)", rich_help_panel=MODEL)
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N", rich_help_panel=MODEL)] = "cpu",
    host: Annotated[str, typer.Option(help="bind address (non-loopback: set an API key)", rich_help_panel=NET)] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port", rich_help_panel=NET)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="require `Authorization: Bearer KEY` on everything but /, /health and /metrics (env "
            "NANOCHAT_API_KEY; printable ASCII)",
            rich_help_panel=NET,
        ),
    ] = None,
    docs: Annotated[
        bool, typer.Option(help="Swagger UI at /docs (loads its JS/CSS from a CDN)", rich_help_panel=NET)
    ] = False,
    header_timeout: Annotated[
        float, typer.Option(help="seconds a client has to send its request headers", rich_help_panel=NET)
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(help="seconds a client has to send its request body", rich_help_panel=NET)
    ] = 30.0,
    keep_alive_timeout: Annotated[
        float, typer.Option(help="seconds an idle keep-alive connection stays open", rich_help_panel=NET)
    ] = 5.0,
    max_body_bytes: Annotated[
        int, typer.Option(help="largest accepted request body", rich_help_panel=LIMITS)
    ] = DEFAULT_MAX_BODY_BYTES,
    max_concurrent: Annotated[
        int,
        typer.Option(
            help="generations at once (one batched decode); more wait in a FIFO queue", rich_help_panel=LIMITS
        ),
    ] = 4,
    max_queue: Annotated[
        int,
        typer.Option(help="requests that may wait for a slot; more get a 503 with Retry-After", rich_help_panel=LIMITS),
    ] = DEFAULT_MAX_QUEUE,
    max_tokens_limit: Annotated[
        int | None, typer.Option(help="cap on max_tokens per request (default: the context)", rich_help_panel=LIMITS)
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch and the Rust kernels", rich_help_panel=RUN)
    ] = None,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            help="seconds running generations get on SIGTERM before they end with an error", rich_help_panel=RUN
        ),
    ] = 5.0,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error", rich_help_panel=RUN)] = "info",
) -> None:
    """Serve a nanochat model: chat page at /, OpenAI-compatible API at /v1.

    Examples: [bold]nanochat-serve --model d20.gguf[/bold] ·
    [bold]nanochat-serve --model runs/d20-20261124-101500 --port 8080[/bold] ·
    [bold]nanochat-serve --model d20.gguf --host 0.0.0.0 --api-key KEY[/bold]
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.resolve(
            host=host,
            port=port,
            api_key=api_key,
            max_body_bytes=max_body_bytes,
            max_concurrent=max_concurrent,
            max_queue=max_queue,
            max_tokens_limit=max_tokens_limit,
            threads=threads,
            docs=docs,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            keep_alive_timeout=keep_alive_timeout,
            shutdown_grace=shutdown_grace,
        )
    except ValueError as e:
        _fail(str(e))
    if model is None:
        model = find_latest_run("runs")
        if model is None:
            _fail(NO_MODEL)
        assert model is not None
    if not model.exists():
        _fail(f"{model}: no such file or directory")

    if settings.threads is not None:
        from nanochat import ops

        ops.set_num_threads(settings.threads)  # one thread budget for torch and Rust
        if "torch" in sys.modules:  # a torch-backed model sizes torch's pool too; a GGUF on Rust never imports it
            sys.modules["torch"].set_num_threads(settings.threads)

    from nanochat.serve.app import create_app
    from nanochat.serve.backend import EngineBackend

    try:
        backend = EngineBackend.from_path(model, model_id=model_name, device=device, threads=settings.threads)
    except Exception as e:  # any loader error (missing tokenizer, damaged file, unknown format) is the user's to fix
        _fail(f"cannot load {model}: {e}")
    warning = exposure_warning(settings)
    if warning:
        typer.secho(warning, err=True, fg="yellow")
    typer.secho(
        f"serving {backend.model_id} ({model}, {backend.mode}, context {backend.context_length}, {backend.kind} model) "
        f"on http://{settings.host}:{settings.port}/  (API: /v1, metrics: /metrics)",
        err=True,
    )

    from nanochat.serve.server import make_server

    # uvicorn's own lines go through the logging set up above, in one format; the app logs one line per request
    make_server(create_app(backend, settings), settings, log_level=log_level).run()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``nanochat-serve``)."""
    app(args=argv, prog_name="nanochat-serve")


if __name__ == "__main__":
    main()
