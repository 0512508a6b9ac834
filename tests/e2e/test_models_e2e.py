"""End to end with both models: chest radiographs and head CTs sent with storescu to
``triage serve``, the chest network's weights (random, saved as the real file is) in the
mirror beside the real BLAST-CT weights."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import CHEST_MODEL, running_server, write_chest_weights
from tests.e2e.conftest import send
from triage.demo.phantom import PhantomSpec, write_head_ct_series
from triage.demo.xray import write_demo_radiograph
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def both_models(
    tmp_path_factory: pytest.TempPathFactory, weights_mirror: Path
) -> Iterator[tuple[ServerProcess, str]]:
    mirror = tmp_path_factory.mktemp("mirror")
    (mirror / "blast-ct-v1").symlink_to(weights_mirror / "blast-ct-v1")
    sha256 = write_chest_weights(mirror)
    env = {
        "TRIAGE_MODEL_MIRROR": str(mirror),
        "TRIAGE_DEVICE": "cpu",
        "TRIAGE_SERIES_QUIET_SECONDS": "1.5",
    }
    with running_server(tmp_path_factory.mktemp("triage-data"), env) as srv:
        yield srv, sha256


def _study(server: ServerProcess, uid: str, timeout_s: float = 600) -> dict[str, Any]:
    """The study once analysed (polls the API; the AI runs in the server's worker)."""
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(
            f"{server.http_url}/api/studies/{uid}", headers=server.headers, timeout=10
        )
        if response.status_code == 200:
            doc = response.json()
            if doc["ai_status"] != "pending":
                return doc
        time.sleep(0.5)
    pytest.fail(f"AI did not finish: {doc}\n{server.log()[-4000:]}")


def _lateral(out: Path) -> list[Path]:
    (path,) = write_demo_radiograph(out)
    ds = pydicom.dcmread(path)
    ds.ViewPosition = "LL"
    ds.save_as(path, enforce_file_format=True)
    return [path]


def test_chest_radiograph_gets_findings_and_a_saliency_overlay(
    both_models: tuple[ServerProcess, str], storescu: str, tmp_path: Path
) -> None:
    server, sha256 = both_models
    pa = write_demo_radiograph(tmp_path / "pa")
    send(storescu, server, pa)
    uid = str(pydicom.dcmread(pa[0], stop_before_pixels=True).StudyInstanceUID)
    detail = _study(server, uid)
    assert detail["ai_status"] == "ok", detail["ai_error"]
    codes = [f["finding"] for f in detail["findings"]]
    assert codes == [
        "pneumothorax",
        "pleural_effusion",
        "consolidation",
        "pulmonary_oedema",
        "cardiomegaly",
        "lung_mass",
    ]
    for f in detail["findings"]:
        assert f["model"] == {"name": CHEST_MODEL, "version": "1.0.0", "weights_sha256": [sha256]}
        assert f["flag"] == (f["score"] >= 0.5)
    assert "pneumothorax" in detail["overlays"]
    png = httpx.get(
        f"{server.http_url}/api/studies/{uid}/overlays/pneumothorax.png",
        headers=server.headers,
        timeout=30,
    )
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    doc = httpx.get(f"{server.http_url}/api/worklist", headers=server.headers, timeout=10).json()
    assert doc["critical_findings"] == ["intracranial_haemorrhage", "pneumothorax"]
    (item,) = [i for i in doc["items"] if i["StudyInstanceUID"] == uid]
    assert [f["finding"] for f in item["findings"]] == codes
    pneumothorax = detail["findings"][0]
    if pneumothorax["flag"]:  # random weights: whatever they say, the policy follows
        assert item["priority_class"] == "critical" and "ai:pneumothorax" in item["reasons"]
    else:
        assert "ai:pneumothorax" not in item["reasons"]


def test_lateral_radiograph_is_refused_with_the_reason(
    both_models: tuple[ServerProcess, str], storescu: str, tmp_path: Path
) -> None:
    server, _ = both_models
    lateral = _lateral(tmp_path / "lat")
    send(storescu, server, lateral)
    uid = str(pydicom.dcmread(lateral[0], stop_before_pixels=True).StudyInstanceUID)
    detail = _study(server, uid)
    assert detail["ai_status"] == "no_applicable_model"
    assert detail["findings"] == []
    (chest,) = [m for m in detail["routing"]["models"] if m["model"] == CHEST_MODEL]
    assert chest["reason"] == "reads CR/DX CHEST PA/AP; this study's CR/DX series show view LL"


def test_head_ct_and_chest_radiograph_in_one_study_get_both_models(
    both_models: tuple[ServerProcess, str], storescu: str, tmp_path: Path
) -> None:
    server, _ = both_models
    study_uid = generate_uid()
    head = write_head_ct_series(
        tmp_path / "ct", PhantomSpec(haemorrhage=True, seed=21), StudyInstanceUID=study_uid
    )
    chest = write_demo_radiograph(tmp_path / "cr", StudyInstanceUID=study_uid)
    send(storescu, server, [*head, *chest])
    detail = _study(server, study_uid)
    assert detail["ai_status"] == "ok", detail["ai_error"]
    models = {f["model"]["name"] for f in detail["findings"]}
    assert models == {"blast-ct-v1", CHEST_MODEL}
    (ich,) = [f for f in detail["findings"] if f["finding"] == "intracranial_haemorrhage"]
    assert ich["flag"] is True and ich["severity"] in ("high", "standard")
    assert ich["details"]["largest_lesion_ml"] > 0
    assert {"intracranial_haemorrhage", "pneumothorax"} <= set(detail["overlays"])
    runs = {m["model"]: (m["status"], m["version"]) for m in detail["routing"]["models"]}
    assert runs == {"blast-ct-v1": ("ok", "1.0.0"), CHEST_MODEL: ("ok", "1.0.0")}
    items = httpx.get(f"{server.http_url}/api/worklist", headers=server.headers, timeout=10).json()[
        "items"
    ]
    (item,) = [i for i in items if i["StudyInstanceUID"] == study_uid]
    assert item["priority_class"] == "critical"
    assert "ai:intracranial_haemorrhage" in item["reasons"]
