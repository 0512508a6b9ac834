"""/api/health checks the database, the DICOM listener, the worker and the disk."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from triage.config import Settings
from triage.db import Database
from triage.ingest.scp import ScpOptions, start_scp
from triage.ingest.store import Ingestor
from triage.serve.app import create_app
from triage.serve.health import (
    ECHO_AE_TITLE,
    HealthChecks,
    c_echo,
    check_database,
    check_disk,
    check_threads,
    echo_address,
)
from triage.serve.launcher import ServerProcess, free_port
from triage.serve.server import TriageService

HUGE = str(10**18)  # more free disk than any machine has


def health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/api/health", timeout=30)


# Component checks on their own


def test_database_check_names_the_failure(tmp_path: Path) -> None:
    good = Database(f"sqlite:///{tmp_path / 'ok.db'}")
    try:
        assert check_database(good).ok
    finally:
        good.dispose()
    bad = Database(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    try:
        status = check_database(bad)
    finally:
        bad.dispose()
    assert not status.ok
    assert "OperationalError" in status.detail


def test_disk_check_compares_with_the_minimum(tmp_path: Path) -> None:
    assert check_disk([tmp_path], 0).ok
    status = check_disk([tmp_path], 10**18)
    assert not status.ok
    assert "TRIAGE_MIN_FREE_BYTES" in status.detail and str(tmp_path) in status.detail


def test_thread_check_names_stopped_threads() -> None:
    stop = threading.Event()
    alive = threading.Thread(target=stop.wait, name="triage-worker")
    done = threading.Thread(target=lambda: None, name="triage-assembly")
    alive.start()
    done.start()
    done.join()
    try:
        status = check_threads([alive, done], "worker")
        assert not status.ok and "triage-assembly" in status.detail
        assert "triage-worker" not in status.detail
        assert check_threads([alive], "worker").ok
        assert not check_threads([], "worker").ok
    finally:
        stop.set()
        alive.join()


def test_echo_is_skipped_where_the_listener_would_refuse_it() -> None:
    base = ScpOptions(host="0.0.0.0", port=104, ae_title="TRIAGE")
    assert echo_address(base) == ("127.0.0.1", "")
    assert echo_address(ScpOptions(host="::", port=104, ae_title="T")) == ("::1", "")
    assert echo_address(ScpOptions(host="10.0.0.5", port=104, ae_title="T"))[0] == "10.0.0.5"
    tls = ScpOptions(host="0.0.0.0", port=104, ae_title="T", tls_cert=Path("c.pem"))
    assert echo_address(tls)[0] == ""
    aets = ScpOptions(host="0.0.0.0", port=104, ae_title="T", allowed_calling_aets=("CT1",))
    assert echo_address(aets)[0] == ""
    allowed = ScpOptions(
        host="0.0.0.0", port=104, ae_title="T", allowed_calling_aets=("CT1", ECHO_AE_TITLE)
    )
    assert echo_address(allowed)[0] == "127.0.0.1"
    peers = ScpOptions(
        host="0.0.0.0", port=104, ae_title="T", allowed_peer_addresses=("10.0.0.0/8",)
    )
    assert echo_address(peers)[0] == ""
    loop = ScpOptions(
        host="0.0.0.0", port=104, ae_title="T", allowed_peer_addresses=("127.0.0.0/8",)
    )
    assert echo_address(loop)[0] == "127.0.0.1"


def test_c_echo_counts_a_rejection_as_an_answer_and_silence_as_not(
    db: Database, tmp_path: Path
) -> None:
    ingestor = Ingestor(
        db=db, store_dir=tmp_path / "s", tmp_dir=tmp_path / "i", quarantine_dir=tmp_path / "q"
    )
    port = free_port()
    options = ScpOptions(host="127.0.0.1", port=port, ae_title="TRIAGE")
    scp = start_scp(options, ingestor)
    try:
        assert c_echo("127.0.0.1", port, "TRIAGE", 5) == (True, "answers C-ECHO")
        ok, answer = c_echo("127.0.0.1", port, "WRONG", 5)  # called AE rejected
        assert ok and "rejected" in answer
    finally:
        scp.shutdown()
    ok, answer = c_echo("127.0.0.1", port, "TRIAGE", 2)  # nobody listens there now
    assert not ok and "no answer" in answer


def test_route_answers_503_naming_the_failing_component(db: Database, tmp_path: Path) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="triage-worker")
    worker.start()
    checks = HealthChecks(
        db=db, disk_paths=[tmp_path], min_free_bytes=0, worker_threads=lambda: [worker]
    )
    with TestClient(create_app(db, health_check=checks)) as client:
        resp = client.get("/api/health")
        assert resp.status_code == 503  # no DICOM listener in this app
        assert resp.json()["failing"] == ["dicom"]
        assert resp.json()["components"]["database"]["ok"] is True
        stop.set()
        worker.join()
        body = client.get("/api/health").json()
        assert body["status"] == "unhealthy"
        assert body["failing"] == ["dicom", "worker"]


# The whole service, in this process


@pytest.fixture()
def service(tmp_path: Path) -> Iterator[TriageService]:
    settings = Settings(
        data_dir=tmp_path / "data",
        http_host="127.0.0.1",
        http_port=free_port(),
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        database_url=None,
        series_quiet_seconds=60,
    )
    svc = TriageService(settings)
    svc.start_background()
    svc.start_http_thread()
    try:
        yield svc
    finally:
        svc.stop()


def components(resp: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()["components"]
    return body


def test_healthy_service_answers_200_with_each_component(service: TriageService) -> None:
    url = f"http://127.0.0.1:{service.settings.http_port}"
    resp = health(url)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ok" and body["failing"] == []
    parts = components(resp)
    assert set(parts) == {"database", "dicom", "worker", "disk", "models"}
    assert all(p["ok"] for p in parts.values())
    assert "answers C-ECHO" in parts["dicom"]["detail"]
    # Without a model registry every model is served from its built-in weights.
    assert "blast-ct-v1 1.0.0 (built-in)" in parts["models"]["detail"]


def test_stopped_worker_gives_503_naming_the_worker(service: TriageService) -> None:
    url = f"http://127.0.0.1:{service.settings.http_port}"
    service.worker.stop()
    resp = health(url)
    assert resp.status_code == 503
    assert resp.json()["failing"] == ["worker"]
    assert "stopped" in components(resp)["worker"]["detail"]


def test_stopped_dicom_listener_gives_503_naming_dicom(service: TriageService) -> None:
    url = f"http://127.0.0.1:{service.settings.http_port}"
    scp, service._scp = service._scp, None  # stopped here, not again by service.stop()
    assert scp is not None
    scp.shutdown()
    resp = health(url)
    assert resp.status_code == 503
    assert resp.json()["failing"] == ["dicom"]


# The real server, as deployed


@pytest.mark.e2e
def test_disk_below_the_minimum_gives_503_naming_the_disk(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "data",
        {"TRIAGE_MIN_FREE_BYTES": HUGE, "TRIAGE_SERIES_QUIET_SECONDS": "60"},
    )
    server.start(require_healthy=False)
    try:
        resp = health(server.http_url)
        assert resp.status_code == 503, resp.text
        body = resp.json()
        assert body["failing"] == ["disk"]
        assert "TRIAGE_MIN_FREE_BYTES" in body["components"]["disk"]["detail"]
        assert body["components"]["dicom"]["ok"] is True
    finally:
        server.stop()
