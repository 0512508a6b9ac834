"""Signing in through the real page, in headless Chromium against a running ``triage serve``.

A radiologist with a local password opens the page, is sent to the sign-in form, signs in,
sees the worklist under their own name, claims studies with the page's buttons (the server
records them as the reader, whatever the page could send) and signs out, after which the
old session cookie opens nothing. The cookie's flags are read from the browser itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import running_server
from tests.e2e.browser import Browser
from tests.e2e.test_page_findings_e2e import (
    BLAST,
    CT_REASON,
    add,
    haemorrhage,
    labels_overlay,
    route,
)
from tests.serve.test_access import seed_dicom_result
from triage.auth.accounts import create_account
from triage.auth.roles import Role
from triage.db import Database
from triage.serve.auth import SESSION_COOKIE
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

URGENT = "1.2.826.0.1.3680043.8.498.7201"  # flagged haemorrhage: first in reading order
ROUTINE = "1.2.826.0.1.3680043.8.498.7202"  # nothing flagged
READER = "ajones"
DISPLAY_NAME = "Dr Ann Jones"
PASSWORD = "correct horse battery staple"
EVENT_STREAM = "*/api/events*"
VIEWER = "https://pacs.example.org/viewer?StudyInstanceUIDs="


def seed(server: ServerProcess) -> None:
    """Two studies as the analysis leaves them, and the radiologist's account."""
    db = Database(server.database_url)
    results = server.data_dir / "results"
    try:
        add(
            db,
            results,
            URGENT,
            description="CT HEAD (fall)",
            minutes_ago=4,
            ai_status="ok",
            series=[("CT", "Head axial 2.5 mm")],
            routing={"models": [route(BLAST, URGENT + ".1", CT_REASON, status="ok")]},
            findings=[
                haemorrhage(True, {"IPH": 28.4, "EAH": 3.1, "oedema": 9.8, "IVH": 4.6}, 0.97)
            ],
            overlays={"intracranial_haemorrhage": labels_overlay(URGENT + ".1")},
        )
        add(
            db,
            results,
            ROUTINE,
            description="CT HEAD (headache)",
            minutes_ago=30,
            ai_status="ok",
            series=[("CT", "Head axial 2.5 mm")],
            routing={"models": [route(BLAST, ROUTINE + ".1", CT_REASON, status="ok")]},
            findings=[
                haemorrhage(False, {"IPH": 0.1, "EAH": 0.0, "oedema": 0.4, "IVH": 0.0}, 0.03)
            ],
            overlays={},
        )
        create_account(db, READER, Role.radiologist, password=PASSWORD, display_name=DISPLAY_NAME)
        seed_dicom_result(db, results, URGENT)  # an SR waiting for an unconfigured PACS
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("triage-signin")
    env = {
        "TRIAGE_SERIES_QUIET_SECONDS": "3600",
        "TRIAGE_VIEWER_URL_TEMPLATE": VIEWER + "{StudyInstanceUID}",
    }
    with running_server(data_dir, env) as srv:
        seed(srv)
        yield srv


def signed_in_browser(profile: Path, *flags: str) -> Browser:
    """A browser for the page after sign-in. The sign-in form goes to ``/``, whose event
    stream is a fetch that never ends, and virtual time stands still while a fetch is
    pending: the browser refuses the stream, and the page polls (as when the stream is
    down)."""
    browser = Browser(profile, *flags).start()
    try:
        browser.block(EVENT_STREAM)
    except BaseException:
        browser.close()
        raise
    return browser


def sign_in_with_the_form(browser: Browser, base: str, username: str, password: str) -> None:
    """Open the page, land on the sign-in form, fill it in and submit it."""
    browser.navigate(f"{base}/")
    assert browser.url() == f"{base}/login", browser.dom()[:2000]
    browser.type("#username", username)
    browser.type("#password", password)


def study(server: ServerProcess, uid: str) -> dict[str, Any]:
    """The study document, as the admin reads it over the API."""
    answer = httpx.get(f"{server.http_url}/api/studies/{uid}", headers=server.headers, timeout=30)
    assert answer.status_code == 200, answer.text
    doc: dict[str, Any] = answer.json()
    return doc


