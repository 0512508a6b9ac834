"""Accounts, tokens and the audit trail over HTTP, for admins: create, change role,
disable, grants, tokens shown once and revoked at once, the last admin kept, filters; and
a radiologist refused all of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.serve.test_access import PASSWORD, STUDY_UID, Site, make_site
from tests.signin import token_for
from triage.audit.chain import listing
from triage.auth.accounts import get_account
from triage.auth.roles import Role
from triage.db import Database


@pytest.fixture()
def site(db: Database, tmp_path: Path) -> Site:
    return make_site(db, tmp_path)


@pytest.fixture()
def admin(site: Site) -> TestClient:
    return site.client(headers=site.bearer(Role.admin))


def account(site: Site, username: str) -> dict[str, Any]:
    found = get_account(site.db, username)
    assert found is not None
    return found.as_dict()


# --- accounts -----------------------------------------------------------------------------


def test_admins_create_accounts(site: Site, admin: TestClient) -> None:
    body = {
        "username": "dr.who",
        "role": "radiologist",
        "password": PASSWORD,
        "display_name": "Dr Who",
    }
    res = admin.post("/api/accounts", json=body)
    assert res.status_code == 201, res.text
    doc = res.json()
    assert (doc["username"], doc["role"], doc["display_name"]) == (
        "dr.who",
        "radiologist",
        "Dr Who",
    )
    assert doc["has_password"] is True and doc["disabled"] is False and doc["source"] == "local"
    assert PASSWORD not in res.text and "hash" not in res.text
    # The new account signs in with its password.
    page = site.client()
    signed = page.post("/api/auth/login", json={"username": "dr.who", "password": PASSWORD})
    assert signed.status_code == 200 and signed.json()["role"] == "radiologist"
    listed = admin.get("/api/accounts").json()["accounts"]
    assert "dr.who" in {a["username"] for a in listed}
    assert all("password" not in a and "password_hash" not in a for a in listed)

    # A token-only account (no password), with grants.
    body = {"username": "pacs", "role": "integration", "grants": ["view_patients"]}
    res = admin.post("/api/accounts", json=body)
    assert res.status_code == 201, res.text
    assert res.json()["has_password"] is False and res.json()["grants"] == ["view_patients"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"username": "reader", "role": "radiologist"}, 409),  # taken
        ({"username": "short-pw", "role": "radiologist", "password": "too short"}, 400),
        ({"username": "bad name!", "role": "radiologist"}, 400),
        ({"username": "no-role", "role": "superuser"}, 422),
        ({"username": "bad-grant", "role": "integration", "grants": ["everything"]}, 422),
    ],
    ids=["taken", "short-password", "bad-name", "unknown-role", "unknown-grant"],
)
def test_account_creation_is_refused(
    site: Site, admin: TestClient, body: dict[str, Any], status: int
) -> None:
    before = admin.get("/api/accounts").json()
    res = admin.post("/api/accounts", json=body)
    assert res.status_code == status, res.text
    assert admin.get("/api/accounts").json() == before


def test_admins_change_roles_disable_and_enable(site: Site, admin: TestClient) -> None:
    res = admin.patch("/api/accounts/reader", json={"role": "integration"})
    assert res.status_code == 200 and res.json()["role"] == "integration"
    page = site.client()
    me = page.post("/api/auth/login", json={"username": "reader", "password": PASSWORD})
    assert me.json()["role"] == "integration"
    assert page.get("/api/worklist").status_code == 403  # the new role applies at once
    assert admin.patch("/api/accounts/reader", json={"role": "radiologist"}).status_code == 200
    assert page.get("/api/worklist").status_code == 200

    res = admin.patch("/api/accounts/reader", json={"disabled": True})
    assert res.status_code == 200 and res.json()["disabled"] is True
    assert page.get("/api/worklist").status_code == 401  # its session ends with it
    login = {"username": "reader", "password": PASSWORD}
    assert site.client().post("/api/auth/login", json=login).status_code == 403
    res = admin.patch("/api/accounts/reader", json={"disabled": False})
    assert res.status_code == 200 and res.json()["disabled"] is False
    assert site.client().post("/api/auth/login", json=login).status_code == 200


@pytest.mark.parametrize(
    "change",
    [{}, {"role": "admin", "disabled": True}, {"password": "too short"}, {"grants": ["nope"]}],
    ids=["none", "two", "short-password", "unknown-grant"],
)
def test_an_account_change_names_exactly_one_valid_thing(
    site: Site, admin: TestClient, change: dict[str, Any]
) -> None:
    before = account(site, "reader")
    res = admin.patch("/api/accounts/reader", json=change)
    assert res.status_code in (400, 422), res.text
    assert account(site, "reader") == before


def test_changing_an_unknown_account_is_404(admin: TestClient) -> None:
    assert admin.patch("/api/accounts/nobody", json={"disabled": True}).status_code == 404


@pytest.mark.parametrize(
    "change", [{"disabled": True}, {"role": "radiologist"}, {"role": "integration"}]
)
def test_the_last_enabled_admin_stays(
    site: Site, admin: TestClient, change: dict[str, Any]
) -> None:
    before = account(site, "test-admin")
    res = admin.patch("/api/accounts/test-admin", json=change)
    assert res.status_code == 409, res.text
    assert "last" in res.json()["detail"]
    assert account(site, "test-admin") == before
    assert admin.get("/api/accounts").status_code == 200  # still an admin

    # With a second enabled admin, the first may go.
    assert admin.patch("/api/accounts/spare", json={"role": "admin"}).status_code == 200
    assert admin.patch("/api/accounts/test-admin", json=change).status_code == 200
    # Now the other is the last enabled admin (a disabled or demoted one does not count).
    other = site.client(headers={"Authorization": f"Bearer {token_for(site.db, 'spare')}"})
    res = other.patch("/api/accounts/spare", json=change)
    assert res.status_code == 409, res.text
    assert account(site, "spare")["role"] == "admin" and not account(site, "spare")["disabled"]


def test_grants_are_set_and_replaced(site: Site, admin: TestClient) -> None:
    integration = site.client(headers=site.bearer(Role.integration))
    assert integration.get("/api/worklist").status_code == 403
    res = admin.patch("/api/accounts/test-integration", json={"grants": ["view_patients"]})
    assert res.status_code == 200 and res.json()["grants"] == ["view_patients"]
    assert integration.get("/api/worklist").status_code == 200
    me = integration.get("/api/auth/me").json()
    assert "view_patients" in me["permissions"] and me["role"] == "integration"
    res = admin.patch("/api/accounts/test-integration", json={"grants": []})
    assert res.status_code == 200 and res.json()["grants"] == []
    assert integration.get("/api/worklist").status_code == 403


# --- tokens -------------------------------------------------------------------------------


def test_a_new_token_works_at_once_and_is_listed_without_its_value(
    site: Site, admin: TestClient
) -> None:
    res = admin.post("/api/tokens", json={"username": "spare", "name": "ris feed", "days": 30})
    assert res.status_code == 201, res.text
    doc = res.json()
    token = doc["token"]
    assert token.startswith("trg_") and doc["prefix"] == token[:12]
    assert doc["username"] == "spare" and doc["expires_at"] and doc["revoked_at"] is None
    client = site.client(headers={"Authorization": f"Bearer {token}"})
    me = client.get("/api/auth/me")
    assert me.status_code == 200 and me.json()["username"] == "spare"

    for params in ({}, {"username": "spare"}):
        listed = admin.get("/api/tokens", params=params)
        assert listed.status_code == 200
        assert token not in listed.text
        items = listed.json()["tokens"]
        assert all("token" not in t and "token_sha256" not in t for t in items)
        (mine,) = [t for t in items if t["id"] == doc["id"]]
        assert mine["name"] == "ris feed" and mine["prefix"] == token[:12]
        assert mine["last_used_at"] is not None
    only = admin.get("/api/tokens", params={"username": "spare"}).json()["tokens"]
    assert {t["username"] for t in only} == {"spare"}


def test_a_revoked_token_stops_working_at_once(site: Site, admin: TestClient) -> None:
    doc = admin.post("/api/tokens", json={"username": "spare", "name": "short-lived"}).json()
    client = site.client(headers={"Authorization": f"Bearer {doc['token']}"})
    assert client.get("/api/auth/me").status_code == 200
    res = admin.delete(f"/api/tokens/{doc['id']}")
    assert res.status_code == 200 and res.json()["revoked_at"] is not None
    assert client.get("/api/auth/me").status_code == 401
    assert client.get("/api/worklist").status_code == 401
    listed = admin.get("/api/tokens", params={"username": "spare"}).json()["tokens"]
    assert next(t for t in listed if t["id"] == doc["id"])["revoked_at"] is not None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"username": "nobody", "name": "x"}, 404),
        ({"username": "spare", "name": "   "}, 400),
        ({"username": "spare", "name": "x", "days": 0}, 422),
    ],
    ids=["unknown-account", "blank-name", "zero-days"],
)
def test_token_creation_is_refused(admin: TestClient, body: dict[str, Any], status: int) -> None:
    def names() -> list[tuple[int, str, str]]:
        items = admin.get("/api/tokens").json()["tokens"]
        return [(t["id"], t["username"], t["name"]) for t in items]

    before = names()
    assert admin.post("/api/tokens", json=body).status_code == status
    assert names() == before


def test_revoking_an_unknown_token_is_404(admin: TestClient) -> None:
    assert admin.delete("/api/tokens/999999").status_code == 404


# --- a radiologist may do none of it ------------------------------------------------------


ADMIN_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/accounts", None),
    ("POST", "/api/accounts", {"username": "sneaky", "role": "admin", "password": PASSWORD}),
    ("PATCH", "/api/accounts/test-radiologist", {"role": "admin"}),
    ("PATCH", "/api/accounts/spare", {"disabled": True}),
    ("PATCH", "/api/accounts/test-radiologist", {"grants": ["manage_accounts"]}),
    ("PATCH", "/api/accounts/test-admin", {"password": "taken over, surely"}),
    ("GET", "/api/tokens", None),
    ("POST", "/api/tokens", {"username": "test-admin", "name": "stolen"}),
    ("DELETE", "/api/tokens/{token_id}", None),
    ("GET", "/api/audit", None),
    ("GET", "/api/audit/verify", None),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), ADMIN_CALLS, ids=[f"{m} {p}" for m, p, _ in ADMIN_CALLS]
)
def test_a_radiologist_gets_403(
    site: Site, method: str, path: str, body: dict[str, Any] | None
) -> None:
    client = site.client(headers=site.bearer(Role.radiologist))
    before_accounts = [account(site, u) for u in ("test-radiologist", "test-admin", "spare")]
    url = path.replace("{token_id}", str(site.token_id))
    res = client.request(method, url, json=body)
    assert res.status_code == 403, res.text
    assert [account(site, u) for u in ("test-radiologist", "test-admin", "spare")] == (
        before_accounts
    )
    admin = site.client(headers=site.bearer(Role.admin))
    tokens = admin.get("/api/tokens", params={"username": "spare"}).json()["tokens"]
    assert all(t["revoked_at"] is None for t in tokens)
    assert all(t["name"] != "stolen" for t in admin.get("/api/tokens").json()["tokens"])


# --- the audit listing --------------------------------------------------------------------


def test_the_audit_listing_filters_by_actor_action_and_target(
    site: Site, admin: TestClient
) -> None:
    reader = site.client(headers=site.bearer(Role.radiologist))
    assert reader.get(f"/api/studies/{STUDY_UID}").status_code == 200
    assert reader.post(f"/api/studies/{STUDY_UID}/claim", json={}).status_code == 200
    assert admin.get(f"/api/studies/{STUDY_UID}").status_code == 200
    assert admin.patch("/api/accounts/spare", json={"disabled": True}).status_code == 200

    def records(**params: Any) -> list[dict[str, Any]]:
        res = admin.get("/api/audit", params=params)
        assert res.status_code == 200, res.text
        return list(res.json()["records"])

    everything = records()
    ids = [r["id"] for r in everything]
    assert ids == sorted(ids, reverse=True)  # newest first
    mine = records(actor="test-radiologist")
    assert [r["action"] for r in mine] == ["claim", "study_view"]
    views = records(action="study_view")
    assert [r["actor"] for r in views] == ["test-admin", "test-radiologist"]
    on_study = records(target=STUDY_UID)
    assert {r["action"] for r in on_study} == {"study_view", "claim"} and len(on_study) == 3
    both = records(actor="test-radiologist", action="claim", target=STUDY_UID)
    assert len(both) == 1 and both[0]["outcome"] == "success"
    on_account = records(target="spare", action="account_disable")
    assert len(on_account) == 1 and on_account[0]["actor"] == "test-admin"
    assert records(actor="nobody") == []
    assert len(records(limit=2)) == 2
    # Every listing is itself recorded, with its filters.
    records(action="account_disable", target="spare")
    (newest,) = listing(site.db, limit=1)
    assert (newest["action"], newest["actor"]) == ("audit_list", "test-admin")
    assert newest["detail"] == {"action": "account_disable", "target": "spare"}
    assert admin.get("/api/audit", params={"limit": 0}).status_code == 422


@pytest.mark.parametrize("hours", [5, -5, 0])
def test_the_audit_listing_reads_since_and_until_in_any_utc_offset(
    site: Site, admin: TestClient, hours: int
) -> None:
    assert admin.get(f"/api/studies/{STUDY_UID}").status_code == 200
    offset = timezone(timedelta(hours=hours))
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).astimezone(offset).isoformat()
    in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).astimezone(offset).isoformat()

    def views(**params: str) -> int:
        res = admin.get("/api/audit", params={"action": "study_view", **params})
        assert res.status_code == 200, res.text
        return len(res.json()["records"])

    assert views(since=hour_ago) == 1
    assert views(until=hour_ago) == 0
    assert views(since=in_an_hour) == 0
    assert views(until=in_an_hour) == 1
