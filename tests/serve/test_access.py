"""Who may call what, generated from the OpenAPI document.

Every operation in ``app.openapi()`` carries ``x-permission``: ``public``, ``signed_in`` or
a :class:`~triage.auth.roles.Permission`. The tests below are parametrized over every
(method, path) in the document, so a new route is covered without editing this file (a
route with a path parameter or body this file cannot fill fails loudly, naming it):

- without credentials every route answers 401, except the public ones;
- a token of a role without the route's permission gets 403;
- a token of a role holding it gets neither (path parameters filled with real values, a
  real body: a STOW-RS request carries a real DICOM instance);
- a cookie-signed state change needs the session's CSRF token and changes nothing without it.

Also: a forged ``reader`` in a claim body is ignored, a bad bearer token is 401 even with a
good cookie beside it, and an integration account reads the worklist only when granted
``view_patients``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import insert, select

from tests.conftest import pydicom_file
from tests.signin import token_for
from triage.auth.accounts import create_account, set_disabled, set_grants, set_password
from triage.auth.roles import ROLE_PERMISSIONS, Permission, Role
from triage.auth.tokens import create_token, revoke_token
from triage.db import Database
from triage.db.tables import Base, FindingRow, SeriesRow, StudyRow
from triage.ingest.store import Ingestor
from triage.results import Overlay, overlay_path, save_overlay
from triage.serve.app import create_app

STUDY_UID = "1.2.826.0.1.3680043.10.543.7001"
FINDING = "intracranial_haemorrhage"
PATIENT_NAME = "ZEBEDEE^QUIXOTIC"
PATIENT_ID = "PID-XYZZY-77"
ACCESSION = "ACC-4242"
PASSWORD = "a long enough pass phrase"
PUBLIC, SIGNED_IN = "public", "signed_in"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BOUNDARY = "access-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

# Routes outside the OpenAPI document: pages and files anyone may load (the page itself
# sends a browser without a session to the sign-in page). A new hidden route must be added
# here on purpose, so that no data route escapes the generated tests by hiding.
UNDOCUMENTED_PUBLIC = frozenset(
    {
        ("GET", "/"),
        ("GET", "/admin"),
        ("GET", "/viewer"),
        ("GET", "/login"),
        ("GET", "/static/{name}"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("HEAD", "/openapi.json"),
    }
)


# --- seeding ------------------------------------------------------------------------------


def seed_study(
    db: Database,
    uid: str = STUDY_UID,
    *,
    results_dir: Path | None = None,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
    accession: str | None = ACCESSION,
    minutes_ago: float = 5.0,
    finding: str | None = FINDING,
) -> None:
    """A head CT study with patient identifiers and, unless ``finding`` is None, one flagged
    AI finding (with an overlay file under ``results_dir`` when given)."""
    arrived = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    with db.session() as s:
        study_id = s.scalar(
            insert(StudyRow)
            .returning(StudyRow.id)
            .values(
                StudyInstanceUID=uid,
                PatientName=patient_name,
                PatientID=patient_id,
                AccessionNumber=accession,
                StudyDescription="CT HEAD",
                first_received_at=arrived,
                last_received_at=arrived,
                ai_status="ok",
            )
        )
        s.execute(
            insert(SeriesRow).values(
                study_id=study_id,
                SeriesInstanceUID=uid + ".1",
                Modality="CT",
                BodyPartExamined="HEAD",
                n_instances=1,
                last_received_at=arrived,
                state="complete",
            )
        )
        if finding is None:
            return
        mask_path = None
        if results_dir is not None:
            labels = np.zeros((3, 16, 16), dtype=np.uint8)
            labels[1, 4:10, 4:10] = 1
            overlay = Overlay(
                "labels",
                labels,
                np.full(labels.shape, 35, dtype=np.int16),
                ("IPH", "EAH", "oedema", "IVH"),
                (0, 0, 0),
                uid + ".1",
                # On the stored CT_small slice (z -75.7 mm), so the viewer can lay it there.
                grid_origin=(-158.0, -179.0, -76.7),
                grid_spacing=(1.0, 1.0, 1.0),
                grid_direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            )
            path = overlay_path(results_dir, uid, finding)
            save_overlay(path, overlay)
            mask_path = str(path)
        s.add(
            FindingRow(
                study_id=study_id,
                finding=finding,
                flag=1,
                score=0.9,
                model_name="blast-ct-v1",
                model_version="1",
                payload={
                    "finding": finding,
                    "flag": True,
                    "score": 0.9,
                    "volumes_ml": {"IPH": 3.0},
                    "model": {"name": "blast-ct-v1", "version": "1"},
                },
                mask_path=mask_path,
                created_at=arrived,
            )
        )


def seed_dicom_result(db: Database, results_dir: Path, uid: str = STUDY_UID) -> str:
    """A DICOM result (an SR file with the study's UIDs) indexed for the study; its
    SOPInstanceUID."""
    from triage.dicomout.index import NewResult, replace_results
    from triage.domain import DicomResultKind

    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = results_dir / "sr.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    result = NewResult(
        DicomResultKind.sr,
        ds.SOPInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPClassUID,
        path,
        FINDING,
        "blast-ct-v1",
    )
    with db.session() as s:
        study_id = s.scalar(select(StudyRow.id).where(StudyRow.StudyInstanceUID == uid))
        assert study_id is not None
        replace_results(
            s,
            study_id=study_id,
            model_name="blast-ct-v1",
            results=[result],
            destinations=["PACS@192.0.2.1:104"],
            outcomes=[],
            now=datetime.now(UTC),
        )
    return str(ds.SOPInstanceUID)


STORED_SOP = STUDY_UID + ".1.1"  # the instance stored in the seeded series


def dicom_instance(
    study_uid: str = STUDY_UID, *, series_uid: str | None = None, sop_uid: str | None = None
) -> bytes:
    """CT_small.dcm as a new instance of ``study_uid`` (a new SOPInstanceUID each call
    unless ``sop_uid`` is given; in ``series_uid`` when given)."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def stow_body(data: bytes) -> bytes:
    delim = f"--{BOUNDARY}".encode()
    return (
        delim + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n" + delim + b"--\r\n"
    )


@dataclass
class Site:
    """A migrated database with a study, accounts of every role and a STOW-RS store."""

    db: Database
    root: Path
    app: Any
    tokens: dict[Role, str]
    token_id: int
    path_values: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> TestClient:
        return TestClient(self.app, **kwargs)

    def bearer(self, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def files(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.root))
            for d in ("dicom", "quarantine")
            for p in (self.root / d).rglob("*")
            if p.is_file()
        )


