"""The webhook: POSTs queued events (critical findings by default) to a configured URL.

Delivery state lives in the ``events`` table (``webhook_state``, ``webhook_attempts``,
``webhook_next_at``), so a restart resumes the retries where they stopped. Each event is
POSTed as JSON ``{"id", "kind", "created_at", "StudyInstanceUID", "payload"}``; with a
secret, the header ``X-Triage-Signature: sha256=<hex>`` carries the HMAC-SHA256 of the exact
body bytes. A 2xx answer delivers the event; anything else (another status, a timeout, a
refused connection) is retried after ``base * 2**(attempts - 1)`` seconds (at most
``max_backoff``) until ``max_attempts`` have failed, when the event is marked ``failed``.
Before sending, an event is leased (its next attempt moved past the request timeout) with a
conditional UPDATE, so two senders never POST the same attempt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import or_, select, update

from triage.db import Database
from triage.db.tables import EventRow
from triage.domain import WebhookState
from triage.events.outbox import event_of_row
from triage.events.visibility import visible

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Triage-Signature"


def signature(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(attempts: int, base: float, cap: float) -> timedelta:
    """The wait after the ``attempts``-th failed attempt (exponential, capped)."""
    return timedelta(seconds=min(cap, base * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class WebhookConfig:
    """Where and how events are delivered."""

    url: str
    secret: str | None = None
    max_attempts: int = 8
    backoff_seconds: float = 2.0
    max_backoff_seconds: float = 600.0
    timeout_seconds: float = 10.0
    poll_seconds: float = 1.0
    patient_identifiers: bool = False
    """Whether bodies carry accession numbers (``triage.events.visibility``)."""


class WebhookSender:
    """Delivers pending events, oldest first, from a background thread.

    Args:
        db: the database holding the outbox.
        config: the URL, secret and retry settings.
        client: an httpx client to use (default: one made here, closed by :meth:`stop`).
    """

    def __init__(
        self, db: Database, config: WebhookConfig, *, client: httpx.Client | None = None
    ) -> None:
        self.db = db
        self.config = config
        self._client = client or httpx.Client(timeout=config.timeout_seconds)
        self._own_client = client is None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="triage-webhook", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._own_client:
            self._client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:
                log.exception("webhook delivery round failed")
            self._stop.wait(self.config.poll_seconds)

    def _due(self, now: datetime, limit: int) -> list[tuple[int, int]]:
        with self.db.session() as s:
            rows = s.execute(
                select(EventRow.id, EventRow.webhook_attempts)
                .where(
                    EventRow.webhook_state == WebhookState.pending,
                    or_(EventRow.webhook_next_at.is_(None), EventRow.webhook_next_at <= now),
                )
                .order_by(EventRow.id)
                .limit(limit)
            ).all()
        return [(int(i), int(a)) for i, a in rows]

    def deliver_due(self, now: datetime | None = None, limit: int = 50) -> int:
        """Attempt every event that is due (oldest first). Returns how many were delivered."""
        delivered = 0
        for event_id, attempts in self._due(now or datetime.now(UTC), limit):
            if self._stop.is_set():
                break
            if self.attempt(event_id, attempts):
                delivered += 1
        return delivered

    def _lease(self, event_id: int, attempts: int) -> EventRow | None:
        """Take the attempt (conditional UPDATE); the row, or None when someone else did."""
        lease_until = datetime.now(UTC) + timedelta(seconds=self.config.timeout_seconds + 30)
        with self.db.session() as s:
            result = s.execute(
                update(EventRow)
                .where(
                    EventRow.id == event_id,
                    EventRow.webhook_state == WebhookState.pending,
                    EventRow.webhook_attempts == attempts,
                )
                .values(webhook_next_at=lease_until)
            )
            if int(getattr(result, "rowcount", 0) or 0) != 1:
                return None
            row = s.get(EventRow, event_id)
            if row is not None:
                s.expunge(row)
            return row

    def attempt(self, event_id: int, attempts: int) -> bool:
        """POST one event once and record the outcome. True when it was delivered."""
        row = self._lease(event_id, attempts)
        if row is None:
            return False
        event = visible(event_of_row(row), patient_identifiers=self.config.patient_identifiers)
        body = json.dumps(event.to_json(), separators=(",", ":"), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "triage-webhook",
            "X-Triage-Event-Id": str(event.id),
            "X-Triage-Event-Kind": event.kind,
        }
        if self.config.secret:
            headers[SIGNATURE_HEADER] = signature(self.config.secret, body)
        error: str | None = None
        try:
            response = self._client.post(
                self.config.url, content=body, headers=headers, timeout=self.config.timeout_seconds
            )
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}"  # the message may echo the URL: kept out
        now = datetime.now(UTC)
        done = attempts + 1
        values: dict[str, object]
        if error is None:
            values = {
                "webhook_state": WebhookState.delivered,
                "webhook_next_at": None,
                "webhook_error": None,
            }
        elif done >= self.config.max_attempts:
            values = {
                "webhook_state": WebhookState.failed,
                "webhook_next_at": None,
                "webhook_error": error,
            }
            log.error(
                "webhook: event %d (%s) failed after %d attempts: %s",
                event.id,
                event.kind,
                done,
                error,
            )
        else:
            wait = backoff(done, self.config.backoff_seconds, self.config.max_backoff_seconds)
            values = {"webhook_next_at": now + wait, "webhook_error": error}
            log.warning(
                "webhook: event %d (%s) attempt %d failed (%s); retry in %.0f s",
                event.id,
                event.kind,
                done,
                error,
                wait.total_seconds(),
            )
        with self.db.session() as s:
            s.execute(
                update(EventRow)
                .where(EventRow.id == event_id, EventRow.webhook_attempts == attempts)
                .values(webhook_attempts=done, **values)
            )
        return error is None
