"""End to end: studies sent with DCMTK storescu to ``triage serve`` reorder the worklist."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import run_cli
from tests.e2e.conftest import dump_dom, send
from triage.demo.phantom import PhantomSpec, write_head_ct_series
from triage.demo.xray import write_demo_radiograph
from triage.serve.launcher import ServerProcess as Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def wait_for_ai(server: Server, expected: int, timeout_s: float = 900) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    items: list[dict[str, Any]] = []
    with server.client() as api:
        while time.monotonic() < deadline:
            items = api.get("/api/worklist").json()["items"]
            if len(items) == expected and all(i["ai_status"] != "pending" for i in items):
                return items
            time.sleep(1)
    pytest.fail(f"AI did not finish: {items}\n{server.log()[-4000:]}")


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_haemorrhage_study_moves_to_top(server: Server, storescu: str, tmp_path: Path) -> None:
    normal = write_head_ct_series(tmp_path / "normal", PhantomSpec(haemorrhage=False, seed=11))
    xray = write_demo_radiograph(tmp_path / "xray")
    # A head CT the model cannot read: three slices only (a partial transfer).
    broken_all = write_head_ct_series(
        tmp_path / "broken",
        PhantomSpec(haemorrhage=False, seed=12),
        StudyInstanceUID=generate_uid(),
    )
    broken = sorted(broken_all)[:3]
    bleed = write_head_ct_series(tmp_path / "bleed", PhantomSpec(haemorrhage=True, seed=13))

    # Arrival order: normal first, the bleed last; the bleed must still be read first.
    for paths in (normal, xray, broken, bleed):
        send(storescu, server, paths)

    items = wait_for_ai(server, expected=4)
    by_uid = {i["StudyInstanceUID"]: i for i in items}
    n_uid, x_uid, f_uid, b_uid = (study_uid(p[0]) for p in (normal, xray, broken, bleed))

    assert items[0]["StudyInstanceUID"] == b_uid, items
    assert items[0]["rank"] == 1
    assert "ai:intracranial_haemorrhage" in items[0]["reasons"]
    bleed_finding = items[0]["findings"][0]
    assert bleed_finding["finding"] == "intracranial_haemorrhage"
    assert bleed_finding["flag"] is True
    assert set(bleed_finding["volumes_ml"]) == {"IPH", "EAH", "oedema", "IVH"}
    assert bleed_finding["model"]["name"] and bleed_finding["model"]["version"]
    assert 0.0 <= bleed_finding["score"] <= 1.0

    # The rest keep arrival order: normal, X-ray (the chest model's weights are not in this
    # mirror: failed, naming the file and the setting), incomplete.
    assert [i["StudyInstanceUID"] for i in items[1:]] == [n_uid, x_uid, f_uid]
    assert by_uid[n_uid]["ai_status"] == "ok"
    assert by_uid[n_uid]["findings"][0]["flag"] is False
    assert by_uid[n_uid]["reasons"] == ["arrival"]
    assert by_uid[x_uid]["ai_status"] == "failed"
    assert "xrv-densenet121-res224-all/nih-pc-chex-mimic" in by_uid[x_uid]["ai_error"]
    assert "TRIAGE_MODEL_MIRROR" in by_uid[x_uid]["ai_error"]
    assert by_uid[x_uid]["findings"] == []
    assert by_uid[f_uid]["ai_status"] == "incomplete_series"
    assert by_uid[f_uid]["ai_error"].startswith("incomplete series: covers 7.5 mm")

    with server.client() as api:
        detail = api.get(f"/api/studies/{b_uid}").json()
        png = api.get(f"/api/studies/{b_uid}/overlays/intracranial_haemorrhage.png")
        missing = api.get("/api/studies/1.2.3.4")
    assert detail["series"][0]["NumberOfInstances"] == len(bleed)
    assert detail["findings"][0]["flag"] is True
    assert detail["overlays"] == ["intracranial_haemorrhage"]
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert missing.status_code == 404

    # Resending is harmless: no duplicates, no change in order.
    send(storescu, server, normal[:2])
    time.sleep(0.5)
    items_after = wait_for_ai(server, expected=4)
    assert [i["StudyInstanceUID"] for i in items_after][:1] == [b_uid]


def test_web_page_lists_the_worklist_in_a_real_browser(server: Server, tmp_path: Path) -> None:
    items = httpx.get(f"{server.http_url}/api/worklist", headers=server.headers, timeout=10).json()[
        "items"
    ]
    if not items:
        pytest.skip("needs the studies sent by the previous test")
    # ?live=0: an open event stream never lets the page idle
    cookie = server.session_cookie()
    dom = dump_dom(f"{server.http_url}/?live=0", tmp_path / "chrome", cookie=cookie)
    assert "reading worklist" in dom
    assert dom.count('class="item') == len(items)
    # The flagged study is the first row, marked critical, with its reason badge.
    first_row = dom[dom.index('class="item') : dom.index("</tr>", dom.index('class="item'))]
    assert "critical" in first_row
    assert "ai:intracranial_haemorrhage" in first_row
    assert items[0]["StudyInstanceUID"] in first_row
    assert 'class="due-critical">critical' in first_row  # class and deadline shown
    assert 'id="next"' in dom and "Read next" in dom  # the work queue's button

    # A link to one study opens its detail: findings, claim buttons, the router's verdicts.
    uid = items[0]["StudyInstanceUID"]
    linked = dump_dom(
        f"{server.http_url}/?live=0#study={uid}", tmp_path / "chrome-link", cookie=cookie
    )
    detail = linked[linked.index('id="detail"') :]
    assert "FLAGGED" in detail and "Mark read" in detail
    assert "series considered" in detail and "chosen: axial CT" in detail


def test_cli_worklist_json_is_the_api_document(server: Server) -> None:
    api = httpx.get(f"{server.http_url}/api/worklist", headers=server.headers, timeout=10).json()
    cli = json.loads(run_cli(["worklist", "--json"], server.data_dir, check=True).stdout)
    assert cli["items"] == api["items"]
    table = run_cli(["worklist"], server.data_dir, check=True)
    assert "Reading worklist" in table.stdout