def make_site(db: Database, root: Path) -> Site:
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    ingestor = Ingestor(
        db, root / "dicom", root / "incoming", root / "quarantine", min_free_bytes=0
    )
    app = create_app(db, ingestor=ingestor)
    app.state.events_closing = lambda: True  # an event stream ends after its first message
    seed_study(db, results_dir=root / "results")
    stored = ingestor.ingest(
        dicom_instance(series_uid=STUDY_UID + ".1", sop_uid=STORED_SOP), source="test"
    )
    assert stored.ok, stored
    result_uid = seed_dicom_result(db, root / "results")
    create_account(db, "reader", Role.radiologist, password=PASSWORD)
    create_account(db, "spare", Role.radiologist)
    tokens = {role: token_for(db, f"test-{role.value}", role) for role in Role}
    _token, info = create_token(db, "spare", "to be revoked")
    values = {
        "study_uid": STUDY_UID,
        "action": "claim",
        "finding": FINDING,
        "token_id": str(info.id),
        "username": "spare",
        "sop_instance_uid": result_uid,
        "series_uid": STUDY_UID + ".1",
        "sop_uid": STORED_SOP,
        "frame_list": "1",
        "index": "0",
    }
    return Site(db, root, app, tokens, info.id, values)


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table."""
    with db.engine.connect() as conn:
        return {
            table.name: [
                tuple(row) for row in conn.execute(table.select().order_by(*table.primary_key))
            ]
            for table in Base.metadata.sorted_tables
        }


# --- the operations -----------------------------------------------------------------------


def _openapi() -> dict[str, Any]:
    """The OpenAPI document of an app built with every router (STOW-RS included)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        db = Database("sqlite://")
        ingestor = Ingestor(db, Path(tmp) / "d", Path(tmp) / "i", Path(tmp) / "q")
        doc = create_app(db, ingestor=ingestor).openapi()
        db.dispose()
    return doc


