"""Server-sent events end to end: a real ``triage serve`` subprocess, a real HTTP stream."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import uvicorn

from tests.conftest import pydicom_file, run_cli, running_server
from tests.signin import auth_headers
from triage.auth.roles import Role
from triage.db import Database
from triage.events import outbox
from triage.serve.app import create_app
from triage.serve.auth import SESSION_COOKIE
from triage.serve.launcher import ServerProcess, free_port

pytestmark = pytest.mark.e2e


class SSEClient:
    """Reads ``GET /api/events`` in a thread; parsed events land in ``self.events``."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []  # every event, in arrival order
        self.comments: list[str] = []
        self.connected = threading.Event()
        self.status: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SSEClient:
        self._thread.start()
        assert self.connected.wait(15), "the event stream did not open"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # the reader notices at the next line (keep-alives come every 0.5 s)
        self._thread.join(10)

    def _run(self) -> None:
        fields: dict[str, str] = {}
        with httpx.stream("GET", self.url, headers=self.headers, timeout=10) as res:
            self.status = res.status_code
            self.content_type = res.headers.get("content-type", "")
            for line in res.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    self.connected.set()
                elif line == "":
                    if "data" in fields:
                        event = {
                            "id": int(fields["id"]),
                            "event": fields["event"],
                            "data": json.loads(fields["data"]),
                        }
                        self.seen.append(event)
                        self.events.put(event)
                    fields = {}
                else:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")

    def next(self, predicate: Any = lambda e: True, timeout: float = 10.0) -> dict[str, Any]:
        """The next event matching ``predicate`` (skipping others; all are in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching event arrived in time")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(event):
                return event


def change_of(event: dict[str, Any], uid: str) -> dict[str, Any] | None:
    if event["event"] != "worklist_changed":
        return None
    for change in event["data"]["payload"]["changes"]:
        if change["StudyInstanceUID"] == uid:
            return dict(change)
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "TRIAGE_SERIES_QUIET_SECONDS": "3600",  # no analysis: the study stays as imported
        "TRIAGE_EVENTS_PUBLISH_SECONDS": "0.2",
        "TRIAGE_EVENTS_POLL_SECONDS": "0.1",
        "TRIAGE_EVENTS_KEEPALIVE_SECONDS": "0.5",
    }
    with running_server(tmp_path_factory.mktemp("triage-data"), env) as srv:
        yield srv


def headers_of(server: ServerProcess, username: str, role: Role) -> dict[str, str]:
    """``Authorization`` with a new token of ``username`` in the server's database."""
    db = Database(server.database_url)
    try:
        return auth_headers(db, username, role)
    finally:
        db.dispose()


def test_live_events_and_resume(server: ServerProcess, tmp_path: Path) -> None:
    ct = pydicom_file("CT_small.dcm")
    uid = str(pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    url = server.http_url + "/api/events"
    alice = headers_of(server, "alice", Role.radiologist)
    with SSEClient(url, server.headers) as stream:
        assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
        # A study arrives (imported by another process on the same data directory).
        done = run_cli(["import", str(ct)], server.data_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        added = stream.next(lambda e: (change_of(e, uid) or {}).get("change") == "added")
        assert change_of(added, uid)["read_state"] == "unread"  # type: ignore[index]
        assert added["data"]["kind"] == "worklist_changed" and added["data"]["id"] == added["id"]
        task = stream.next(lambda e: e["event"] == "task")
        assert task["data"]["StudyInstanceUID"] == uid
        assert task["data"]["payload"]["status"] == "requested"

        # A reader claims it over the API (the reader is the signed-in account).
        res = httpx.post(f"{server.http_url}/api/studies/{uid}/claim", json={}, headers=alice)
        assert res.status_code == 200 and res.json()["reader"] == "alice"
        claimed = stream.next(lambda e: (change_of(e, uid) or {}).get("read_state") == "claimed")
        assert change_of(claimed, uid)["claimed_by"] == "alice"  # type: ignore[index]
        task = stream.next(lambda e: e["event"] == "task")
        assert task["data"]["payload"]["status"] == "in-progress"
        assert task["data"]["payload"]["owner"] == {"display": "alice"}
        assert task["id"] > claimed["id"] > added["id"]
        last_task = task
        # Nothing else happens: keep-alive comments hold the connection open.
        deadline = time.monotonic() + 5
        while "keepalive" not in stream.comments and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "keepalive" in stream.comments
        live_ids = [e["id"] for e in stream.seen if added["id"] < e["id"] <= last_task["id"]]

    # Resuming after the "added" event gives only the later events, in order.
    headers = {**server.headers, "Last-Event-ID": str(added["id"])}
    with SSEClient(url, headers) as resumed:
        first = resumed.next()
        assert first["id"] > added["id"]
        resumed.next(lambda e: e["id"] == last_task["id"])
        resumed_ids = [e["id"] for e in resumed.seen if e["id"] <= last_task["id"]]
        assert resumed_ids == live_ids
        again = next(e for e in resumed.seen if e["id"] == claimed["id"])
        assert change_of(again, uid)["read_state"] == "claimed"  # type: ignore[index]
    # ?after= does the same, and ?kinds= keeps only the kinds asked for.
    with SSEClient(f"{url}?after={added['id']}&kinds=task", server.headers) as tasks:
        only = tasks.next()
        assert only["event"] == "task" and only["id"] > added["id"]

    fhir = httpx.get(f"{server.http_url}/api/studies/{uid}/fhir-task", headers=alice)
    assert fhir.status_code == 200 and fhir.json()["status"] == "in-progress"
    missing = httpx.get(f"{server.http_url}/api/studies/9.9.9/fhir-task", headers=alice)
    assert missing.status_code == 404


def test_bad_requests_are_refused(server: ServerProcess) -> None:
    url = server.http_url + "/api/events"
    signed_in = server.headers
    assert httpx.get(url, params={"kinds": "nonsense"}, headers=signed_in).status_code == 400
    assert httpx.get(url, headers={**signed_in, "Last-Event-ID": "abc"}).status_code == 400
    assert httpx.get(url, params={"after": "-1"}, headers=signed_in).status_code == 422


def test_the_page_follows_the_event_stream(server: ServerProcess) -> None:
    cookie = {SESSION_COOKIE: server.session_cookie()}  # the page is served signed in
    page = httpx.get(server.http_url + "/", cookies=cookie).text
    assert "new EventSource(" in page and "critical_finding" in page
    assert "setInterval(refresh, 2000)" in page  # polling stays as the fallback


def test_a_closed_stream_stops_polling(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's generator ends when the client goes away (in-process uvicorn, real TCP)."""
    polls: list[float] = []
    original = outbox.EventCursor.poll

    def counting(self: outbox.EventCursor, *args: Any, **kwargs: Any) -> list[outbox.Event]:
        polls.append(time.monotonic())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(outbox.EventCursor, "poll", counting)
    app = create_app(db)
    app.state.events_poll_seconds = 0.05
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.stream(
            "GET", f"http://127.0.0.1:{port}/api/events", headers=auth_headers(db), timeout=5
        ) as res:
            assert res.status_code == 200
            lines = res.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines) == "retry: 2000"
            deadline = time.monotonic() + 10
            while len(polls) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert len(polls) >= 3  # it was polling while open
        time.sleep(1.0)  # the next round notices the disconnect
        settled = len(polls)
        time.sleep(0.5)
        assert len(polls) == settled
    finally:
        server.should_exit = True
        thread.join(10)
