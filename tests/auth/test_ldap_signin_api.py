"""Sign-in to the page through the hospital's directory: ``POST /api/auth/login`` against a
real OpenLDAP server (tests/auth/slapd.py), with the answers the page gets and the one
audit record each attempt writes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.auth.slapd import (
    ADMINS,
    ALICE_PASSWORD,
    EVE_PASSWORD,
    GROUPS,
    PEOPLE,
    RADIOLOGISTS,
    ROOT_USER_PASSWORD,
    SERVICE_DN,
    SERVICE_PASSWORD,
    Slapd,
    free_port,
    running_slapd,
    slapd_problem,
)
from triage.audit.chain import listing
from triage.auth.accounts import AccountSource, create_account, get_account
from triage.auth.ldap import LdapSettings
from triage.auth.roles import Role
from triage.db import Database
from triage.serve.app import create_app
from triage.serve.auth import SESSION_COOKIE, AuthConfig

LOCAL_PASSWORD = "a local account's long password"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    problem = slapd_problem()
    if problem:
        pytest.skip(f"no OpenLDAP server to test against: {problem}")
    yield from running_slapd(tmp_path_factory.mktemp("slapd"))


def settings_for(url: str) -> LdapSettings:
    return LdapSettings(
        url=url,
        user_base=PEOPLE,
        bind_dn=SERVICE_DN,
        bind_password=SERVICE_PASSWORD,
        group_base=GROUPS,
        group_roles={RADIOLOGISTS: Role.radiologist, ADMINS: Role.admin},
        timeout_seconds=5,
    )


def client_for(db: Database, url: str) -> TestClient:
    return TestClient(create_app(db, auth=AuthConfig(ldap=settings_for(url))))


@pytest.fixture()
def client(db: Database, slapd: Slapd) -> TestClient:
    return client_for(db, slapd.url)


def login(client: TestClient, username: str, password: str) -> Any:
    return client.post("/api/auth/login", json={"username": username, "password": password})


def the_one_record(db: Database, before: int) -> dict[str, Any]:
    new = [r for r in listing(db, limit=10_000) if r["id"] > before]
    assert len(new) == 1, new
    return new[0]


def last_id(db: Database) -> int:
    newest = listing(db, limit=1)
    return int(newest[0]["id"]) if newest else 0


def test_a_radiologist_of_the_directory_signs_in_and_reads_the_worklist(
    db: Database, client: TestClient
) -> None:
    res = login(client, "alice", ALICE_PASSWORD)
    assert res.status_code == 200, res.text
    doc = res.json()
    assert (doc["username"], doc["role"]) == ("alice", "radiologist")
    assert doc["display_name"] == "Alice Liddell" and doc["csrf_token"]
    assert SESSION_COOKIE in client.cookies
    assert client.get("/api/worklist").status_code == 200  # with the cookie
    assert client.get("/api/auth/me").json()["username"] == "alice"
    assert client.get("/api/accounts").status_code == 403  # a radiologist, not an admin
    account = get_account(db, "alice")
    assert account is not None and account.source == AccountSource.ldap
    assert not account.has_password  # the directory's password is never kept
    (record,) = listing(db, limit=1)
    assert (record["action"], record["outcome"], record["actor"]) == ("login", "success", "alice")
    assert record["actor_role"] == "radiologist" and record["detail"] == {"method": "ldap"}


def test_an_admin_of_the_directory_gets_the_admin_role(client: TestClient) -> None:
    res = login(client, "root", ROOT_USER_PASSWORD)
    assert res.status_code == 200 and res.json()["role"] == "admin"
    assert client.get("/api/accounts").status_code == 200


def test_a_wrong_password_is_401_with_one_failure_record(db: Database, client: TestClient) -> None:
    before = last_id(db)
    res = login(client, "alice", "not alice's password")
    assert res.status_code == 401, res.text
    assert SESSION_COOKIE not in client.cookies
    record = the_one_record(db, before)
    assert (record["action"], record["outcome"]) == ("login", "failure")
    assert record["actor"] == "alice" and record["target"] == "alice"
    assert record["detail"]["method"] == "ldap"
    assert record["detail"]["reason"] == "bad_credentials"
    assert "not alice's password" not in str(record)
    # An unknown user is the same answer.
    before = last_id(db)
    assert login(client, "nobody-in-the-directory", ALICE_PASSWORD).status_code == 401
    assert the_one_record(db, before)["detail"]["method"] == "ldap"


def test_a_user_in_no_mapped_group_is_403(db: Database, client: TestClient) -> None:
    before = last_id(db)
    res = login(client, "eve", EVE_PASSWORD)
    assert res.status_code == 403, res.text
    assert SESSION_COOKIE not in client.cookies
    record = the_one_record(db, before)
    assert record["outcome"] == "failure" and record["detail"] == {
        "method": "ldap",
        "reason": "no_role",
    }


def test_an_unreachable_directory_is_503(db: Database) -> None:
    client = client_for(db, f"ldap://127.0.0.1:{free_port()}")  # nothing listens there
    before = last_id(db)
    res = login(client, "alice", ALICE_PASSWORD)
    assert res.status_code == 503, res.text
    assert SESSION_COOKIE not in client.cookies
    record = the_one_record(db, before)
    assert record["outcome"] == "failure"
    assert record["detail"] == {"method": "ldap", "reason": "directory_unavailable"}


def test_local_accounts_still_sign_in_with_their_own_password(
    db: Database, client: TestClient
) -> None:
    create_account(db, "localadmin", Role.admin, password=LOCAL_PASSWORD)
    res = login(client, "localadmin", LOCAL_PASSWORD)
    assert res.status_code == 200 and res.json()["role"] == "admin"
    assert listing(db, limit=1)[0]["detail"] == {"method": "password"}
    # A local account of a directory user's name is not the directory's: the directory's
    # password does not sign it in.
    create_account(db, "alice", Role.radiologist, password=LOCAL_PASSWORD)
    assert login(client, "alice", ALICE_PASSWORD).status_code == 401
    assert listing(db, limit=1)[0]["detail"]["method"] == "password"
    account = get_account(db, "alice")
    assert account is not None and account.source == AccountSource.local
