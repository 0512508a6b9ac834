"""Critical banners on the web page while it polls, and a malformed study link, in headless
Chromium against a running ``triage serve``.

With ``?live=0`` (no event stream, as when the stream is down) the page learns about
critical findings only from the polled worklist: the banner must come from there. A link
whose percent-encoding is malformed (``#study=%E0%A4%A``) made ``decodeURIComponent`` throw
before the page started its updates, so no banner ever appeared.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from tests.conftest import running_server
from tests.e2e.conftest import dump_dom
from tests.e2e.test_page_findings_e2e import (
    BLAST,
    CT_REASON,
    XRV,
    add,
    chest,
    haemorrhage,
    route,
)
from triage.db import Database
from triage.db.tables import StudyRow
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLEED = "1.2.826.0.1.3680043.8.498.7101"  # unread, flagged haemorrhage: a banner
TAKEN = "1.2.826.0.1.3680043.8.498.7102"  # flagged pneumothorax, claimed by a reader: none
EFFUSION = "1.2.826.0.1.3680043.8.498.7103"  # flagged, but not a critical finding: none
BAD_LINK = "#study=%E0%A4%A"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("triage-alerts")
    with running_server(data_dir, {"TRIAGE_SERIES_QUIET_SECONDS": "3600"}) as srv:
        db = Database(f"sqlite:///{(data_dir / 'triage.db').resolve()}")
        results = data_dir / "results"
        try:
            add(
                db,
                results,
                BLEED,
                description="CT HEAD (fall)",
                minutes_ago=4,
                ai_status="ok",
                series=[("CT", "Head axial 2.5 mm")],
                routing={"models": [route(BLAST, BLEED + ".1", CT_REASON, status="ok")]},
                findings=[
                    haemorrhage(True, {"IPH": 6.0, "EAH": 1.0, "oedema": 2.0, "IVH": 0.0}, 0.9)
                ],
                overlays={},
            )
            add(
                db,
                results,
                TAKEN,
                description="XR CHEST (taken)",
                minutes_ago=6,
                ai_status="ok",
                series=[("CR", "Chest PA")],
                routing={"models": [route(XRV, TAKEN + ".1", "CR", status="ok")]},
                findings=[chest("pneumothorax", "Pneumothorax", 0.8)],
                overlays={},
            )
            add(
                db,
                results,
                EFFUSION,
                description="XR CHEST (effusion)",
                minutes_ago=8,
                ai_status="ok",
                series=[("CR", "Chest AP")],
                routing={"models": [route(XRV, EFFUSION + ".1", "CR", status="ok")]},
                findings=[chest("pleural_effusion", "Pleural effusion", 0.7)],
                overlays={},
            )
            with db.session() as s:
                s.execute(
                    update(StudyRow)
                    .where(StudyRow.StudyInstanceUID == TAKEN)
                    .values(
                        read_state="claimed",
                        claimed_by="bob",
                        claim_expires_at=datetime.now(UTC) + timedelta(hours=2),
                    )
                )
        finally:
            db.dispose()
        yield srv


def alerts_of(dom: str) -> dict[str, str]:
    """StudyInstanceUID -> text of each banner in the alert area."""
    start = dom.index('id="alerts"')
    box = dom[start : dom.index("<main", start)]
    found = re.findall(r'<div class="alert" data-uid="([^"]+)">(.*?)</div>', box, re.S)
    texts = [(uid, " ".join(re.sub(r"<[^>]+>", " ", body).split())) for uid, body in found]
    assert len(texts) == len({uid for uid, _ in texts}), f"a study has two banners: {texts}"
    return dict(texts)


def test_polling_page_raises_critical_banners_despite_a_malformed_link(
    server: ServerProcess, tmp_path: Path
) -> None:
    dom = dump_dom(
        f"{server.http_url}/?live=0{BAD_LINK}", tmp_path / "chrome", cookie=server.session_cookie()
    )
    # The malformed link is reported, not thrown: the list loaded and polling runs.
    assert 'id="link-error"' in dom and "link does not name a study" in dom
    assert dom.count('<tr class="item') == 3
    assert re.search(r'id="live"[^>]*>polling<', dom)
    # The unread study with a flagged critical finding has its banner, from the list alone.
    alerts = alerts_of(dom)
    assert set(alerts) == {BLEED}, alerts
    text = alerts[BLEED]
    assert text.startswith("CRITICAL: intracranial haemorrhage flagged by AI")
    assert "CT HEAD (fall)" in text and "· 7101" in text and "Open" in text


def test_polling_page_without_a_link_raises_the_banner_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    # Several polls happen within the page's virtual time; the banner is raised once.
    dom = dump_dom(
        f"{server.http_url}/?live=0", tmp_path / "chrome", cookie=server.session_cookie()
    )
    assert set(alerts_of(dom)) == {BLEED}
    assert 'id="link-error"' not in dom
