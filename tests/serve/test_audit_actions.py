"""Every audited action over HTTP writes exactly one record (who, what, outcome, target,
from where); the chain then verifies, and tampering with it directly in the database is
found and named, also by ``GET /api/audit/verify``. No record holds a patient's name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, update

from tests.serve.test_access import (
    ACCESSION,
    FINDING,
    PASSWORD,
    PATIENT_ID,
    PATIENT_NAME,
    STUDY_UID,
    Site,
    make_site,
    seed_study,
)
from triage.audit.chain import listing, verify
from triage.auth.accounts import set_disabled
from triage.auth.roles import Role
from triage.db import Database
from triage.db.tables import AuditRow

SOURCE = "testclient"  # the client address of Starlette's TestClient
OTHER_UID = "1.2.826.0.1.3680043.10.543.7002"


@pytest.fixture()
def site(db: Database, tmp_path: Path) -> Site:
    return make_site(db, tmp_path)


def last_id(db: Database) -> int:
    newest = listing(db, limit=1)
    return int(newest[0]["id"]) if newest else 0


def records_after(db: Database, after: int) -> list[dict[str, Any]]:
    return sorted((r for r in listing(db, limit=10_000) if r["id"] > after), key=lambda r: r["id"])


def only_new_record(
    db: Database,
    after: int,
    *,
    actor: str | None,
    action: str,
    outcome: str = "success",
    actor_role: str | None = None,
    target_kind: str | None = None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one record written since ``after``, checked field by field (``detail``: these
    keys at least)."""
    new = records_after(db, after)
    assert len(new) == 1, new
    (record,) = new
    expected = {
        "actor": actor,
        "action": action,
        "outcome": outcome,
        "actor_role": actor_role,
        "target_kind": target_kind,
        "target": target,
        "source_address": SOURCE,
    }
    assert {k: record[k] for k in expected} == expected, record
    for key, value in (detail or {}).items():
        assert record["detail"].get(key) == value, record
    return record