def audit(server: ServerProcess, **filters: str) -> list[dict[str, Any]]:
    """Audit records matching ``filters`` (``actor``, ``action``…), newest first."""
    answer = httpx.get(
        f"{server.http_url}/api/audit", params=filters, headers=server.headers, timeout=30
    )
    assert answer.status_code == 200, answer.text
    records: list[dict[str, Any]] = answer.json()["records"]
    return records


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file (from its IHDR chunk); fails for anything else."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_radiologist_signs_in_claims_and_signs_out(server: ServerProcess, tmp_path: Path) -> None:
    base = server.http_url
    browser = signed_in_browser(tmp_path / "chrome")
    try:
        sign_in_with_the_form(browser, base, READER, PASSWORD)
        browser.click("#submit", navigates=True)

        # The worklist, under the reader's own name.
        assert browser.url() == f"{base}/", browser.dom()[:2000]
        assert browser.text("#who") == DISPLAY_NAME
        assert browser.text("#role") == f"({READER}, radiologist)"
        assert browser.text("#live") == "polling"  # the stream was refused: it polls
        logins = audit(server, actor=READER, action="login")
        (login,) = [r for r in logins if r["outcome"] == "success"]
        assert login["detail"] == {"method": "password"}
        uids = browser.evaluate("[...document.querySelectorAll('tr.item')].map(r => r.dataset.uid)")
        assert uids == [URGENT, ROUTINE]
        assert "critical" in browser.evaluate(
            f"document.querySelector('tr[data-uid=\"{URGENT}\"]').className"
        )
        assert "reader" not in browser.evaluate(
            "[...document.querySelectorAll('input')].map(i => i.id).join(' ')"
        )  # no reader name to type: the session says who reads
        shot = browser.screenshot(tmp_path / "signed-in.png")
        width, height = png_size(shot)
        assert width == 1280 and height >= 600, (width, height)  # the window less its frame
        assert shot.stat().st_size > 20_000, shot.stat().st_size

        # The session cookie, as the browser keeps it: not readable by scripts, not sent
        # by other sites' requests, for the whole server, not Secure over plain HTTP.
        cookie = browser.cookie(SESSION_COOKIE, base)
        assert cookie is not None, browser.cookies()
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Lax"
        assert cookie["path"] == "/"
        assert cookie["secure"] is False
        assert cookie["domain"] == "127.0.0.1"
        assert SESSION_COOKIE not in browser.evaluate("document.cookie")

        # The banner's Acknowledge button: recorded in the audit trail as this reader's.
        assert browser.evaluate("document.querySelectorAll('#alerts .alert').length") == 1
        browser.click("#alerts .alert button:nth-of-type(2)")
        assert browser.evaluate("document.querySelectorAll('#alerts .alert').length") == 0
        (ack,) = audit(server, actor=READER, action="acknowledge")
        assert ack["target"] == URGENT and ack["outcome"] == "success"
        assert ack["detail"] == {"finding": "intracranial_haemorrhage"}
        # Acknowledged on the server: a fresh load of the page (another tab, another
        # reader's screen) raises no banner for it, and the study says who acknowledged it.
        browser.navigate(f"{base}/")
        assert browser.evaluate("document.querySelectorAll('#alerts .alert').length") == 0
        browser.click(f'tr.item[data-uid="{URGENT}"]')
        acked = browser.text('li[data-finding="intracranial_haemorrhage"] .acked') or ""
        assert acked.startswith(f"alert acknowledged by {READER}"), acked
        # The study's DICOM results, and where each stands with the PACS.
        result = browser.text('#dicom-results li[data-kind="sr"]') or ""
        assert "Measurement report (SR)" in result and "PACS@192.0.2.1:104: pending" in result

        # Claim the routine study from its detail pane.
        browser.click(f'tr.item[data-uid="{ROUTINE}"]')
        assert browser.text("#detail h3") == "CT HEAD (headache)"
        browser.click('#actions button[data-act="claim"]')
        assert browser.text("#message") == ""
        assert browser.text("#detail .claim") == f"claimed by {READER}"
        routine = study(server, ROUTINE)
        assert routine["read_state"] == "claimed" and routine["claimed_by"] == READER
        row = browser.text(f'tr.item[data-uid="{ROUTINE}"] td.claim')
        assert row == READER

        # Judge the AI's finding: disagree, with a comment; kept as this reader's.
        browser.type('li[data-finding="intracranial_haemorrhage"] .fb-comment', "calcification")
        browser.click('li[data-finding="intracranial_haemorrhage"] button[data-verdict="disagree"]')
        said = browser.text('li[data-finding="intracranial_haemorrhage"] .fb-said')
        assert said is not None and said.startswith(f"{READER}: disagree — calcification"), said
        answer = httpx.get(
            f"{base}/api/studies/{ROUTINE}/feedback", headers=server.headers, timeout=30
        )
        (judged,) = answer.json()["records"]
        assert (judged["reader"], judged["verdict"], judged["comment"]) == (
            READER,
            "disagree",
            "calcification",
        )
        assert judged["model"]["name"] == "blast-ct-v1"

        # "Read next" claims the first study in reading order that is still free.
        browser.click("#next")
        assert browser.text("#detail h3") == "CT HEAD (fall)"
        urgent = study(server, URGENT)
        assert urgent["read_state"] == "claimed" and urgent["claimed_by"] == READER

        # Sign out: back on the form, the cookie gone from the browser and dead on the server.
        old = cookie["value"]
        browser.click("#signout", navigates=True)
        assert browser.url() == f"{base}/login"
        assert browser.cookie(SESSION_COOKIE, base) is None
        replay = httpx.get(f"{base}/api/worklist", cookies={SESSION_COOKIE: old}, timeout=30)
        assert replay.status_code == 401, replay.text
        page = httpx.get(f"{base}/", cookies={SESSION_COOKIE: old}, timeout=30)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        # Opening the page again lands on the form.
        browser.navigate(f"{base}/")
        assert browser.url() == f"{base}/login"
    finally:
        browser.close()


