"""HTTP connection limits that uvicorn does not have: a cap on open connections, a deadline
for the request header and an idle limit while a request body arrives.

uvicorn's ``limit_concurrency`` answers 503 only once a request header has arrived, so idle
connections are never refused, and its ``timeout_keep_alive`` is disarmed by every byte
received, so a client trickling a header one byte at a time keeps its connection forever.
Every open connection costs the process a file descriptor, and the DICOM listener
(pynetdicom, which waits on its sockets with ``select()``) cannot serve an association whose
socket is descriptor 1024 or above: enough idle HTTP connections stop all DICOM ingest. The
protocol class built here closes what uvicorn would keep.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def _plain_response(status: str, body: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection."""
    data = body.encode() + b"\r\n"
    head = [
        f"HTTP/1.1 {status}",
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(data)}",
        "connection: close",
        "x-content-type-options: nosniff",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


_REFUSED = _plain_response(
    "503 Service Unavailable", "too many open connections; retry", "retry-after: 5"
)
_TIMED_OUT = _plain_response("408 Request Timeout", "request header not received in time")


class RateLimitedLog:
    """At most one log line per ``interval_seconds`` for a kind of trouble.

    Under a flood of bad connections a line per connection would bury the log: the first
    occurrence is logged with its detail, later ones within the interval are counted, and
    the next line says how many were not logged.

    Args:
        logger: where the lines go.
        interval_seconds: the shortest time between two lines.
    """

    def __init__(self, logger: logging.Logger, interval_seconds: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval_seconds
        self._lock = threading.Lock()
        self._logged_at: float | None = None
        self._unlogged = 0
        self.total = 0

    def occurred(self, level: int, msg: str, *args: Any) -> None:
        """Record one occurrence; log ``msg % args`` unless a line went out recently."""
        now = time.monotonic()
        with self._lock:
            self.total += 1
            if self._logged_at is not None and now - self._logged_at < self._interval:
                self._unlogged += 1
                return
            unlogged, self._unlogged, self._logged_at = self._unlogged, 0, now
        if unlogged:
            msg += f" ({unlogged} more since the previous such line)"
        self._logger.log(level, msg, *args)


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits of the HTTP server (see ``triage.config.Settings``: ``http_*``)."""

    max_connections: int = 256
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0


REFUSED_LOG = RateLimitedLog(log)
HEADER_TIMEOUT_LOG = RateLimitedLog(log)
BODY_TIMEOUT_LOG = RateLimitedLog(log)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap and request timeouts.

    - A connection opened while ``max_connections`` are open is answered 503 and closed
      before anything is read from it.
    - The request header must be complete ``header_timeout_seconds`` after the connection
      opened, or after the first byte of a later request on a kept-alive connection; else
      the connection is answered 408 (when no response is under way) and closed. The
      deadline is not moved by bytes arriving.
    - While a request body arrives, ``body_timeout_seconds`` without a byte closes the
      connection (not while the application is slow to read: then reading is paused).
    """

    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            REFUSED_LOG.occurred(
                logging.WARNING,
                "refused an HTTP connection from %s: %d are open, the limit"
                " (TRIAGE_HTTP_MAX_CONNECTIONS)",
                self.client[0] if self.client else "?",
                self.limits.max_connections,
            )
            transport.write(_REFUSED)
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._body_timer is not None:
            self._arm_body_timer()
        super().data_received(data)

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._arm_body_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()

    # Timers

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout_seconds, self._header_timed_out
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_body_timer(self) -> None:
        self._cancel_body_timer()
        self._body_timer = self.loop.call_later(
            self.limits.body_timeout_seconds, self._body_timed_out
        )

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        HEADER_TIMEOUT_LOG.occurred(
            logging.INFO,
            "closed an HTTP connection from %s: no complete request header within %g s"
            " (TRIAGE_HTTP_HEADER_TIMEOUT_SECONDS)",
            self.client[0] if self.client else "?",
            self.limits.header_timeout_seconds,
        )
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_TIMED_OUT)
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:
            # The application has not read what arrived: the client is not the slow one.
            self._arm_body_timer()
            return
        BODY_TIMEOUT_LOG.occurred(
            logging.INFO,
            "closed an HTTP connection from %s: its request body stopped for %g s"
            " (TRIAGE_HTTP_BODY_TIMEOUT_SECONDS)",
            self.client[0] if self.client else "?",
            self.limits.body_timeout_seconds,
        )
        self.transport.close()


def limited_protocol(limits: ConnectionLimits) -> type[LimitedHttpProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)`` for these limits."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})
