"""The HTTP API fuzzed from its own OpenAPI document with schemathesis, in process (ASGI).

Every operation in the schema gets generated requests, valid and invalid (schemathesis's
examples, coverage and fuzzing phases), against an app on a real SQLite database holding a
few studies, one stored instance and one quarantined file, signed in as an admin (a new
bearer token for each request, so that a fuzzed ``DELETE /api/tokens/{id}`` cannot sign
the run out; every route is reached: none but the sign-in answers 401). Checks: no 5xx, and JSON
responses that the schema describes match it. Excluded: STOW-RS (``/dicomweb/...``), whose
multipart bodies the schema does not describe (fuzzed through ``tests/fuzz/
test_ingest_fuzz.py`` and ``tests/serve/test_stow.py``). The event stream
(``/api/events``) is fuzzed with the app closing every stream after its first message, so
each request ends; its parameter checks (``after``, ``kinds``, ``Last-Event-ID``) are what
runs. Derandomised and bounded for CI.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from tests.ingest.test_store import ct_bytes
from tests.signin import auth_headers
from tests.studies import add_study
from triage.db import Database
from triage.ingest.store import Ingestor
from triage.serve.app import create_app

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import (  # noqa: E402  (after the importorskip)
    not_a_server_error,
    response_schema_conformance,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values


def build_app(db: Database, root: Path) -> FastAPI:
    """The app as ``triage serve`` builds it (STOW-RS included; nothing is written under
    ``root`` until an instance arrives), every event stream closed after its first message."""
    ingestor = Ingestor(
        db, root / "dicom", root / "incoming", root / "quarantine", min_free_bytes=0
    )
    app = create_app(db, ingestor=ingestor)
    app.state.events_closing = lambda: True
    return app


# Only the schema document is taken from this app (building it touches no database and no
# file). schemathesis's ``pytest.from_fixture`` fails on pytest 9.2 (it sets
# ``Node._nodeid``, which pytest no longer has), so the app under test comes from the
# ``app`` fixture and is passed to each call instead.
schema = schemathesis.openapi.from_dict(
    build_app(Database("sqlite://"), Path("unused")).openapi()
).exclude(path_regex=r"^/dicomweb/")
# Actions put into /api/studies/{study_uid}/{action} (a generated one is nearly always
# unknown, 404): about half of the requests get a real one.
ACTIONS = ("claim", "renew", "release", "complete", "other", "other", "other", "other")


@pytest.fixture()
def app(db: Database, tmp_path: Path) -> FastAPI:
    """The app on a database with two studies, one stored instance, one quarantined file."""
    # Study "0": the string hypothesis generates first for a path parameter, so claim,
    # renew, release, complete, the study document and its FHIR Task are reached with a
    # study that exists, not only with unknown ones.
    add_study(db, "0", 20, priority="STAT")
    add_study(db, "1.2.3", 5, modality="CR", body_part="CHEST")
    (tmp_path / "incoming").mkdir()
    application = build_app(db, tmp_path)
    ingestor: Ingestor = application.state.ingestor
    assert ingestor.ingest(ct_bytes(), source="fuzz").ok
    assert not ingestor.ingest(b"not dicom", source="fuzz").ok  # a quarantine record
    return application


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_has_no_server_errors(case: Any, app: FastAPI) -> None:
    """No 5xx, and documented JSON responses match their schema. Undocumented status codes
    (400, 404, 409, 204) and rules the schema does not state (the reader name, the lease
    range) are not checked: schemathesis's other checks would flag them, not a fault."""
    if case.path == "/api/studies/{study_uid}/{action}" and case.path_parameters:
        # Chosen from the body, so that the run stays deterministic.
        action = ACTIONS[zlib.crc32(repr(case.body).encode()) % len(ACTIONS)]
        if action != "other":
            case.path_parameters = {**case.path_parameters, "action": action}
    # An admin holds every permission; the token replaces any Authorization generated.
    response = case.call_and_validate(
        app=app,
        headers=auth_headers(app.state.db),
        checks=[not_a_server_error, response_schema_conformance],
    )
    if case.path != "/api/auth/login":  # a wrong password is 401 there
        assert response.status_code != 401, (case.method, case.path, response.text)
