"""``GET /api/events`` refuses a start id the database cannot hold, before the stream starts.

Found by an outside probe: ``Last-Event-ID`` (or ``?after=``) at or above 2^63 answered 200
and then ended the stream with an OverflowError at the first read of the outbox; browsers
reconnected every 2 s for ever. The server runs in-process under uvicorn (real HTTP).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from tests.signin import auth_headers
from triage.auth.roles import Role
from triage.db import Database
from triage.events.outbox import MAX_EVENT_ID
from triage.serve.app import create_app
from triage.serve.launcher import free_port


@pytest.fixture()
def events_url(db: Database) -> Iterator[str]:
    app = create_app(db)
    app.state.events_poll_seconds = 0.05
    app.state.events_keepalive_seconds = 0.1
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        # Ready when it answers (a refused connection before then is retried).
        with httpx.Client(transport=httpx.HTTPTransport(retries=50)) as client:
            client.get(f"http://127.0.0.1:{port}/api/health", timeout=10)
        yield f"http://127.0.0.1:{port}/api/events"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture()
def signed_in(db: Database) -> dict[str, str]:
    """A token of an integration account (it may follow the event stream)."""
    return auth_headers(db, "event-feed", Role.integration)


@pytest.mark.parametrize(
    "header",
    [str(2**63), str(2**64), "9" * 40, "-1", "+5", "1e3", "12.0", "٣".encode(), "0x10", "5 6"],
)
def test_bad_last_event_id_is_a_400(
    events_url: str, signed_in: dict[str, str], header: str | bytes
) -> None:
    res = httpx.get(events_url, headers={**signed_in, "Last-Event-ID": header}, timeout=10)
    assert res.status_code == 400
    assert res.json()["detail"] == f"Last-Event-ID must be an event id (0 to {MAX_EVENT_ID})"


@pytest.mark.parametrize("after", [str(2**63), str(2**64), "-1"])
def test_bad_after_is_a_422_naming_the_parameter(
    events_url: str, signed_in: dict[str, str], after: str
) -> None:
    res = httpx.get(events_url, params={"after": after}, headers=signed_in, timeout=10)
    assert res.status_code == 422
    (error,) = res.json()["detail"]
    assert error["loc"] == ["query", "after"]


@pytest.mark.parametrize("where", ["header", "query"])
def test_the_largest_id_opens_a_stream_that_stays_open(
    events_url: str, signed_in: dict[str, str], where: str
) -> None:
    """2^63 - 1 is a valid start: the stream reads the outbox and keeps going (it used to
    end at the first read for ids one above)."""
    headers = {**signed_in, **({"Last-Event-ID": str(MAX_EVENT_ID)} if where == "header" else {})}
    params = {"after": str(MAX_EVENT_ID)} if where == "query" else {}
    with httpx.stream("GET", events_url, headers=headers, params=params, timeout=10) as res:
        assert res.status_code == 200
        lines = res.iter_lines()
        assert next(lines) == "retry: 2000"
        assert next(lines) == ": connected"
        # Keep-alives come only after reads of the outbox that found nothing: two of them
        # show the stream survived reading past the largest id.
        keepalives = 0
        for line in lines:
            if line == ": keepalive":
                keepalives += 1
            if keepalives == 2:
                break
        assert keepalives == 2
