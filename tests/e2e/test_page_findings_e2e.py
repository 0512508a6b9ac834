"""The web page in headless Chromium: findings grouped by model, run status, overlays.

Studies and findings are written straight into the database of a running ``triage serve``
(no model runs), as the analysis stores them: a trauma study read by two models, a study
whose chest model failed (``partial``) and a lateral radiograph that no model reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import insert

from tests.conftest import running_server
from tests.e2e.conftest import dump_dom
from triage.db import Database
from triage.db.tables import FindingRow, SeriesRow, StudyRow
from triage.results import Overlay, overlay_path, save_overlay
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRAUMA = "1.2.826.0.1.3680043.8.498.7001"
PARTIAL = "1.2.826.0.1.3680043.8.498.7002"
LATERAL = "1.2.826.0.1.3680043.8.498.7003"
BLAST = "blast-ct-v1"
XRV = "xrv-densenet121-res224-all"
BLAST_WEIGHTS = [hashlib.sha256(f"blast member {i}".encode()).hexdigest() for i in range(12)]
XRV_WEIGHTS = [hashlib.sha256(b"xrv densenet121 all").hexdigest()]
# A patient name with markup: the page must show it as text.
PATIENT_NAME = "O'BRIEN^<b>ANN</b>"
MIRROR_ERROR = (
    f"model weights {XRV}/densenet121-all.pt (sha256 not pinned) are not available: "
    "no mirror configured. To fix: set TRIAGE_MODEL_MIRROR to a directory (or http(s) URL) "
    "holding <model name>/<file>"
)


def haemorrhage(flag: bool, volumes: dict[str, float], score: float) -> dict[str, Any]:
    blood = round(volumes["IPH"] + volumes["EAH"] + volumes["IVH"], 3)
    reasons = [f"blood volume {blood:.1f} ml >= 30 ml"] if blood >= 30 else []
    if volumes["IVH"] >= 0.5:
        reasons.append(f"intraventricular blood {volumes['IVH']:.1f} ml")
    return {
        "finding": "intracranial_haemorrhage",
        "flag": flag,
        "score": score,
        "volumes_ml": volumes,
        "max_probability": {},
        "model": {"name": BLAST, "version": "1.0", "weights_sha256": BLAST_WEIGHTS},
        "details": {
            "blood_volume_ml": blood,
            "largest_lesion_ml": round(volumes["IPH"] + volumes["IVH"], 3),
            "intraventricular_extension": volumes["IVH"] >= 0.5,
            "severity_reasons": reasons if flag else [],
            "threshold_ml": 1.0,
        },
        "severity": ("high" if reasons else "standard") if flag else None,
    }


def chest(code: str, label: str, score: float) -> dict[str, Any]:
    return {
        "finding": code,
        "flag": score >= 0.5,
        "score": score,
        "volumes_ml": {},
        "max_probability": {},
        "model": {"name": XRV, "version": "1.0.1", "weights_sha256": XRV_WEIGHTS},
        "details": {
            "label": label,
            "probability": round(score * 0.9, 4),
            "threshold": 0.5,
            "SOPInstanceUID": TRAUMA + ".2.1",
        },
        "severity": None,
    }


def route(model: str, series: str | None, reason: str, **run: Any) -> dict[str, Any]:
    """One model's entry in the study's routing document (``run`` adds status and error)."""
    verdicts = [] if series is None else [{"SeriesInstanceUID": series, "eligible": True}]
    for v in verdicts:
        v["reasons"] = [f"chosen: {reason.split(';')[0]}"]
    return {
        "model": model,
        "run": series is not None,
        "SeriesInstanceUID": series,
        "reason": reason,
        "incomplete": False,
        "series": verdicts,
        **run,
    }


CT_REASON = "axial CT 2.5 mm kernel STANDARD 52 images 130 mm coverage; 1 of 1 series eligible"
CR_REASON = "CR 1 images; 1 of 1 series eligible (region from BodyPartExamined CHEST)"
NOT_CT = "reads CT HEAD; the study has CR images"
NOT_LATERAL = "reads CR/DX CHEST PA/AP; this study's CR/DX series show view LL"


def add(
    db: Database,
    results: Path,
    uid: str,
    *,
    description: str,
    minutes_ago: float,
    ai_status: str,
    series: list[tuple[str, str]],
    routing: dict[str, Any],
    findings: list[dict[str, Any]],
    overlays: dict[str, Overlay | None],
    ai_error: str | None = None,
) -> None:
    """A study as the analysis leaves it: series, routing, findings and overlay files.

    ``overlays``: finding code -> overlay written to the result store, or None for a
    finding whose overlay file is recorded but gone.
    """
    arrived = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    with db.session() as s:
        study_id = s.scalar(
            insert(StudyRow)
            .returning(StudyRow.id)
            .values(
                StudyInstanceUID=uid,
                PatientName=PATIENT_NAME,
                PatientID="P-7",
                AccessionNumber=uid[-4:],
                StudyDescription=description,
                first_received_at=arrived,
                last_received_at=arrived,
                ai_status=ai_status,
                ai_error=ai_error,
                routing=routing,
            )
        )
        for n, (modality, series_description) in enumerate(series, start=1):
            s.execute(
                insert(SeriesRow).values(
                    study_id=study_id,
                    SeriesInstanceUID=f"{uid}.{n}",
                    Modality=modality,
                    SeriesDescription=series_description,
                    n_instances=1,
                    last_received_at=arrived,
                    state="complete",
                )
            )
        for doc in findings:
            mask_path = None
            if doc["finding"] in overlays:
                path = overlay_path(results, uid, doc["finding"])
                overlay = overlays[doc["finding"]]
                if overlay is not None:
                    save_overlay(path, overlay)
                mask_path = str(path)
            s.add(
                FindingRow(
                    study_id=study_id,
                    finding=doc["finding"],
                    flag=int(doc["flag"]),
                    score=doc["score"],
                    model_name=doc["model"]["name"],
                    model_version=doc["model"]["version"],
                    payload=doc,
                    mask_path=mask_path,
                    created_at=arrived,
                )
            )


def labels_overlay(series_uid: str) -> Overlay:
    labels = np.zeros((3, 48, 48), dtype=np.uint8)
    labels[1, 10:30, 12:28] = 1  # IPH
    labels[1, 30:34, 20:26] = 4  # IVH
    hu = np.full(labels.shape, 35, dtype=np.int16)
    return Overlay("labels", labels, hu, ("IPH", "EAH", "oedema", "IVH"), (0, 0, 0), series_uid)


def heatmap_overlay(series_uid: str) -> Overlay:
    yy, xx = np.mgrid[0:64, 0:64]
    heat = np.exp(-((yy - 20) ** 2 + (xx - 44) ** 2) / 120.0).astype(np.float16)
    grey = np.tile(np.linspace(40, 200, 64, dtype=np.uint8), (64, 1))
    return Overlay(
        "heatmap", heat, grey, ("pneumothorax",), (0, 0), series_uid, (8.0, 8.0), series_uid + ".1"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("triage-page")
    with running_server(data_dir, {"TRIAGE_SERIES_QUIET_SECONDS": "3600"}) as srv:
        db = Database(f"sqlite:///{(data_dir / 'triage.db').resolve()}")
        results = data_dir / "results"
        try:
            add(
                db,
                results,
                TRAUMA,
                description="CT HEAD + XR CHEST (trauma)",
                minutes_ago=3,
                ai_status="ok",
                series=[("CT", "Head axial 2.5 mm"), ("CR", "Chest PA")],
                routing={
                    "reason": f"{BLAST}: {CT_REASON}; {XRV}: {CR_REASON}",
                    "models": [
                        route(BLAST, TRAUMA + ".1", CT_REASON, status="ok", error=None),
                        route(XRV, TRAUMA + ".2", CR_REASON, status="ok", error=None),
                    ],
                },
                findings=[
                    chest("pleural_effusion", "Pleural effusion", 0.66),
                    chest("cardiomegaly", "Cardiomegaly", 0.08),
                    chest("pneumothorax", "Pneumothorax", 0.81),
                    chest("consolidation", "Consolidation", 0.21),
                    haemorrhage(True, {"IPH": 28.4, "EAH": 3.1, "oedema": 9.8, "IVH": 4.6}, 0.97),
                ],
                overlays={
                    "intracranial_haemorrhage": labels_overlay(TRAUMA + ".1"),
                    "pneumothorax": heatmap_overlay(TRAUMA + ".2"),
                },
            )
            add(
                db,
                results,
                PARTIAL,
                description="CT HEAD + XR CHEST",
                minutes_ago=10,
                ai_status="partial",
                ai_error=f"{XRV}: {MIRROR_ERROR}",
                series=[("CT", "Head axial 2.5 mm"), ("CR", "Chest AP")],
                routing={
                    "reason": f"{BLAST}: {CT_REASON}; {XRV}: {CR_REASON}",
                    "models": [
                        route(BLAST, PARTIAL + ".1", CT_REASON, status="ok", error=None),
                        route(XRV, PARTIAL + ".2", CR_REASON, status="failed", error=MIRROR_ERROR),
                    ],
                },
                findings=[
                    haemorrhage(False, {"IPH": 0.1, "EAH": 0.0, "oedema": 0.4, "IVH": 0.0}, 0.03)
                ],
                overlays={"intracranial_haemorrhage": None},  # recorded, file gone: a 404
            )
            add(
                db,
                results,
                LATERAL,
                description="XR CHEST LATERAL",
                minutes_ago=20,
                ai_status="no_applicable_model",
                series=[("CR", "Chest lateral")],
                routing={
                    "reason": f"{BLAST}: {NOT_CT}; {XRV}: {NOT_LATERAL}",
                    "models": [route(BLAST, None, NOT_CT), route(XRV, None, NOT_LATERAL)],
                },
                findings=[],
                overlays={},
            )
        finally:
            db.dispose()
        yield srv


class Marked(HTMLParser):
    """Text, class and images of each element carrying ``data-model`` or ``data-finding``."""

    VOID = {"img", "br", "input", "meta", "link", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict[str, Any] | None]] = []
        self.items: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            for _, item in self.stack:
                if item is not None:
                    item["imgs"].append(a.get("src"))
        if tag in self.VOID:
            return
        item = None
        for key in ("data-model", "data-finding"):
            if key in a:
                item = {"key": key, "name": a[key], "class": a.get("class") or "", "text": ""}
                item["imgs"] = []
                self.items.append(item)
        self.stack.append((tag, item))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            open_tag, _ = self.stack.pop()
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        for _, item in self.stack:
            if item is not None:
                item["text"] += data


def detail_of(server: ServerProcess, uid: str, profile: Path) -> tuple[str, Marked]:
    dom = dump_dom(
        f"{server.http_url}/?live=0#study={uid}", profile, cookie=server.session_cookie()
    )
    detail = dom[dom.index('id="detail"') : dom.index("<script")]
    parsed = Marked()
    parsed.feed(detail)
    return detail, parsed


def groups(parsed: Marked) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in parsed.items if i["key"] == "data-model"}


def findings(parsed: Marked) -> list[dict[str, Any]]:
    return [i for i in parsed.items if i["key"] == "data-finding"]


def test_worklist_rows_show_severity_and_partial_ai(server: ServerProcess, tmp_path: Path) -> None:
    dom = dump_dom(
        f"{server.http_url}/?live=0", tmp_path / "chrome", cookie=server.session_cookie()
    )
    assert "AI results are not for diagnostic use." in dom
    rows = [row[: row.index("</tr>")] for row in dom.split('<tr class="item')[1:]]
    assert len(rows) == 3
    # The severe haemorrhage is read first: a critical row with the severity badge.
    assert TRAUMA in rows[0]
    trauma = rows[0]
    (partial,) = (row for row in rows if PARTIAL in row)
    (lateral,) = (row for row in rows if LATERAL in row)
    assert trauma.startswith(" critical severe")
    assert '<span class="badge b-severe"' in trauma and ">severe</span>" in trauma
    assert '<span class="badge b-crit">ai:intracranial_haemorrhage</span>' in trauma
    assert '<span class="badge b-crit">ai:pneumothorax</span>' in trauma
    assert '<span class="badge b-severe">severity:high</span>' in trauma
    # A partial result is shown in amber, with the error on hover; never as critical.
    assert '<span class="s-partial" title="xrv-densenet121-res224-all: model weights' in partial
    assert ">partial</span>" in partial
    assert not partial.startswith(" critical") and "b-severe" not in partial
    assert 'class="s-no_applicable_model"' in lateral
    # Patient names are text, never markup.
    assert "O'BRIEN^&lt;b&gt;ANN&lt;/b&gt;" in dom and "<b>ANN</b>" not in dom


def test_study_detail_groups_findings_by_model(server: ServerProcess, tmp_path: Path) -> None:
    detail, parsed = detail_of(server, TRAUMA, tmp_path / "chrome")
    assert "AI findings are not for diagnostic use." in detail
    assert "Mark read" in detail and 'data-act="claim"' in detail and 'data-act="release"' in detail
    assert "&lt;b&gt;ANN&lt;/b&gt;" in detail and "<b>ANN</b>" not in detail

    models = groups(parsed)
    assert list(models) == [BLAST, XRV]  # the group with the severe finding first
    blast, xrv = models[BLAST], models[XRV]
    assert "m-ok" in blast["class"] and "m-ok" in xrv["class"]
    assert "version 1.0" in blast["text"]
    assert f"weights {BLAST_WEIGHTS[0][:12]} +11 more" in blast["text"]
    assert "version 1.0.1" in xrv["text"] and f"weights {XRV_WEIGHTS[0][:12]}" in xrv["text"]
    assert BLAST_WEIGHTS[0][:13] not in blast["text"]  # 12 hex digits, the rest on hover

    found = findings(parsed)
    assert [f["name"] for f in found] == [
        "intracranial_haemorrhage",
        "pneumothorax",  # critical first, then the other flagged one, then by score
        "pleural_effusion",
        "consolidation",
        "cardiomegaly",
    ]
    ich, ptx, effusion, consolidation, cardiomegaly = found
    assert ich["class"].split() == ["finding", "flagged", "critical"]
    for text in (
        "FLAGGED",
        "severe",
        "score 0.97",
        "blood 36.1 ml",
        "largest lesion 33.0 ml",
        "intraventricular extension",
        "IPH 28.4 ml · EAH 3.1 ml · oedema 9.8 ml · IVH 4.6 ml",
        "severe: blood volume 36.1 ml >= 30 ml; intraventricular blood 4.6 ml",
    ):
        assert text in ich["text"], (text, ich["text"])
    assert ptx["class"].split() == ["finding", "flagged", "critical"]
    assert "Pneumothorax" in ptx["text"] and "score 0.81" in ptx["text"]
    assert "probability 0.73" in ptx["text"] and "threshold 0.50" in ptx["text"]
    assert effusion["class"].split() == ["finding", "flagged"]  # flagged, not critical
    assert "Pleural effusion" in effusion["text"] and "score 0.66" in effusion["text"]
    for quiet in (consolidation, cardiomegaly):
        assert "flagged" not in quiet["class"].split() and "not flagged" in quiet["text"]
    assert "severe" not in ptx["text"]  # severity is the haemorrhage model's grade only

    # Overlays: only the findings that have one; the images loaded (a 404 removes the img).
    base = f"/api/studies/{TRAUMA}/overlays"
    assert ich["imgs"] == [f"{base}/intracranial_haemorrhage.png"]
    assert ptx["imgs"] == [f"{base}/pneumothorax.png"]
    assert effusion["imgs"] == consolidation["imgs"] == cardiomegaly["imgs"] == []
    for name in ("intracranial_haemorrhage", "pneumothorax"):
        png = httpx.get(f"{server.http_url}{base}/{name}.png", headers=server.headers, timeout=30)
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    # The router's verdicts stay available per model.
    assert f"{XRV}: series considered" in xrv["text"] and "chosen: CR 1 images" in xrv["text"]


def test_study_detail_shows_a_failed_model_and_its_error(
    server: ServerProcess, tmp_path: Path
) -> None:
    detail, parsed = detail_of(server, PARTIAL, tmp_path / "chrome")
    assert 'class="s-partial">partial</span>' in detail
    assert "1 of 2 models did not finish (see below)" in detail  # the error is shown once
    assert detail.count("TRIAGE_MODEL_MIRROR") == 1
    models = groups(parsed)
    assert list(models) == [BLAST, XRV]
    blast, xrv = models[BLAST], models[XRV]
    assert "m-ok" in blast["class"] and "not flagged" in blast["text"]
    assert "m-failed" in xrv["class"]
    assert f"{XRV}: failed — model weights {XRV}/densenet121-all.pt" in xrv["text"]
    assert "TRIAGE_MODEL_MIRROR" in xrv["text"]
    assert "&lt;model name&gt;/&lt;file&gt;" in detail  # the error is text too
    # The overlay is listed but its file is gone: the browser got a 404 and shows no image.
    (ich,) = findings(parsed)
    assert ich["imgs"] == [] and "overlay" not in ich["text"]
    url = f"{server.http_url}/api/studies/{PARTIAL}/overlays/intracranial_haemorrhage.png"
    assert httpx.get(url, headers=server.headers, timeout=30).status_code == 404


def test_study_detail_says_why_models_did_not_run(server: ServerProcess, tmp_path: Path) -> None:
    detail, parsed = detail_of(server, LATERAL, tmp_path / "chrome")
    assert 'class="s-no_applicable_model">no_applicable_model</span>' in detail
    models = groups(parsed)
    assert set(models) == {BLAST, XRV}
    for name, reason in ((BLAST, NOT_CT), (XRV, NOT_LATERAL)):
        assert "m-not_run" in models[name]["class"]
        assert f"not run — {reason}" in models[name]["text"]
    assert "No findings." not in detail and not findings(parsed)
