"""The webhook against a real local HTTP server: retries, signature, durable state."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import running_server
from triage.db import Database
from triage.db.tables import EventRow
from triage.events import outbox
from triage.events.webhook import WebhookConfig, WebhookSender, backoff, signature
from triage.serve.launcher import free_port

SECRET = "s3cret"


class Receiver:
    """A real HTTP server on 127.0.0.1 answering a scripted sequence of statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(
                    {"time": time.monotonic(), "body": body, "headers": dict(self.headers)}
                )
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def alert(db: Database) -> Iterator[int]:
    with db.session() as s:
        row = outbox.emit(
            s,
            outbox.CRITICAL_FINDING,
            "1.2.3.4",
            {"StudyInstanceUID": "1.2.3.4", "AccessionNumber": "ACC-9", "finding": "ich"},
            webhook=True,
        )
        outbox.emit(s, outbox.WORKLIST_CHANGED, None, {"changes": []}, webhook=False)
        s.flush()
        event_id = row.id
    yield event_id


def row_of(db: Database, event_id: int) -> EventRow:
    with db.session() as s:
        row = s.get(EventRow, event_id)
        assert row is not None
        return row


def wait_until(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff(n, 2.0, 600.0).total_seconds() for n in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert backoff(20, 2.0, 600.0) == timedelta(minutes=10)


def test_delivered_after_two_failures_with_signature(db: Database, alert: int) -> None:
    config = WebhookConfig(url="", secret=SECRET, backoff_seconds=0.1, poll_seconds=0.02)
    with Receiver([500, 500, 200]) as receiver:
        sender = WebhookSender(db, WebhookConfig(**{**config.__dict__, "url": receiver.url}))
        sender.start()
        try:
            assert wait_until(lambda: row_of(db, alert).webhook_state == "delivered")
        finally:
            sender.stop()
    row = row_of(db, alert)
    assert row.webhook_attempts == 3 and row.webhook_error is None
    assert len(receiver.requests) == 3  # the worklist_changed event was not sent
    for req in receiver.requests:
        expected = "sha256=" + hmac.new(SECRET.encode(), req["body"], hashlib.sha256).hexdigest()
        assert req["headers"]["X-Triage-Signature"] == expected == signature(SECRET, req["body"])
        assert req["headers"]["Content-Type"] == "application/json"
        assert req["headers"]["X-Triage-Event-Kind"] == "critical_finding"
    doc = json.loads(receiver.requests[0]["body"])
    assert set(doc) == {"id", "kind", "created_at", "StudyInstanceUID", "payload"}
    assert doc["id"] == alert and doc["kind"] == "critical_finding"
    assert doc["StudyInstanceUID"] == "1.2.3.4" and doc["payload"]["finding"] == "ich"
    # No accession number unless the webhook is configured to carry patient identifiers.
    assert doc["payload"] == {"StudyInstanceUID": "1.2.3.4", "finding": "ich"}
    assert all(b"ACC-9" not in req["body"] for req in receiver.requests)


def test_accession_numbers_only_when_configured(db: Database, alert: int) -> None:
    """``patient_identifiers=True`` (TRIAGE_WEBHOOK_PATIENT_IDENTIFIERS) sends the
    accession number; the signature covers the body as sent."""
    config = WebhookConfig(url="", secret=SECRET, patient_identifiers=True)
    with Receiver([200]) as receiver:
        sender = WebhookSender(db, WebhookConfig(**{**config.__dict__, "url": receiver.url}))
        assert sender.deliver_due() == 1
        sender.stop()
    (req,) = receiver.requests
    assert req["headers"]["X-Triage-Signature"] == signature(SECRET, req["body"])
    doc = json.loads(req["body"])
    assert doc["payload"] == {
        "StudyInstanceUID": "1.2.3.4",
        "AccessionNumber": "ACC-9",
        "finding": "ich",
    }


def test_gives_up_after_max_attempts_without_logging_patient_data(
    db: Database, alert: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="triage.events.webhook")
    with Receiver([503] * 10) as receiver:
        config = WebhookConfig(url=receiver.url, max_attempts=3, backoff_seconds=0.01)
        sender = WebhookSender(db, config)

        def gave_up() -> bool:
            sender.deliver_due()
            return row_of(db, alert).webhook_state == "failed"

        assert wait_until(gave_up)
        sender.stop()
    row = row_of(db, alert)
    assert row.webhook_state == "failed" and row.webhook_attempts == 3
    assert row.webhook_error == "HTTP 503"
    assert len(receiver.requests) == 3
    assert "failed after 3 attempts" in caplog.text
    assert "ACC-9" not in caplog.text and "1.2.3.4" not in caplog.text
    with Receiver([200]) as again:  # a failed event is not sent any more
        sender = WebhookSender(db, WebhookConfig(url=again.url))
        assert sender.deliver_due() == 0
        sender.stop()
        assert again.requests == []


def test_retries_resume_after_a_restart(db: Database, alert: int) -> None:
    """The retry state is in the database: a new sender (a restarted server) goes on."""
    closed = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: connection refused
    first = WebhookSender(db, WebhookConfig(url=closed, backoff_seconds=60))
    assert first.deliver_due() == 0
    first.stop()
    row = row_of(db, alert)
    assert row.webhook_state == "pending" and row.webhook_attempts == 1
    assert row.webhook_error == "ConnectError"
    next_at = row.webhook_next_at
    assert next_at is not None
    with Receiver([200]) as receiver:
        second = WebhookSender(db, WebhookConfig(url=receiver.url))
        assert second.deliver_due() == 0  # not due yet: the backoff is honoured
        later = datetime.now(UTC) + timedelta(seconds=61)
        assert second.deliver_due(now=later) == 1
        second.stop()
    row = row_of(db, alert)
    assert row.webhook_state == "delivered" and row.webhook_attempts == 2
    assert (
        len(receiver.requests) == 1 and "X-Triage-Signature" not in receiver.requests[0]["headers"]
    )


def test_an_attempt_is_taken_once(db: Database, alert: int) -> None:
    """Two senders on one database: the conditional lease lets only one POST an attempt."""
    with Receiver([200, 200]) as receiver:
        a = WebhookSender(db, WebhookConfig(url=receiver.url))
        b = WebhookSender(db, WebhookConfig(url=receiver.url))
        assert a.attempt(alert, 0) is True
        assert b.attempt(alert, 0) is False
        a.stop()
        b.stop()
    assert len(receiver.requests) == 1
    with db.session() as s:
        assert s.scalars(select(EventRow.webhook_state).where(EventRow.id == alert)).one() == (
            "delivered"
        )


@pytest.mark.e2e
def test_the_server_sends_configured_kinds_to_the_webhook(tmp_path: Any) -> None:
    """``triage serve`` with TRIAGE_WEBHOOK_*: its start-up resync event reaches the hook."""

    with Receiver([]) as receiver:
        env = {
            "TRIAGE_SERIES_QUIET_SECONDS": "3600",
            "TRIAGE_WEBHOOK_URL": receiver.url,
            "TRIAGE_WEBHOOK_SECRET": SECRET,
            "TRIAGE_WEBHOOK_KINDS": '["worklist_changed"]',
        }
        with running_server(tmp_path / "data", env):
            assert wait_until(lambda: len(receiver.requests) >= 1, timeout=20)
        req = receiver.requests[0]
    assert req["headers"]["X-Triage-Signature"] == signature(SECRET, req["body"])
    doc = json.loads(req["body"])
    assert doc["kind"] == "worklist_changed" and doc["payload"]["resync"] is True