DOCUMENT = _openapi()
COMPONENTS: dict[str, Any] = DOCUMENT.get("components", {}).get("schemas", {})
OPERATIONS: list[tuple[str, str, dict[str, Any]]] = [
    (method.upper(), path, op)
    for path, ops in DOCUMENT["paths"].items()
    for method, op in ops.items()
]
OPERATION = {(m, p): op for m, p, op in OPERATIONS}


def permission_of(method: str, path: str) -> str:
    return str(OPERATION[(method, path)]["x-permission"])


def roles_holding(permission: str) -> list[Role]:
    if permission in (PUBLIC, SIGNED_IN):
        return list(Role)
    return [r for r in Role if Permission(permission) in ROLE_PERMISSIONS[r]]


def op_id(method: str, path: str, role: Role | None = None) -> str:
    return f"{method} {path}" + (f" as {role.value}" if role else "")


def _minimal(schema: dict[str, Any]) -> Any:
    """The smallest value a JSON schema (as FastAPI writes it) accepts."""
    if "$ref" in schema:
        return _minimal(COMPONENTS[schema["$ref"].rsplit("/", 1)[-1]])
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"]
            return _minimal(options[0])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {name: _minimal(props[name]) for name in schema.get("required", [])}
    if kind == "array":
        return []
    if kind == "string":
        return "x" * max(1, int(schema.get("minLength", 1)))
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    raise AssertionError(f"no minimal value for schema {schema}")


def _stow(site: Site) -> dict[str, Any]:
    return {"content": stow_body(dicom_instance()), "headers": {"Content-Type": MULTIPART}}


# Bodies the schema's minimal value would not make valid (a real password, an existing
# finding, a free name, exactly one change) or that the schema does not describe (STOW-RS).
BODIES: dict[tuple[str, str], Callable[[Site], dict[str, Any]]] = {
    ("POST", "/api/auth/login"): lambda s: {"json": {"username": "reader", "password": PASSWORD}},
    ("POST", "/api/accounts"): lambda s: {"json": {"username": "newcomer", "role": "radiologist"}},
    ("PATCH", "/api/accounts/{username}"): lambda s: {"json": {"grants": ["view_quarantine"]}},
    ("POST", "/api/tokens"): lambda s: {"json": {"username": "spare", "name": "access test"}},
    ("POST", "/api/studies/{study_uid}/acknowledge"): lambda s: {"json": {"finding": FINDING}},
    ("POST", "/api/studies/{study_uid}/feedback"): lambda s: {
        "json": {"finding": FINDING, "verdict": "agree"}
    },
    ("POST", "/dicomweb/studies"): _stow,
    ("POST", "/dicomweb/studies/{study_uid}"): _stow,
}


