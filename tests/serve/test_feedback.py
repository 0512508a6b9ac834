"""Feedback on the AI's findings over the API: what is kept (reader from the session, the
model, version and weights that made the finding, what the AI said), what is refused, one
audit record each, and the study document showing each reader's latest judgement."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select, update

from tests.serve.test_access import FINDING, STUDY_UID, Site, make_site, seed_study
from triage.audit.chain import listing
from triage.auth.roles import Role
from triage.db import Database
from triage.db.tables import FeedbackRow, FindingRow, InstanceRow, SeriesRow, StudyRow

WEIGHTS = ["a" * 64, "b" * 64]
SOP = "1.2.826.0.1.3680043.10.543.7001.1.5"


@pytest.fixture()
def site(db: Database, tmp_path: Path) -> Site:
    site = make_site(db, tmp_path)
    with db.session() as s:
        finding = s.scalars(select(FindingRow)).one()
        finding.SeriesInstanceUID = STUDY_UID + ".1"
        finding.payload = {
            **finding.payload,
            "model": {"name": "blast-ct-v1", "version": "1", "weights_sha256": WEIGHTS},
        }
        series_id = s.scalar(
            select(SeriesRow.id).where(SeriesRow.SeriesInstanceUID == STUDY_UID + ".1")
        )
        s.execute(
            insert(InstanceRow).values(
                series_id=series_id,
                SOPInstanceUID=SOP,
                SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                TransferSyntaxUID="1.2.840.10008.1.2.1",
                path="unused",
                size_bytes=1,
                sha256="0" * 64,
                received_at=finding.created_at,
            )
        )
    return site


def reader(site: Site, name: str = "test-radiologist") -> TestClient:
    return site.client(headers=site.bearer(Role.radiologist))


def post(client: TestClient, body: dict[str, object], uid: str = STUDY_UID):  # type: ignore[no-untyped-def]
    return client.post(f"/api/studies/{uid}/feedback", json=body)


def test_agree_is_kept_with_the_model_that_made_the_finding(site: Site) -> None:
    res = post(
        reader(site),
        {"finding": FINDING, "verdict": "agree", "comment": "clear bleed", "reader": "mallory"},
    )
    assert res.status_code == 201, res.text
    doc = res.json()
    assert doc["reader"] == "test-radiologist"  # the session's, not the body's
    assert doc["model"] == {"name": "blast-ct-v1", "version": "1", "weights_sha256": WEIGHTS}
    assert doc["ai"] == {"flag": True, "score": 0.9}
    assert doc["comment"] == "clear bleed"
    with site.db.session() as s:
        row = s.scalars(select(FeedbackRow)).one()
        assert (row.reader, row.verdict, row.finding) == ("test-radiologist", "agree", FINDING)
        assert row.weights_sha256 == WEIGHTS and row.SeriesInstanceUID == STUDY_UID + ".1"
    (record,) = listing(site.db, action="feedback")
    assert record["actor"] == "test-radiologist" and record["target"] == STUDY_UID
    assert record["detail"] == {"finding": FINDING, "verdict": "agree"}


def test_the_record_keeps_what_the_ai_said_then(site: Site) -> None:
    """A later re-analysis changes the finding, not the judgement made before it."""
    assert post(reader(site), {"finding": FINDING, "verdict": "disagree"}).status_code == 201
    with site.db.session() as s:
        s.execute(update(FindingRow).values(score=0.1, flag=0, model_version="2"))
    (said,) = reader(site).get(f"/api/studies/{STUDY_UID}/feedback").json()["records"]
    assert said["ai"] == {"flag": True, "score": 0.9}
    assert said["model"]["version"] == "1"


def test_missed_needs_a_slice_of_this_study(site: Site, db: Database) -> None:
    client = reader(site)
    with db.session() as s:
        s.execute(update(FindingRow).values(flag=0))  # the AI did not flag it
    no_slice = post(client, {"finding": FINDING, "verdict": "missed"})
    assert no_slice.status_code == 400 and "slice" in no_slice.json()["detail"]
    other = post(client, {"finding": FINDING, "verdict": "missed", "SOPInstanceUID": "1.2.3.4"})
    assert other.status_code == 404
    ok = post(
        client,
        {"finding": FINDING, "verdict": "missed", "SOPInstanceUID": SOP, "InstanceNumber": 117},
    )
    assert ok.status_code == 201, ok.text
    assert (ok.json()["SOPInstanceUID"], ok.json()["InstanceNumber"]) == (SOP, 117)
    with db.session() as s:
        assert s.scalar(select(FeedbackRow.verdict)) == "missed"


def test_missed_is_refused_for_a_finding_the_ai_flagged(site: Site) -> None:
    res = post(reader(site), {"finding": FINDING, "verdict": "missed", "SOPInstanceUID": SOP})
    assert res.status_code == 400 and "agree or disagree" in res.json()["detail"]


def test_a_finding_the_ai_can_miss_without_reporting_it(site: Site) -> None:
    """missed: the AI said nothing of it at all (no finding row): kept without a model."""
    res = post(
        reader(site), {"finding": "pneumothorax", "verdict": "missed", "SOPInstanceUID": SOP}
    )
    assert res.status_code == 201, res.text
    assert res.json()["model"] is None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"finding": "pneumothorax", "verdict": "agree"}, 404),  # not reported
        ({"finding": "Bad Code!", "verdict": "agree"}, 422),
        ({"finding": FINDING, "verdict": "maybe"}, 422),
        ({"finding": FINDING, "verdict": "agree", "comment": "x" * 2001}, 422),
        ({"finding": FINDING, "verdict": "agree", "comment": "bell\x07"}, 400),
    ],
)
def test_bad_feedback_is_refused_and_nothing_kept(
    site: Site, body: dict[str, object], status: int
) -> None:
    assert post(reader(site), body).status_code == status
    with site.db.session() as s:
        assert s.scalar(select(FeedbackRow.id)) is None
    assert listing(site.db, action="feedback") == []


def test_unknown_study_is_404(site: Site) -> None:
    assert post(reader(site), {"finding": FINDING, "verdict": "agree"}, "9.9.9").status_code == 404
    assert reader(site).get("/api/studies/9.9.9/feedback").status_code == 404


def test_an_integration_cannot_judge(site: Site) -> None:
    res = post(
        site.client(headers=site.bearer(Role.integration)), {"finding": FINDING, "verdict": "agree"}
    )
    assert res.status_code == 403


def test_the_study_shows_each_readers_latest_judgement(site: Site) -> None:
    first, second = reader(site), site.client(headers=site.bearer(Role.admin))
    assert post(first, {"finding": FINDING, "verdict": "agree"}).status_code == 201
    assert (
        post(first, {"finding": FINDING, "verdict": "disagree", "comment": "artefact"}).status_code
        == 201
    )
    assert post(second, {"finding": FINDING, "verdict": "agree"}).status_code == 201
    doc = first.get(f"/api/studies/{STUDY_UID}").json()
    latest = {(r["reader"], r["verdict"]) for r in doc["feedback"]}
    assert latest == {("test-radiologist", "disagree"), ("test-admin", "agree")}
    everything = first.get(f"/api/studies/{STUDY_UID}/feedback").json()
    assert [r["verdict"] for r in everything["records"]] == ["agree", "disagree", "agree"]


def test_another_study_does_not_see_it(site: Site, db: Database) -> None:
    seed_study(db, "1.2.826.0.1.3680043.10.543.7002", finding=None)
    assert post(reader(site), {"finding": FINDING, "verdict": "agree"}).status_code == 201
    other = reader(site).get("/api/studies/1.2.826.0.1.3680043.10.543.7002/feedback").json()
    assert other["records"] == []
    with db.session() as s:
        assert s.scalar(select(StudyRow.id).where(StudyRow.StudyInstanceUID == STUDY_UID))
