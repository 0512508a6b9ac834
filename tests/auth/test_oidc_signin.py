"""Single sign-on through a real OpenID Connect provider (Debian's LemonLDAP::NG portal,
started by the test) into the product's routes: ``/api/auth/oidc/start`` and
``/api/auth/oidc/callback``, the session that follows, the audit record of each attempt.

The browser is played by two HTTP clients with cookie jars: the product's (a TestClient on
http://testserver) and the provider's (httpx on the portal), so each redirect is followed
by hand and checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.auth.llng import OidcProvider, login_form, running_llng
from triage.audit.chain import listing
from triage.auth.accounts import AccountSource, create_account, get_account, set_disabled
from triage.auth.oidc import OidcSettings, Provider
from triage.auth.roles import Role
from triage.db import Database
from triage.serve.app import create_app
from triage.serve.auth import SESSION_COOKIE, AuthConfig

CALLBACK = "http://testserver/api/auth/oidc/callback"
GROUP_ROLES = {"radiologists": Role.radiologist, "admins": Role.admin}


@pytest.fixture(scope="module")
def llng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    yield from running_llng(tmp_path_factory.mktemp("llng"), [CALLBACK])


@dataclass
class Site:
    db: Database
    app: object
    provider: OidcProvider

    def browser(self) -> TestClient:
        return TestClient(self.app, follow_redirects=False)  # type: ignore[arg-type]


def make_site(tmp_path: Path, llng: OidcProvider, **overrides: object) -> Site:
    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    settings = OidcSettings(
        issuer=llng.issuer,
        client_id=llng.client_id,
        client_secret=llng.client_secret,
        group_roles=GROUP_ROLES,
        scopes=tuple(llng.scopes),
        display_name="Hospital SSO",
        **overrides,  # type: ignore[arg-type]
    )
    app = create_app(db, auth=AuthConfig(oidc=Provider(settings)))
    return Site(db, app, llng)


@pytest.fixture()
def site(tmp_path: Path, llng: OidcProvider) -> Site:
    return make_site(tmp_path, llng)


def at_provider(location: str, username: str, password: str) -> httpx.Response:
    """The browser at the provider: the authorization URL, the login form filled and posted;
    returns the provider's last answer (a redirect back, or the form again)."""
    with httpx.Client(follow_redirects=False, timeout=30) as browser:
        page = browser.get(location)
        assert page.status_code == 200, page.text[:2000]
        form = login_form(page)
        form.fields.update(user=username, password=password)
        return browser.post(form.action, data=form.fields)


def sign_in(site: Site, browser: TestClient, username: str, password: str) -> httpx.Response:
    """Start at the product, sign in at the provider, come back: the callback's answer."""
    start = browser.get("/api/auth/oidc/start", params={"next": "/#study=1.2.3"})
    assert start.status_code == 303, start.text
    back = at_provider(start.headers["location"], username, password)
    assert back.is_redirect, back.text[:2000]
    location = back.headers["location"]
    assert location.startswith(CALLBACK + "?"), location
    return browser.get(location.removeprefix("http://testserver"))


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def test_the_login_page_offers_the_provider(site: Site) -> None:
    methods = site.browser().get("/api/auth/methods").json()
    assert methods["oidc"] == {"name": "Hospital SSO", "start": "/api/auth/oidc/start"}


def test_start_sends_the_browser_to_the_provider_with_pkce_and_a_state_cookie(site: Site) -> None:
    browser = site.browser()
    start = browser.get("/api/auth/oidc/start")
    assert start.status_code == 303
    location = start.headers["location"]
    assert location.startswith(site.provider.issuer)
    query = query_of(location)
    assert query["response_type"] == "code"
    assert query["client_id"] == site.provider.client_id
    assert query["redirect_uri"] == CALLBACK
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["state"] and query["nonce"] and query["state"] != query["nonce"]
    cookie = start.headers["set-cookie"]
    assert "triage_oidc_state=" + query["state"] in cookie
    assert "HttpOnly" in cookie and "Path=/api/auth/oidc" in cookie
    assert "samesite=lax" in cookie.lower()


def test_a_radiologist_signs_in_and_reads_the_worklist(site: Site) -> None:
    browser = site.browser()
    done = sign_in(site, browser, "dwho", "dwho")
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/#study=1.2.3"  # back where the sign-in started
    assert browser.cookies.get(SESSION_COOKIE)
    me = browser.get("/api/auth/me").json()
    assert me["username"] == "dwho" and me["role"] == "radiologist"
    assert browser.get("/api/worklist").status_code == 200
    account = get_account(site.db, "dwho")
    assert account is not None and account.source == AccountSource.oidc
    assert not account.has_password
    record = listing(site.db, action="login", limit=1)[0]
    assert (record["actor"], record["outcome"], record["detail"]) == (
        "dwho",
        "success",
        {"method": "oidc"},
    )