def request_of(site: Site, method: str, path: str) -> dict[str, Any]:
    """``client.request`` arguments for a valid call of the operation."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in site.path_values, f"{method} {path}: no test value for {{{name}}}"
        return site.path_values[name]

    url = re.sub(r"\{(\w+)\}", fill, path)
    op = OPERATION[(method, path)]
    if (method, path) in BODIES:
        extra = BODIES[(method, path)](site)
    elif "requestBody" in op:
        content = op["requestBody"]["content"]
        assert "application/json" in content, f"{method} {path}: add its body to BODIES"
        extra = {"json": _minimal(content["application/json"]["schema"])}
    else:
        extra = {}
    return {"method": method, "url": url, **extra}


def call(
    site: Site,
    client: TestClient,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> Any:
    args = request_of(site, method, path)
    merged = {**args.pop("headers", {}), **(headers or {})}
    return client.request(headers=merged, **args)


DENIED = [
    (m, p, role)
    for m, p, op in OPERATIONS
    if op["x-permission"] not in (PUBLIC, SIGNED_IN)
    for role in Role
    if Permission(op["x-permission"]) not in ROLE_PERMISSIONS[role]
]
ALLOWED = [
    (m, p, role)
    for m, p, op in OPERATIONS
    for role in ([None] if op["x-permission"] == PUBLIC else roles_holding(op["x-permission"]))
]
STATE_CHANGING = [
    (m, p) for m, p, op in OPERATIONS if m not in SAFE_METHODS and op["x-permission"] != PUBLIC
]
SIGNED_IN_SAFE = [
    (m, p) for m, p, op in OPERATIONS if m in SAFE_METHODS and op["x-permission"] != PUBLIC
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One site for the checks that change nothing (401, 403)."""
    root = tmp_path_factory.mktemp("access")
    db = Database(f"sqlite:///{root / 'triage.db'}")
    db.migrate()
    try:
        yield make_site(db, root)
    finally:
        db.dispose()


@pytest.fixture()
def site(db: Database, tmp_path: Path) -> Site:
    return make_site(db, tmp_path)


# --- the document -------------------------------------------------------------------------


def test_every_operation_declares_a_known_permission() -> None:
    known = {PUBLIC, SIGNED_IN, *(p.value for p in Permission)}
    assert len(OPERATIONS) >= 20
    for method, path, op in OPERATIONS:
        assert op.get("x-permission") in known, f"{method} {path}: {op.get('x-permission')}"
    public = {(m, p) for m, p, op in OPERATIONS if op["x-permission"] == PUBLIC}
    assert public == {
        ("POST", "/api/auth/login"),
        ("GET", "/api/auth/methods"),
        ("GET", "/api/auth/oidc/start"),
        ("GET", "/api/auth/oidc/callback"),
        ("GET", "/api/health"),
    }


def test_routes_outside_the_document_are_the_known_pages(shared: Site) -> None:
    hidden = {
        (method, route.path)
        for route in shared.app.routes
        if isinstance(route, APIRoute) and not route.include_in_schema
        for method in route.methods
    }
    hidden |= {
        (method, route.path)
        for route in shared.app.routes
        if not isinstance(route, APIRoute) and hasattr(route, "methods")
        for method in route.methods or ()
    }
    assert hidden <= UNDOCUMENTED_PUBLIC, hidden - UNDOCUMENTED_PUBLIC


# --- (a) no credentials -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [(m, p) for m, p, _ in OPERATIONS],
    ids=[op_id(m, p) for m, p, _ in OPERATIONS],
)
def test_without_credentials_only_public_routes_answer(
    shared: Site, method: str, path: str
) -> None:
    res = call(shared, shared.client(), method, path)
    if permission_of(method, path) == PUBLIC:
        # Single sign-on answers 404 here: no provider is configured in this app.
        sso_off = path.startswith("/api/auth/oidc/") and res.status_code == 404
        assert res.status_code != 401 and (res.status_code < 400 or sso_off), res.text
    else:
        assert res.status_code == 401, res.text
        assert res.headers["www-authenticate"] == "Bearer"


# --- (b) the wrong role -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "role"), DENIED, ids=[op_id(m, p, r) for m, p, r in DENIED]
)
def test_a_role_without_the_permission_gets_403(
    shared: Site, method: str, path: str, role: Role
) -> None:
    before = snapshot(shared.db)
    res = call(shared, shared.client(), method, path, shared.bearer(role))
    assert res.status_code == 403, res.text
    assert permission_of(method, path) in res.json()["detail"]
    after = snapshot(shared.db)
    # Only the token's last use is written.
    before.pop("api_tokens"), after.pop("api_tokens")
    assert after == before


