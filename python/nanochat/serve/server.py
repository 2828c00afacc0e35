"""Running the app under uvicorn with the guards a hostile network needs: :func:`make_server`.

Notable choices:
- **Slow clients.** uvicorn closes an idle keep-alive connection after ``keep_alive_timeout``, but any byte resets
  that, a fresh connection that sends nothing has no timer at all, and headers may trickle in forever (slowloris).
  :func:`guarded_h11` adds a *deadline*: the request line and headers must be complete within ``header_timeout``
  seconds of the connection opening (or of the previous response ending), however slowly they trickle; otherwise the
  connection gets a 408 (silently closed if it sent nothing). The body has its own deadline in the app
  (:class:`~nanochat.serve.app.BodyLimitMiddleware`, ``body_timeout``).
- **Shutdown.** :class:`Server` tells the app first (``app.state.begin_shutdown()``: queued requests get their
  503 at once, running generations get ``shutdown_grace`` seconds and then an error event), then lets uvicorn close
  the listeners and wait for the connections, with a little more than the grace before it cancels what is left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.serve.schemas import error_json
from nanochat.serve.settings import Settings

log = logging.getLogger("nanochat.serve")
SHUTDOWN_MARGIN_S = 2.0  # uvicorn waits this much beyond the grace for the final events to be written


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(
        error_json(
            f"The request headers were not received within {seconds:g} seconds.",
            "invalid_request_error",
            code="request_timeout",
        )
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def guarded_h11(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline of ``header_timeout`` seconds (see the module docstring)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _bytes_since_armed = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._bytes_since_armed += len(data)
            super().data_received(data)
            self._disarm_if_request()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # waiting for the next request's headers
            else:
                self._disarm_if_request()

        def _arm(self) -> None:
            self._disarm()
            self._bytes_since_armed = 0
            self._header_timer = self.loop.call_later(header_timeout, self._on_header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _disarm_if_request(self) -> None:
            if self.cycle is not None and not self.cycle.response_complete:  # headers complete: a request runs
                self._disarm()

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if self._bytes_since_armed:
                self.transport.write(_timeout_response(header_timeout))
            self.transport.close()

    return GuardedH11Protocol


class Server(uvicorn.Server):
    """``uvicorn.Server`` that calls ``on_shutdown()`` (on the loop) before its own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._on_shutdown is not None:
            try:
                self._on_shutdown()
            except Exception:
                log.exception("the app's shutdown hook failed")
        await super().shutdown(sockets)


def make_server(app: Any, settings: Settings, log_level: str = "info", **config: Any) -> Server:
    """A :class:`Server` for ``app`` (built by :func:`~nanochat.serve.app.create_app`) on ``settings.host:port``,
    with the timeouts and the shutdown behaviour of ``settings``; ``config`` goes to ``uvicorn.Config``."""
    cfg = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_h11(settings.header_timeout),
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=int(settings.shutdown_grace + SHUTDOWN_MARGIN_S + 0.999),
        log_level=log_level.lower(),
        **{"log_config": None, "access_log": False, **config},
    )
    state = getattr(app, "state", None)
    return Server(cfg, on_shutdown=getattr(state, "begin_shutdown", None))
