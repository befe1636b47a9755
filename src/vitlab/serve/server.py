"""The uvicorn server `vitlab serve` runs, with a deadline on each request's head.

uvicorn bounds concurrent connections (``limit_concurrency``: it answers 503 beyond it) but times nothing out
while a request arrives: its keep-alive timer is re-armed by every byte received, so a client that opens a
connection and sends its request line and headers one byte at a time (slowloris) holds a connection for ever,
and 128 of them hold them all. The protocol below closes a connection whose request head is not complete within
``head_timeout_s`` of connecting (or of its previous response); the body has its own deadline in `Guard`.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head arrives too slowly."""

    head_timeout_s = 10.0  # set per server by `build_server`
    _head_timer: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()  # a kept-alive connection's next head gets the same time

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_deadline_passed)

    def _head_deadline_passed(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            return  # the head came: a request is being read or answered (the body's deadline is `Guard`'s)
        if not self.transport.is_closing():
            self.transport.close()


def build_server(
    app: Any,
    *,
    host: str,
    port: int,
    max_connections: int = 128,
    head_timeout_s: float = 10.0,
    log_level: str = "info",
) -> uvicorn.Server:
    """A uvicorn server for ``app``: at most ``max_connections`` connections at once (503 beyond), and each
    request's head due within ``head_timeout_s``. ``server.run()`` serves until interrupted."""
    protocol = type("VitlabH11Protocol", (_HeadDeadlineH11,), {"head_timeout_s": head_timeout_s})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        log_level=log_level,
    )
    return uvicorn.Server(config)