# --- (c) a role that holds it -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "role"),
    ALLOWED,
    ids=[op_id(m, p, r) for m, p, r in ALLOWED],
)
def test_a_role_with_the_permission_is_let_through(
    site: Site, method: str, path: str, role: Role | None
) -> None:
    headers = site.bearer(role) if role is not None else {}
    res = call(site, site.client(), method, path, headers)
    assert res.status_code not in (401, 403), res.text
    if path.startswith("/api/auth/oidc/"):
        assert res.status_code == 404, res.text  # no provider configured here
        return
    assert res.status_code < 400, res.text  # a valid request: it did what it was asked


def test_the_stow_request_of_the_access_tests_stores_an_instance(site: Site) -> None:
    res = call(
        site, site.client(), "POST", "/dicomweb/studies/{study_uid}", site.bearer(Role.admin)
    )
    assert res.status_code == 200, res.text
    assert any(f.startswith("dicom") for f in site.files())


# --- (d) the reader is the signed-in account ----------------------------------------------


def claimed_by(db: Database, uid: str = STUDY_UID) -> str | None:
    with db.session() as s:
        return s.scalar(select(StudyRow.claimed_by).where(StudyRow.StudyInstanceUID == uid))


def test_a_forged_reader_in_a_claim_is_ignored(site: Site) -> None:
    client = site.client(headers=site.bearer(Role.radiologist))
    res = client.post(f"/api/studies/{STUDY_UID}/claim", json={"reader": "mallory"})
    assert res.status_code == 200 and res.json()["reader"] == "test-radiologist"
    assert claimed_by(site.db) == "test-radiologist"
    (item,) = client.get("/api/worklist").json()["items"]
    assert item["claimed_by"] == "test-radiologist"
    # Nor can the forged name release or complete another reader's claim.
    other = site.client(headers=site.bearer(Role.admin))
    body = {"reader": "test-radiologist"}
    assert other.post(f"/api/studies/{STUDY_UID}/release", json=body).status_code == 409
    assert other.post(f"/api/studies/{STUDY_UID}/complete", json=body).status_code == 409
    assert claimed_by(site.db) == "test-radiologist"


def test_a_forged_reader_in_next_is_ignored(site: Site) -> None:
    client = site.client(headers=site.bearer(Role.radiologist))
    res = client.post("/api/worklist/next", json={"reader": "mallory"})
    assert res.status_code == 200, res.text
    assert res.json()["StudyInstanceUID"] == STUDY_UID
    assert res.json()["claimed_by"] == "test-radiologist"
    assert claimed_by(site.db) == "test-radiologist"
    (item,) = client.get("/api/worklist").json()["items"]
    assert item["claimed_by"] == "test-radiologist"


# --- (e) the session cookie and CSRF; bad tokens beside a good cookie ---------------------


def cookie_client(site: Site, username: str = "test-admin") -> tuple[TestClient, str]:
    """A client signed in through the page's sign-in (a session cookie); its CSRF token."""
    set_password(site.db, username, PASSWORD)
    client = site.client()
    res = client.post("/api/auth/login", json={"username": username, "password": PASSWORD})
    assert res.status_code == 200, res.text
    return client, res.json()["csrf_token"]


@pytest.mark.parametrize(
    ("method", "path"), STATE_CHANGING, ids=[op_id(m, p) for m, p in STATE_CHANGING]
)
def test_a_cookie_signed_state_change_needs_the_csrf_token(
    site: Site, method: str, path: str
) -> None:
    client, csrf = cookie_client(site)
    before, files = snapshot(site.db), site.files()
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": ""}):
        res = call(site, client, method, path, headers)
        assert res.status_code == 403, (headers, res.text)
        assert "X-CSRF-Token" in res.json()["detail"]
    assert snapshot(site.db) == before and site.files() == files
    res = call(site, client, method, path, {"X-CSRF-Token": csrf})
    assert res.status_code not in (401, 403) and res.status_code < 400, res.text