def test_wrong_password_is_shown_on_the_form(server: ServerProcess, tmp_path: Path) -> None:
    base = server.http_url
    browser = signed_in_browser(tmp_path / "chrome")
    try:
        sign_in_with_the_form(browser, base, READER, PASSWORD + " (wrong)")
        browser.click("#submit")
        assert browser.text("#problem") == "wrong username or password"
        assert browser.url() == f"{base}/login"
        assert browser.evaluate("document.getElementById('submit').disabled") is False
        assert browser.cookie(SESSION_COOKIE, base) is None
    finally:
        browser.close()


def test_session_cookie_is_secure_over_https(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    env = {
        "TRIAGE_HTTPS_CERT": str(tls_files["server.pem"]),
        "TRIAGE_HTTPS_KEY": str(tls_files["server.key"]),
        "TRIAGE_SERIES_QUIET_SECONDS": "3600",
    }
    with running_server(tmp_path / "data", env) as srv:
        assert srv.http_url.startswith("https://")
        seed(srv)
        # The test CA is not one the browser knows.
        browser = signed_in_browser(tmp_path / "chrome", "--ignore-certificate-errors")
        try:
            sign_in_with_the_form(browser, srv.http_url, READER, PASSWORD)
            browser.click("#submit", navigates=True)
            assert browser.text("#who") == DISPLAY_NAME
            cookie = browser.cookie(SESSION_COOKIE, srv.http_url)
            assert cookie is not None, browser.cookies()
            assert cookie["secure"] is True
            assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"
            assert cookie["path"] == "/"
        finally:
            browser.close()


def test_admin_manages_accounts_and_reads_the_audit_trail(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The admin page: the accounts table, a new account made with the form (it can sign
    in at once), a token shown once, the audit trail filtered and its chain checked."""
    base = server.http_url
    browser = signed_in_browser(tmp_path / "chrome")
    try:
        sign_in_with_the_form(browser, base, server.username, server.password)
        browser.click("#submit", navigates=True)
        assert browser.evaluate("document.getElementById('admin-link').hidden") is False
        browser.click("#admin-link", navigates=True)
        assert browser.url() == f"{base}/admin", browser.dom()[:2000]
        names = browser.evaluate(
            "[...document.querySelectorAll('#accounts tr')].map(r => r.dataset.username)"
        )
        assert {server.username, READER} <= set(names)

        browser.type("#new-username", "bnew")
        browser.type("#new-name", "Dr Ben New")
        browser.type("#new-password", "a new long passphrase")
        browser.click('#new-account button[type="submit"]')
        assert browser.text("#accounts-message") == "bnew: created"
        assert "bnew" in browser.evaluate(
            "[...document.querySelectorAll('#accounts tr')].map(r => r.dataset.username)"
        )
        signed = httpx.post(
            f"{base}/api/auth/login",
            json={"username": "bnew", "password": "a new long passphrase"},
            timeout=30,
        )
        assert signed.status_code == 200 and signed.json()["role"] == "radiologist"

        browser.type("#token-username", "bnew")
        browser.type("#token-name", "page test")
        browser.click('#new-token button[type="submit"]')
        token = browser.text("#new-token-value")
        assert token and token.startswith("trg_")
        me = httpx.get(
            f"{base}/api/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert me.status_code == 200 and me.json()["username"] == "bnew"

        browser.type("#f-action", "account_create")
        browser.click('#audit-filter button[type="submit"]')
        actions = browser.evaluate(
            "[...document.querySelectorAll('#audit tr')].map(r => r.children[3].textContent)"
        )
        assert actions and set(actions) == {"account_create"}, actions
        targets = browser.evaluate(
            "[...document.querySelectorAll('#audit tr')].map(r => r.children[5].textContent)"
        )
        assert "bnew" in targets
        browser.click("#verify")
        assert (browser.text("#audit-message") or "").startswith("The chain is intact")
        browser.screenshot(tmp_path / "admin.png")
    finally:
        browser.close()


def test_a_radiologist_gets_no_admin_sections(server: ServerProcess, tmp_path: Path) -> None:
    base = server.http_url
    browser = signed_in_browser(tmp_path / "chrome")
    try:
        sign_in_with_the_form(browser, base, READER, PASSWORD)
        browser.click("#submit", navigates=True)
        assert browser.evaluate("document.getElementById('admin-link').hidden") is True
        browser.navigate(f"{base}/admin")
        hidden = browser.evaluate(
            "['accounts-section', 'tokens-section', 'audit-section']"
            ".map(id => document.getElementById(id).hidden)"
        )
        assert hidden == [True, True, True]
    finally:
        browser.close()


def test_the_reader_works_from_the_keyboard(server: ServerProcess, tmp_path: Path) -> None:
    """j moves to a study, c claims it, d marks it read; the waited time, the viewer link,
    the filters and "show read" are on the page."""
    base = server.http_url
    extra = "kbreader"
    target = "1.2.826.0.1.3680043.8.498.7209"  # this test's own study, unread
    db = Database(server.database_url)
    try:
        create_account(db, extra, Role.radiologist, password=PASSWORD)
        add(
            db,
            server.data_dir / "results",
            target,
            description="CT HEAD (keyboard)",
            minutes_ago=90,
            ai_status="ok",
            series=[("CT", "Head axial 2.5 mm")],
            routing={"models": [route(BLAST, target + ".1", CT_REASON, status="ok")]},
            findings=[
                haemorrhage(False, {"IPH": 0.0, "EAH": 0.0, "oedema": 0.0, "IVH": 0.0}, 0.01)
            ],
            overlays={},
        )
    finally:
        db.dispose()
    browser = signed_in_browser(tmp_path / "chrome")
    try:
        sign_in_with_the_form(browser, base, extra, PASSWORD)
        browser.click("#submit", navigates=True)
        waited = browser.text(f'tr.item[data-uid="{target}"] td.waited') or ""
        hours, _, minutes = waited.partition(" h ")
        assert hours == "1" and 30 <= int(minutes) <= 59, waited  # arrived 90 minutes ago
        rows = browser.evaluate("[...document.querySelectorAll('tr.item')].map(r => r.dataset.uid)")
        assert target in rows, rows
        for _ in range(rows.index(target) + 1):
            browser.act("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'j'}))")
        assert browser.evaluate("selected") == target
        link = browser.evaluate("document.getElementById('viewer-link').href")
        assert link == VIEWER + target.replace(".", "%2E").replace("%2E", ".")
        browser.act("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'c'}))")
        assert study(server, target)["claimed_by"] == extra
        browser.act("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'd'}))")
        assert study(server, target)["read_state"] == "completed"
        shown = browser.evaluate(
            "[...document.querySelectorAll('tr.item')].map(r => r.dataset.uid)"
        )
        assert target not in shown  # read studies leave the list...
        browser.act("document.getElementById('f-completed').click()")
        shown = browser.evaluate(
            "[...document.querySelectorAll('tr.item')].map(r => r.dataset.uid)"
        )
        assert target in shown  # ...and come back with "show read"
        modalities = browser.evaluate(
            "[...document.getElementById('f-modality').options].map(o => o.value)"
        )
        assert "CT" in modalities
    finally:
        browser.close()