class Recorder:
    """Does an HTTP call and checks it wrote exactly the one record described."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def __call__(self, do: Callable[[], Any], status: int, **record: Any) -> dict[str, Any]:
        before = last_id(self.site.db)
        res = do()
        assert res.status_code == status, res.text
        return only_new_record(self.site.db, before, **record)


# --- sign-in ------------------------------------------------------------------------------


def test_sign_in_and_sign_out_each_write_one_record(site: Site) -> None:
    record = Recorder(site)
    client = site.client()

    def login(username: str, password: str) -> Callable[[], Any]:
        return lambda: client.post(
            "/api/auth/login", json={"username": username, "password": password}
        )

    account = {"target_kind": "account"}
    ok = record(
        login("reader", PASSWORD),
        200,
        actor="reader",
        actor_role="radiologist",
        action="login",
        target="reader",
        detail={"method": "password"},
        **account,
    )
    assert "reason" not in ok["detail"]
    csrf = client.get("/api/auth/me").json()["csrf_token"]
    record(
        login("reader", "not the password at all"),
        401,
        actor="reader",
        action="login",
        outcome="failure",
        target="reader",
        detail={"method": "password", "reason": "bad_credentials"},
        **account,
    )
    record(
        login("nobody-here", PASSWORD),
        401,
        actor="nobody-here",
        action="login",
        outcome="failure",
        target="nobody-here",
        detail={"method": "password", "reason": "bad_credentials"},
        **account,
    )
    record(
        lambda: client.post("/api/auth/logout", headers={"X-CSRF-Token": csrf}),
        204,
        actor="reader",
        actor_role="radiologist",
        action="logout",
        target="reader",
        **account,
    )
    set_disabled(site.db, "reader", True)
    record(
        login("reader", PASSWORD),
        403,
        actor="reader",
        action="login",
        outcome="failure",
        target="reader",
        detail={"method": "password", "reason": "disabled"},
        **account,
    )
    for rec in listing(site.db):
        assert PASSWORD not in json.dumps(rec) and "not the password" not in json.dumps(rec)


# --- the reading workflow -----------------------------------------------------------------


def test_study_views_claims_and_acknowledgements_each_write_one_record(site: Site) -> None:
    seed_study(site.db, OTHER_UID, accession="ACC-2", minutes_ago=1, finding=None)
    record = Recorder(site)
    client = site.client(headers=site.bearer(Role.radiologist))
    other = site.client(headers=site.bearer(Role.admin))
    me = {"actor": "test-radiologist", "actor_role": "radiologist", "target_kind": "study"}
    url = f"/api/studies/{STUDY_UID}"

    record(lambda: client.get(url), 200, action="study_view", target=STUDY_UID, **me)
    for action in ("claim", "renew", "release", "claim"):
        record(
            lambda a=action: client.post(f"{url}/{a}", json={}),
            200,
            action=action,
            target=STUDY_UID,
            **me,
        )
    # Another reader's claim of it is refused: one failure record, naming the reason.
    refused = record(
        lambda: other.post(f"{url}/claim", json={}),
        409,
        actor="test-admin",
        actor_role="admin",
        action="claim",
        outcome="failure",
        target_kind="study",
        target=STUDY_UID,
    )
    assert "test-radiologist" in refused["detail"]["reason"]
    record(
        lambda: client.post(f"{url}/complete", json={}),
        200,
        action="complete",
        target=STUDY_UID,
        **me,
    )
    refused = record(
        lambda: client.post(f"{url}/complete", json={}),
        409,
        action="complete",
        outcome="failure",
        target=STUDY_UID,
        **me,
    )
    assert refused["detail"]["reason"]
    record(
        lambda: client.post("/api/worklist/next", json={}),
        200,
        action="claim",
        target=OTHER_UID,
        detail={"next": True},
        **me,
    )
    record(
        lambda: client.post(f"{url}/acknowledge", json={"finding": FINDING}),
        200,
        action="acknowledge",
        target=STUDY_UID,
        detail={"finding": FINDING},
        **me,
    )
    # Nothing to claim: nothing happened, nothing is recorded.
    before = last_id(site.db)
    assert client.post("/api/worklist/next", json={}).status_code == 204
    assert records_after(site.db, before) == []


def test_the_acknowledgement_answer_names_its_record(site: Site) -> None:
    client = site.client(headers=site.bearer(Role.radiologist))
    res = client.post(f"/api/studies/{STUDY_UID}/acknowledge", json={"finding": FINDING})
    assert res.status_code == 200
    assert res.json()["acknowledged_by"] == "test-radiologist"
    assert res.json()["audit_record"] == last_id(site.db)


# --- administration -----------------------------------------------------------------------


def test_account_token_and_audit_actions_each_write_one_record(site: Site) -> None:
    record = Recorder(site)
    admin = site.client(headers=site.bearer(Role.admin))
    me = {"actor": "test-admin", "actor_role": "admin"}
    acct = {**me, "target_kind": "account", "target": "newcomer"}

    record(
        lambda: admin.post(
            "/api/accounts",
            json={"username": "newcomer", "role": "radiologist", "password": PASSWORD},
        ),
        201,
        action="account_create",
        detail={"role": "radiologist", "grants": []},
        **acct,
    )

    def patch(change: dict[str, Any]) -> Callable[[], Any]:
        return lambda: admin.patch("/api/accounts/newcomer", json=change)

    record(patch({"role": "admin"}), 200, action="account_role", detail={"role": "admin"}, **acct)
    record(patch({"disabled": True}), 200, action="account_disable", **acct)
    record(patch({"disabled": False}), 200, action="account_enable", **acct)
    new_password = "another long pass phrase"
    record(
        patch({"password": new_password}),
        200,
        action="account_password",
        **acct,
    )
    record(
        patch({"grants": ["view_quarantine"]}),
        200,
        action="account_grants",
        detail={"grants": ["view_quarantine"]},
        **acct,
    )

    created: dict[str, Any] = {}

    def create_token() -> Any:
        res = admin.post("/api/tokens", json={"username": "newcomer", "name": "pacs"})
        created.update(res.json())
        return res

    before = last_id(site.db)
    assert create_token().status_code == 201
    only_new_record(
        site.db,
        before,
        action="token_create",
        target_kind="token",
        target=str(created["id"]),
        detail={"account": "newcomer", "name": "pacs"},
        **me,
    )
    record(
        lambda: admin.delete(f"/api/tokens/{created['id']}"),
        200,
        action="token_revoke",
        target_kind="token",
        target=str(created["id"]),
        detail={"account": "newcomer"},
        **me,
    )
    record(
        lambda: admin.get("/api/audit", params={"action": "login"}),
        200,
        action="audit_list",
        target_kind="audit",
        detail={"action": "login"},
        **me,
    )
    verified = record(
        lambda: admin.get("/api/audit/verify"),
        200,
        action="audit_verify",
        target_kind="audit",
        detail={"first_bad_id": None},
        **me,
    )
    assert verified["detail"]["checked"] == verified["id"] - 1
    text = json.dumps(listing(site.db))
    assert created["token"] not in text and PASSWORD not in text and new_password not in text


# --- the chain over all of this -----------------------------------------------------------


def every_audited_action(site: Site) -> None:
    """One of each audited action, over HTTP."""
    seed_study(site.db, OTHER_UID, accession="ACC-2", minutes_ago=1, finding=None)
    page = site.client()
    login = {"username": "reader", "password": PASSWORD}
    assert (
        page.post("/api/auth/login", json={**login, "password": "wrong password!"}).status_code
        == 401
    )
    assert page.post("/api/auth/login", json={**login, "username": "ghost"}).status_code == 401
    csrf = page.post("/api/auth/login", json=login).json()["csrf_token"]
    reader = site.client(headers=site.bearer(Role.radiologist))
    url = f"/api/studies/{STUDY_UID}"
    assert reader.get(url).status_code == 200
    for action in ("claim", "renew", "release", "claim", "complete"):
        assert reader.post(f"{url}/{action}", json={}).status_code == 200
    assert reader.post(f"{url}/complete", json={}).status_code == 409
    assert reader.post("/api/worklist/next", json={}).status_code == 200
    assert reader.post(f"{url}/acknowledge", json={"finding": FINDING}).status_code == 200
    admin = site.client(headers=site.bearer(Role.admin))
    body = {"username": "newcomer", "role": "radiologist"}
    assert admin.post("/api/accounts", json=body).status_code == 201
    for change in ({"role": "admin"}, {"disabled": True}, {"grants": ["view_quarantine"]}):
        assert admin.patch("/api/accounts/newcomer", json=change).status_code == 200
    token = admin.post("/api/tokens", json={"username": "spare", "name": "x"}).json()
    assert admin.delete(f"/api/tokens/{token['id']}").status_code == 200
    assert admin.get("/api/audit").status_code == 200
    assert admin.get("/api/audit/verify").status_code == 200
    assert page.post("/api/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204


def test_the_chain_verifies_after_every_kind_of_action(site: Site) -> None:
    every_audited_action(site)
    actions = {r["action"] for r in listing(site.db, limit=10_000)}
    assert actions == {
        "login",
        "logout",
        "study_view",
        "claim",
        "renew",
        "release",
        "complete",
        "acknowledge",
        "account_create",
        "account_role",
        "account_disable",
        "account_grants",
        "token_create",
        "token_revoke",
        "audit_list",
        "audit_verify",
    }
    result = verify(site.db)
    assert result.ok and result.checked == last_id(site.db) >= 20, result


def _alter(db: Database, n: int) -> int:
    with db.engine.begin() as conn:
        conn.execute(update(AuditRow).where(AuditRow.id == n).values(actor="someone-else"))
    return n


def _delete(db: Database, n: int) -> int:
    with db.engine.begin() as conn:
        conn.execute(delete(AuditRow).where(AuditRow.id == n))
    return n + 1  # the record after the gap is the first that no longer fits


def _swap(db: Database, n: int) -> int:
    """Swap the contents of records n and n+1 (their ids stay in place)."""
    columns = [c for c in AuditRow.__table__.columns if c.name != "id"]
    with db.engine.begin() as conn:
        rows = {r.id: r for r in conn.execute(select(AuditRow).where(AuditRow.id.in_([n, n + 1])))}
        for a, b in ((n, n + 1), (n + 1, n)):
            values = {c.name: getattr(rows[b], c.name) for c in columns}
            conn.execute(update(AuditRow).where(AuditRow.id == a).values(**values))
    return n


@pytest.mark.parametrize("tamper", [_alter, _delete, _swap], ids=["altered", "deleted", "swapped"])
def test_tampering_is_found_and_named(site: Site, tamper: Callable[[Database, int], int]) -> None:
    every_audited_action(site)
    n = last_id(site.db) // 2
    first_bad = tamper(site.db, n)
    result = verify(site.db)
    assert not result.ok and result.first_bad_id == first_bad, result
    assert result.problem and str(first_bad) in result.problem

    admin = site.client(headers=site.bearer(Role.admin))
    res = admin.get("/api/audit/verify")
    assert res.status_code == 409, res.text
    doc = res.json()
    assert doc["ok"] is False and doc["first_bad_id"] == first_bad
    assert str(first_bad) in doc["problem"]
    # The failed check is itself recorded (and the chain still names the same record).
    (newest,) = listing(site.db, limit=1)
    assert (newest["action"], newest["outcome"]) == ("audit_verify", "failure")
    assert newest["detail"]["first_bad_id"] == first_bad
    assert verify(site.db).first_bad_id == first_bad


def test_no_record_holds_a_patient_name(site: Site) -> None:
    every_audited_action(site)
    with site.db.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(AuditRow))]
    assert len(rows) >= 20
    text = json.dumps(rows, default=str) + json.dumps(listing(site.db, limit=10_000))
    for secret in (PATIENT_NAME, *PATIENT_NAME.split("^"), PATIENT_ID, ACCESSION):
        assert secret.lower() not in text.lower(), secret
    # The study is named by its UID, which is what the records are for.
    assert STUDY_UID in text


def test_records_name_the_client_address(site: Site) -> None:
    client = TestClient(site.app, client=("10.1.2.3", 4567))
    client.headers.update(site.bearer(Role.radiologist))
    before = last_id(site.db)
    assert client.get(f"/api/studies/{STUDY_UID}").status_code == 200
    (rec,) = records_after(site.db, before)
    assert rec["source_address"] == "10.1.2.3"
