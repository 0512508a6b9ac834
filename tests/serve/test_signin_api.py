"""The page's sign-in over HTTP: the session cookie's attributes, who am I, sign-out, the
lockout, disabled accounts, idle and absolute expiry (time simulated through the session
functions' ``now=``, never slept), sessions ended by a password change, and the pages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.serve.test_access import PASSWORD, Site, make_site
from tests.signin import token_for
from triage.audit.chain import listing
from triage.auth.accounts import get_account, set_disabled, set_password
from triage.auth.roles import ROLE_PERMISSIONS, Role
from triage.auth.sessions import resolve_session, start_session
from triage.db import Database
from triage.db.tables import SessionRow
from triage.serve.app import create_app
from triage.serve.auth import SESSION_COOKIE, AuthConfig

LOGIN = {"username": "reader", "password": PASSWORD}


@pytest.fixture()
def site(db: Database, tmp_path: Path) -> Site:
    return make_site(db, tmp_path)


def set_cookie(res: httpx.Response) -> SimpleCookie:
    (header,) = res.headers.get_list("set-cookie")
    jar: SimpleCookie = SimpleCookie()
    jar.load(header)
    assert SESSION_COOKIE in jar, header
    return jar


def with_cookie(app: object, value: str, **kwargs: object) -> TestClient:
    client = TestClient(app, **kwargs)  # type: ignore[arg-type]
    client.cookies.set(SESSION_COOKIE, value)
    return client


def login(client: TestClient, body: dict[str, str] = LOGIN) -> httpx.Response:
    return client.post("/api/auth/login", json=body)


# --- the cookie -----------------------------------------------------------------------------


def test_the_session_cookie_is_httponly_lax_and_not_secure_over_http(site: Site) -> None:
    res = login(site.client())
    assert res.status_code == 200, res.text
    morsel = set_cookie(res)[SESSION_COOKIE]
    assert morsel.value and len(morsel.value) >= 40
    assert morsel["httponly"] is True
    assert morsel["samesite"].lower() == "lax"
    assert morsel["path"] == "/"
    assert not morsel["secure"]
    assert int(morsel["max-age"]) == int(AuthConfig().session_max_age.total_seconds())
    # The database keeps only the cookie's sha256.
    with site.db.session() as s:
        stored = s.scalars(select(SessionRow.token_sha256)).all()
    assert len(stored) == 1 and morsel.value not in stored


def test_the_session_cookie_is_secure_over_https(site: Site) -> None:
    client = site.client(base_url="https://testserver")
    res = login(client)
    assert res.status_code == 200, res.text
    morsel = set_cookie(res)[SESSION_COOKIE]
    assert morsel["secure"] is True and morsel["httponly"] is True
    assert morsel["samesite"].lower() == "lax" and morsel["path"] == "/"
    me = client.get("/api/auth/me")
    assert me.status_code == 200 and me.json()["username"] == "reader"
    out = client.post("/api/auth/logout", headers={"X-CSRF-Token": res.json()["csrf_token"]})
    assert out.status_code == 204
    assert set_cookie(out)[SESSION_COOKIE]["secure"] is True


def test_me_answers_who_and_what_with_the_csrf_token(site: Site) -> None:
    client = site.client()
    answer = login(client).json()
    permissions = sorted(p.value for p in ROLE_PERMISSIONS[Role.radiologist])
    assert answer["username"] == "reader" and answer["role"] == "radiologist"
    assert answer["permissions"] == permissions and answer["csrf_token"]
    me = client.get("/api/auth/me")
    assert me.status_code == 200
    doc = me.json()
    assert (doc["username"], doc["role"], doc["permissions"]) == (
        "reader",
        "radiologist",
        permissions,
    )
    assert doc["csrf_token"] == answer["csrf_token"]
    # A bearer token has no CSRF token (it is not sent by a browser on its own).
    by_token = site.client(headers=site.bearer(Role.integration)).get("/api/auth/me").json()
    assert by_token["username"] == "test-integration" and by_token["csrf_token"] is None
    assert site.client().get("/api/auth/me").status_code == 401


# --- sign-out -------------------------------------------------------------------------------


def test_logout_ends_the_session_and_clears_the_cookie(site: Site) -> None:
    client = site.client()
    res = login(client)
    value = set_cookie(res)[SESSION_COOKIE].value
    out = client.post("/api/auth/logout", headers={"X-CSRF-Token": res.json()["csrf_token"]})
    assert out.status_code == 204
    cleared = set_cookie(out)[SESSION_COOKIE]
    assert cleared.value in ("", '""') and cleared["path"] == "/"
    assert cleared["max-age"] == "0" or "1970" in cleared["expires"]
    assert SESSION_COOKIE not in client.cookies
    # The old cookie value no longer signs anyone in.
    old = with_cookie(site.app, value)
    assert old.get("/api/auth/me").status_code == 401
    assert old.get("/api/worklist").status_code == 401
    with site.db.session() as s:
        assert s.scalar(select(SessionRow.ended_at)) is not None


def test_logout_with_a_bearer_token_leaves_the_token_working(site: Site) -> None:
    client = site.client(headers=site.bearer(Role.radiologist))
    assert client.post("/api/auth/logout").status_code == 204
    assert client.get("/api/worklist").status_code == 200


# --- refused sign-ins -----------------------------------------------------------------------


def test_five_wrong_passwords_lock_the_account(site: Site) -> None:
    client = site.client()
    for _ in range(5):
        assert login(client, {**LOGIN, "password": "wrong password, again"}).status_code == 401
    res = login(client)
    assert res.status_code == 429, res.text
    assert int(res.headers["retry-after"]) > 0
    assert SESSION_COOKIE not in client.cookies
    newest = listing(site.db, limit=1)[0]
    assert (newest["action"], newest["outcome"]) == ("login", "failure")
    assert newest["detail"]["reason"] == "locked"


def test_a_disabled_account_with_the_right_password_is_403(site: Site) -> None:
    set_disabled(site.db, "reader", True)
    client = site.client()
    res = login(client)
    assert res.status_code == 403, res.text
    assert SESSION_COOKIE not in client.cookies
    assert login(client, {**LOGIN, "password": "wrong password, again"}).status_code == 401


def test_wrong_password_and_unknown_user_look_the_same(site: Site) -> None:
    client = site.client()
    wrong = login(client, {**LOGIN, "password": "wrong password, again"})
    unknown = login(client, {"username": "nobody-at-all", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()


# --- expiry ---------------------------------------------------------------------------------


def test_an_idle_session_ends(db: Database, tmp_path: Path) -> None:
    site = make_site(db, tmp_path)
    site.app = create_app(db, auth=AuthConfig(session_idle=timedelta(minutes=5)))
    account = get_account(db, "reader")
    assert account is not None
    now = datetime.now(UTC)
    stale, _ = start_session(db, account, now=now - timedelta(minutes=6))
    fresh, _ = start_session(db, account, now=now - timedelta(minutes=4))
    assert with_cookie(site.app, stale).get("/api/worklist").status_code == 401
    assert with_cookie(site.app, fresh).get("/api/worklist").status_code == 200
    # That request counted as use: the idle time starts again from it.
    idle = timedelta(minutes=5)
    later = datetime.now(UTC) + timedelta(minutes=4)
    assert resolve_session(db, fresh, now=later, idle=idle) is not None
    assert resolve_session(db, fresh, now=later + timedelta(minutes=6), idle=idle) is None
    # The page sends an idle browser to sign in again.
    page = with_cookie(site.app, stale).get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"


def test_a_session_ends_at_its_absolute_lifetime_however_busy(db: Database, tmp_path: Path) -> None:
    site = make_site(db, tmp_path)
    config = AuthConfig(session_idle=timedelta(minutes=30), session_max_age=timedelta(hours=1))
    site.app = create_app(db, auth=config)
    account = get_account(db, "reader")
    assert account is not None
    now = datetime.now(UTC)

    def busy_session(started_minutes_ago: int) -> str:
        """A session started then with ``max_age`` of the config, used every 15 minutes of
        its lifetime."""
        start = now - timedelta(minutes=started_minutes_ago)
        value, _ = start_session(db, account, now=start, max_age=config.session_max_age)
        for minutes in range(15, min(started_minutes_ago, 60), 15):
            at = start + timedelta(minutes=minutes)
            assert resolve_session(db, value, now=at, idle=config.session_idle) is not None
        return value

    expired = busy_session(70)  # last used 25 minutes ago (idle: 30), but started 70 ago
    alive = busy_session(50)
    assert with_cookie(site.app, expired).get("/api/worklist").status_code == 401
    assert with_cookie(site.app, alive).get("/api/worklist").status_code == 200


def test_the_configured_lifetime_governs_a_login(db: Database, tmp_path: Path) -> None:
    site = make_site(db, tmp_path)
    config = AuthConfig(session_idle=timedelta(hours=2), session_max_age=timedelta(hours=1))
    site.app = create_app(db, auth=config)
    before = datetime.now(UTC)
    res = login(TestClient(site.app))
    assert res.status_code == 200
    morsel = set_cookie(res)[SESSION_COOKIE]
    assert int(morsel["max-age"]) == 3600
    value = morsel.value
    inside = before + timedelta(minutes=59)
    assert resolve_session(db, value, now=inside, idle=config.session_idle) is not None
    past = datetime.now(UTC) + timedelta(hours=1, seconds=1)
    assert resolve_session(db, value, now=past, idle=config.session_idle) is None


# --- a password change --------------------------------------------------------------------


def test_a_password_change_ends_that_users_sessions(site: Site) -> None:
    first, second = site.client(), site.client()
    assert login(first).status_code == 200 and login(second).status_code == 200
    set_password(site.db, "test-admin", PASSWORD)
    bystander = site.client()
    assert login(bystander, {"username": "test-admin", "password": PASSWORD}).status_code == 200

    admin = site.client(headers=site.bearer(Role.admin))
    new_password = "a brand new long pass phrase"
    res = admin.patch("/api/accounts/reader", json={"password": new_password})
    assert res.status_code == 200, res.text
    assert first.get("/api/auth/me").status_code == 401
    assert second.get("/api/worklist").status_code == 401
    assert bystander.get("/api/auth/me").status_code == 200  # another account's session
    assert login(site.client()).status_code == 401
    assert login(site.client(), {**LOGIN, "password": new_password}).status_code == 200


def test_a_token_of_the_same_user_survives_a_password_change(site: Site) -> None:
    token = token_for(site.db, "reader", Role.radiologist)
    admin = site.client(headers=site.bearer(Role.admin))
    res = admin.patch("/api/accounts/reader", json={"password": "a brand new long pass phrase"})
    assert res.status_code == 200
    client = site.client(headers={"Authorization": f"Bearer {token}"})
    assert client.get("/api/worklist").status_code == 200


# --- the pages ----------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/", "/admin"])
def test_pages_send_a_browser_without_a_session_to_sign_in(site: Site, page: str) -> None:
    res = site.client().get(page, follow_redirects=False)
    assert res.status_code == 303 and res.headers["location"] == "/login"
    res = with_cookie(site.app, "not-a-session").get(page, follow_redirects=False)
    assert res.status_code == 303 and res.headers["location"] == "/login"
    # A bearer token is not a browser's session.
    res = site.client(headers=site.bearer(Role.admin)).get(page, follow_redirects=False)
    assert res.status_code == 303
    login_page = site.client().get("/login")
    assert login_page.status_code == 200 and "text/html" in login_page.headers["content-type"]


@pytest.mark.parametrize("page", ["/", "/admin"])
def test_pages_are_served_to_a_signed_in_browser(site: Site, page: str) -> None:
    client = site.client()
    value = set_cookie(login(client))[SESSION_COOKIE].value
    res = client.get(page, follow_redirects=False)
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/html") and "<html" in res.text.lower()
    csrf = client.get("/api/auth/me").json()["csrf_token"]
    assert client.post("/api/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert client.get(page, follow_redirects=False).status_code == 303
    assert with_cookie(site.app, value).get(page, follow_redirects=False).status_code == 303


def test_a_session_stays_ended_after_its_account_is_enabled_again(site: Site) -> None:
    client = site.client()
    assert login(client).status_code == 200
    admin = site.client(headers=site.bearer(Role.admin))
    assert admin.patch("/api/accounts/reader", json={"disabled": True}).status_code == 200
    assert client.get("/api/auth/me").status_code == 401
    assert admin.patch("/api/accounts/reader", json={"disabled": False}).status_code == 200
    assert client.get("/api/auth/me").status_code == 401
