"""Server settings: one frozen dataclass, resolved once (CLI flags, then ``NANOCHAT_*`` environment variables).

Notable choices:
- ``api_key`` falls back to ``NANOCHAT_API_KEY``; an empty string means "no key".
- ``max_tokens_limit`` of ``None`` means "the model's context length"; requests asking for more get a 400.
- The default model is the newest run under ``./runs`` (a directory holding ``checkpoints/``), so
  ``nanochat-train`` followed by ``nanochat-serve`` just works.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENV = "NANOCHAT_API_KEY"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a small model's context


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"  # bind address; a non-loopback one without an API key prints a warning
    port: int = 8000  # TCP port (0 = any free port)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get a 413
    max_concurrent: int = 4  # generations running at once; further requests wait in a FIFO queue
    max_tokens_limit: int | None = None  # cap on a request's max_tokens (None: the model's context length)
    threads: int | None = None  # CPU threads for torch and the Rust kernels (None: torch's default)
    log_requests: bool = True  # one log line per request

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.api_key == "":
            object.__setattr__(self, "api_key", None)

    @classmethod
    def resolve(cls, **overrides: object) -> Settings:
        """Settings from explicit values (``None`` = unset), falling back to the environment, then defaults."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if "api_key" not in values and os.environ.get(API_KEY_ENV):
            values["api_key"] = os.environ[API_KEY_ENV]
        return cls(**values)  # type: ignore[arg-type]

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from outside


def find_latest_run(runs_dir: str | os.PathLike[str] = "runs") -> Path | None:
    """The most recently modified run directory (one holding ``checkpoints/``) under ``runs_dir``, if any."""
    root = Path(runs_dir)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and (p / "checkpoints").is_dir()]
    if not runs:
        return None
    return max(runs, key=lambda p: ((p / "checkpoints").stat().st_mtime, p.name))
