"""Helpers for the server's tests and benchmark: a tiny real model, and servers on loopback (thread or process).

``build_tiny_model`` writes a small *untrained* ternary GPT (2 layers, width 256, a ~400-token BPE) as a GGUF or
safetensors export in about a second. Random weights would emit special tokens (ending replies at once) and stray
UTF-8 continuation bytes (U+FFFD) all the time, so the tied embedding rows of special tokens and of tokens that are
not printable ASCII are zeroed (their logit is then 0) and the others are scaled up: their logits spread far above
0, so such tokens have ~1e-5 of the probability per step. Replies are then long, printable, code-flavoured noise that
depends on the seed: good enough to test serving, and nothing to read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

TINY_CORPUS = (
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.getcwd())\n",
    "while x < 10:\n    x += 1\n",
)
PRINTABLE = frozenset(range(32, 127)) | {9, 10}  # tab and newline


def build_tiny_model(out: str | os.PathLike[str], seq_len: int = 256, seed: int = 0, vocab_size: int = 400) -> Path:
    """Write a tiny random model to ``out``: a ``.gguf`` or ``.safetensors`` export, or else a run directory as
    ``nanochat-train`` leaves it (``checkpoints/step_000001/`` and ``tokenizer.json``); returns the path."""
    import torch

    from nanochat.data.tokenizer import SPECIAL_TOKENS, Tokenizer
    from nanochat.export import export_gguf, export_safetensors
    from nanochat.model import GPT, GPTConfig

    out = Path(out)
    tok = Tokenizer.train(list(TINY_CORPUS) * 30, vocab_size)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size,
        seq_len=seq_len,
        n_layer=2,
        n_embd=256,
        n_head=4,
        n_kv_head=4,
        mlp_hidden=512,
        residual="standard",
        qk_norm=False,
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # away from the identity init, so every layer matters
        model.wte.weight.mul_(2.0)  # logits of kept tokens spread well above 0
        for i in range(tok.vocab_size):
            text = tok.decode([i])
            if i < len(SPECIAL_TOKENS) or not text or any(ord(c) not in PRINTABLE for c in text):
                model.wte.weight[i] = 0.0
    model.eval()
    if out.suffix == ".safetensors":
        return export_safetensors(model, tok, out)
    if out.suffix == ".gguf":
        return export_gguf(model, tok, out)
    from nanochat.train.checkpoint import CheckpointManager

    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.json")
    CheckpointManager(out).save(1, model, [], {"model_config": cfg.to_dict()})
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """An app under uvicorn in a daemon thread on 127.0.0.1 (context manager); ``.url`` is its base URL.

    It runs :func:`nanochat.serve.server.make_server` with the app's own settings (timeouts, shutdown grace), so
    leaving the context is the server's graceful shutdown."""

    def __init__(self, app: Any, port: int | None = None, startup_timeout: float = 30.0) -> None:
        from nanochat.serve.server import make_server
        from nanochat.serve.settings import Settings

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = getattr(getattr(app, "state", None), "settings", None) or Settings()
        settings = dataclasses.replace(settings, host="127.0.0.1", port=self.port)
        self.server = make_server(app, settings, log_level="warning")  # the CLI's server: timeouts, shutdown
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self._timeout = startup_timeout

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)


class ServerProcess:
    """``python -m nanochat.serve --model MODEL ARGS`` on 127.0.0.1 in a subprocess (context manager), ready when
    /health answers.

    Its stderr (the log) goes to ``log_path``; ``.url`` is the base URL.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None,
        args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 120.0,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model_args = [] if model is None else ["--model", str(model)]  # None: the server picks ./runs' newest
        self.cmd = [sys.executable, "-m", "nanochat.serve", *model_args, "--host", "127.0.0.1", "--port",
                    str(self.port), *args]  # fmt: skip
        self.cwd = cwd
        self.log_path = Path(log_path) if log_path else None
        self.env = {**os.environ, **(env or {})}
        self._timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __enter__(self) -> ServerProcess:
        import httpx

        self._log = open(self.log_path, "wb") if self.log_path else None  # the server's log, closed in __exit__
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + self._timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}: {' '.join(self.cmd)}; see {self.log_path}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"server did not answer /health within {self._timeout}s")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{"name{labels}": value}`` (labels as exposed, sorted by the client library)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def iter_sse(lines: Iterator[str]) -> Iterator[str]:
    """``data:`` payloads of an SSE line stream, ``[DONE]`` included."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()
