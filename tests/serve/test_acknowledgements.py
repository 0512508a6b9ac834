"""Acknowledging a critical-finding alert: kept on the server with who and when, listed on
the worklist item, the study and the viewer document, audited; unknown findings refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from tests.serve.test_access import FINDING, STUDY_UID, Site, make_site
from triage.audit.chain import listing
from triage.auth.roles import Role
from triage.db import Database
from triage.db.tables import AcknowledgementRow


@pytest.fixture()
def site(db: Database, tmp_path: Path) -> Site:
    return make_site(db, tmp_path)


def test_an_acknowledgement_is_kept_and_shown_everywhere(site: Site) -> None:
    reader = site.client(headers=site.bearer(Role.radiologist))
    res = reader.post(f"/api/studies/{STUDY_UID}/acknowledge", json={"finding": FINDING})
    assert res.status_code == 200, res.text
    assert res.json()["acknowledged_by"] == "test-radiologist"
    with site.db.session() as s:
        row = s.scalars(select(AcknowledgementRow)).one()
        assert (row.finding, row.reader) == (FINDING, "test-radiologist")
    other = site.client(headers=site.bearer(Role.admin))  # another reader, another tab
    (item,) = [
        i for i in other.get("/api/worklist").json()["items"] if i["StudyInstanceUID"] == STUDY_UID
    ]
    assert [(a["finding"], a["by"]) for a in item["acknowledged"]] == [
        (FINDING, "test-radiologist")
    ]
    study = other.get(f"/api/studies/{STUDY_UID}").json()
    assert study["acknowledged"][0]["at"] == res.json()["acknowledged_at"]
    viewer = other.get(f"/api/studies/{STUDY_UID}/viewer").json()
    assert [a["by"] for a in viewer["acknowledged"]] == ["test-radiologist"]
    (record,) = listing(site.db, action="acknowledge")
    assert record["actor"] == "test-radiologist" and record["detail"] == {"finding": FINDING}


def test_an_unknown_finding_is_refused_and_nothing_kept(site: Site) -> None:
    reader = site.client(headers=site.bearer(Role.radiologist))
    res = reader.post(f"/api/studies/{STUDY_UID}/acknowledge", json={"finding": "pneumothorax"})
    assert res.status_code == 404
    with site.db.session() as s:
        assert s.scalar(select(AcknowledgementRow.id)) is None
    assert listing(site.db, action="acknowledge") == []