def test_a_user_in_the_admins_group_is_an_admin(site: Site) -> None:
    browser = site.browser()
    assert sign_in(site, browser, "rtyler", "rtyler").status_code == 303
    assert browser.get("/api/auth/me").json()["role"] == "admin"
    assert browser.get("/api/accounts").status_code == 200


def test_a_user_in_no_mapped_group_is_refused_and_recorded(site: Site) -> None:
    browser = site.browser()
    done = sign_in(site, browser, "msmith", "msmith")
    assert done.status_code == 303
    assert done.headers["location"] == "/login?error=no_role"
    assert not browser.cookies.get(SESSION_COOKIE)
    assert get_account(site.db, "msmith") is None
    records = listing(site.db, action="login")
    assert len(records) == 1
    assert (records[0]["actor"], records[0]["outcome"]) == ("msmith", "failure")
    assert records[0]["detail"] == {"method": "oidc", "reason": "no_role"}


def test_a_wrong_password_at_the_provider_never_comes_back_with_a_code(site: Site) -> None:
    start = site.browser().get("/api/auth/oidc/start")
    answer = at_provider(start.headers["location"], "dwho", "not-his-password")
    assert not answer.is_redirect  # the provider's form again


def test_another_browser_cannot_finish_the_sign_in(site: Site) -> None:
    """Login CSRF: the provider's answer replayed in a browser that did not start it."""
    starter = site.browser()
    start = starter.get("/api/auth/oidc/start")
    back = at_provider(start.headers["location"], "dwho", "dwho")
    victim = site.browser()
    done = victim.get(back.headers["location"].removeprefix("http://testserver"))
    assert done.headers["location"] == "/login?error=bad_state"
    assert not victim.cookies.get(SESSION_COOKIE)


def test_an_answer_is_used_once(site: Site) -> None:
    browser = site.browser()
    start = browser.get("/api/auth/oidc/start")
    back = at_provider(start.headers["location"], "dwho", "dwho")
    callback = back.headers["location"].removeprefix("http://testserver")
    state_cookie = browser.cookies.get("triage_oidc_state")
    assert browser.get(callback).status_code == 303
    replay = site.browser()
    replay.cookies.set("triage_oidc_state", state_cookie or "")
    again = replay.get(callback)
    assert again.headers["location"] == "/login?error=bad_state"
    assert not replay.cookies.get(SESSION_COOKIE)


def test_the_provider_refusing_comes_back_as_a_message(site: Site) -> None:
    browser = site.browser()
    start = browser.get("/api/auth/oidc/start")
    state = query_of(start.headers["location"])["state"]
    done = browser.get("/api/auth/oidc/callback", params={"state": state, "error": "access_denied"})
    assert done.headers["location"] == "/login?error=provider_error"


def test_a_local_account_of_the_same_name_is_not_taken_over(site: Site) -> None:
    create_account(site.db, "dwho", Role.admin, password="a long local passphrase")
    browser = site.browser()
    done = sign_in(site, browser, "dwho", "dwho")
    assert done.headers["location"] == "/login?error=taken"
    account = get_account(site.db, "dwho")
    assert account is not None and account.source == AccountSource.local
    assert account.role == Role.admin


def test_a_disabled_account_stays_out(site: Site) -> None:
    assert sign_in(site, site.browser(), "dwho", "dwho").status_code == 303
    create_account(site.db, "keeper", Role.admin)  # the last-admin rule needs another admin
    set_disabled(site.db, "dwho", True)
    browser = site.browser()
    done = sign_in(site, browser, "dwho", "dwho")
    assert done.headers["location"] == "/login?error=disabled"
    assert not browser.cookies.get(SESSION_COOKIE)


def test_an_unreachable_provider_is_one_message(tmp_path: Path) -> None:
    from tests.auth.llng import free_port

    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    settings = OidcSettings(
        issuer=f"http://127.0.0.1:{free_port()}",
        client_id="triage",
        client_secret="x",
        group_roles=GROUP_ROLES,
        timeout_seconds=2,
    )
    app = create_app(db, auth=AuthConfig(oidc=Provider(settings)))
    start = TestClient(app, follow_redirects=False).get("/api/auth/oidc/start")
    assert start.status_code == 303
    assert start.headers["location"] == "/login?error=provider_unavailable"


def test_without_a_provider_the_routes_are_404(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    client = TestClient(create_app(db), follow_redirects=False)
    assert client.get("/api/auth/oidc/start").status_code == 404
    assert client.get("/api/auth/methods").json()["oidc"] is None