@pytest.mark.parametrize(
    ("method", "path"), SIGNED_IN_SAFE, ids=[op_id(m, p) for m, p in SIGNED_IN_SAFE]
)
def test_a_cookie_signed_read_needs_no_csrf_token(site: Site, method: str, path: str) -> None:
    client, _csrf = cookie_client(site)
    res = call(site, client, method, path)
    assert res.status_code not in (401, 403) and res.status_code < 400, res.text


def bad_authorization(site: Site, kind: str) -> str:
    if kind == "unknown":
        return "Bearer trg_" + secrets.token_urlsafe(32)
    if kind == "garbage":
        return "Bearer not a token at all"
    if kind == "no-prefix":
        return "Bearer " + secrets.token_urlsafe(32)
    if kind == "basic":
        return "Basic dGVzdC1hZG1pbjpwYXNzd29yZA=="
    if kind == "empty-bearer":
        return "Bearer"
    if kind == "revoked":
        token, info = create_token(site.db, "test-radiologist", "revoked")
        revoke_token(site.db, info.id)
        return f"Bearer {token}"
    if kind == "expired":
        past = datetime.now(UTC) - timedelta(seconds=1)
        token, _info = create_token(site.db, "test-radiologist", "expired", expires_at=past)
        return f"Bearer {token}"
    if kind == "disabled":
        token = token_for(site.db, "gone", Role.radiologist)
        set_disabled(site.db, "gone", True)
        return f"Bearer {token}"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["unknown", "garbage", "no-prefix", "basic", "empty-bearer", "revoked", "expired", "disabled"],
)
def test_a_bad_bearer_token_is_401_even_beside_a_good_cookie(site: Site, kind: str) -> None:
    client, csrf = cookie_client(site)
    assert client.get("/api/worklist").status_code == 200  # the cookie alone works
    auth = {"Authorization": bad_authorization(site, kind), "X-CSRF-Token": csrf}
    res = client.get("/api/worklist", headers=auth)
    assert res.status_code == 401, res.text
    res = client.post(f"/api/studies/{STUDY_UID}/claim", json={}, headers=auth)
    assert res.status_code == 401, res.text
    assert claimed_by(site.db) is None
    assert client.get("/api/auth/me", headers=auth).status_code == 401


def test_a_disabled_accounts_session_ends(site: Site) -> None:
    client, _csrf = cookie_client(site, "reader")
    assert client.get("/api/worklist").status_code == 200
    set_disabled(site.db, "reader", True)
    assert client.get("/api/worklist").status_code == 401


# --- (f) integration accounts and patient data --------------------------------------------


def test_an_integration_token_reads_the_worklist_only_with_the_grant(site: Site) -> None:
    without = site.client(headers=site.bearer(Role.integration))
    assert without.get("/api/worklist").status_code == 403
    assert without.get(f"/api/studies/{STUDY_UID}").status_code == 403
    assert without.post(f"/api/studies/{STUDY_UID}/claim", json={}).status_code == 403
    assert without.post("/api/worklist/next", json={}).status_code == 403

    granted = token_for(site.db, "ris", Role.integration, grants=(Permission.view_patients,))
    client = site.client(headers={"Authorization": f"Bearer {granted}"})
    res = client.get("/api/worklist")
    assert res.status_code == 200
    (item,) = res.json()["items"]
    assert item["StudyInstanceUID"] == STUDY_UID and item["PatientName"] == PATIENT_NAME
    # The grant lets it read, not claim.
    assert client.post(f"/api/studies/{STUDY_UID}/claim", json={}).status_code == 403
    assert client.post("/api/worklist/next", json={}).status_code == 403
    assert claimed_by(site.db) is None

    # Taking the grant away takes the access away at the next request.
    set_grants(site.db, "ris", ())
    assert client.get("/api/worklist").status_code == 403
