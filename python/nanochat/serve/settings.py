"""Server settings: one frozen dataclass, resolved once (CLI flags, then ``NANOCHAT_*`` environment variables).

Notable choices:
- ``api_key`` falls back to ``NANOCHAT_API_KEY``; an empty string means "no key".
- ``max_tokens_limit`` of ``None`` means "the model's context length"; requests asking for more get a 400.
- ``api_key`` must be printable ASCII without spaces: HTTP headers arrive as bytes (decoded as latin-1), so a key
  with other characters could never match; it is refused at start instead.
- The default model is the newest run under ``./runs`` (a directory holding ``checkpoints/``), so
  ``nanochat-train`` followed by ``nanochat-serve`` just works.
- Hostile-load defaults: at most ``max_queue`` requests wait for a slot (more get a 503 with ``Retry-After``);
  a client has ``header_timeout`` seconds to send its request line and headers and ``body_timeout`` seconds for its
  body; an idle keep-alive connection is closed after ``keep_alive_timeout``; on SIGTERM running generations get
  ``shutdown_grace`` seconds before they are ended with an error event.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENV = "NANOCHAT_API_KEY"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a small model's context
DEFAULT_MAX_QUEUE = 32  # requests waiting for a slot; with 4 slots and ~1 s replies, a wait of ~10 s at most
_API_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"  # bind address; a non-loopback one without an API key prints a warning
    port: int = 8000  # TCP port (0 = any free port)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get a 413
    max_concurrent: int = 4  # generations running at once; further requests wait in a FIFO queue
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting at most; more get a 503 with Retry-After (0 = no waiting)
    max_tokens_limit: int | None = None  # cap on a request's max_tokens (None: the model's context length)
    threads: int | None = None  # CPU threads for torch and the Rust kernels (None: torch's default)
    log_requests: bool = True  # one log line per request
    docs: bool = False  # Swagger UI at /docs (it loads its JavaScript and CSS from a CDN, so it is off by default)
    header_timeout: float = 10.0  # seconds for a client to send its request line and headers (slowloris)
    body_timeout: float = 30.0  # seconds for a client to send its whole request body
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    shutdown_grace: float = 5.0  # seconds running generations get on SIGTERM before they are ended

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not self.shutdown_grace >= 0:
            raise ValueError(f"shutdown_grace must be >= 0 seconds, got {self.shutdown_grace}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.api_key == "":
            object.__setattr__(self, "api_key", None)
        if self.api_key is not None and not _API_KEY_CHARS.fullmatch(self.api_key):
            raise ValueError(
                "the API key must be printable ASCII without spaces (letters, digits, punctuation): HTTP headers "
                "carry bytes, so a key with other characters could never match. Try `openssl rand -hex 16`."
            )

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
