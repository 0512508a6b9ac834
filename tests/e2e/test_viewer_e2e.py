"""The image viewer (/viewer#study=...) in headless Chromium against a running ``triage serve``.

Studies go into the server through STOW-RS and are analysed by its own worker code with the
models' output standing in for the networks (``tests.e2e.viewer_seed``): a synthetic head CT
with a bleed where the test put it (critical), one without (routine), and a real radiograph
with heatmaps where the test put them. A radiologist signs in with the form, opens the
critical study from the worklist, scrolls to the bleed, and the test reads the screenshot's
pixels: the overlay's class colour over the bleed, grey outside it and with the overlay off,
grey levels as the window says. Then the reader's judgements (agree, missed on this slice),
the acknowledgement of the alert and the claim, each checked through the API.

Screenshots are kept as test artefacts in ``$TRIAGE_TEST_ARTIFACTS`` (default
``tests/artifacts/``, not in git).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from tests.conftest import REPO_ROOT, running_server
from tests.e2e.browser import Browser
from tests.e2e.test_page_signin_e2e import (
    audit,
    sign_in_with_the_form,
    signed_in_browser,
    study,
)
from tests.e2e.viewer_seed import (
    BLEED_CENTRE,
    BLEED_HU,
    BRAIN_HU,
    SERVER_ENV,
    HeadSeries,
    Heat,
    analyse,
    blob_haemorrhage,
    chest,
    haemorrhage,
    heat_peak_pixel,
    radiograph_copy,
    stow,
    window_grey,
    write_head_series,
)
from triage.auth.accounts import create_account
from triage.auth.roles import Role
from triage.db import Database
from triage.db.tables import InstanceRow
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

READER = "vreader"
PASSWORD = "a long viewer passphrase"
HAEMORRHAGE = "intracranial_haemorrhage"
EFFUSION = Heat("pleural_effusion", "Pleural effusion", 0.81, (20, 44))
PNEUMOTHORAX = Heat("pneumothorax", "Pneumothorax", 0.12, (48, 14))
# The brain, away from the bleed and the ventricles (the bleed mirrored to the right).
BRAIN_POINT = (-BLEED_CENTRE[0], BLEED_CENTRE[1], BLEED_CENTRE[2])


def artifacts_dir() -> Path:
    """Where screenshots are kept: ``$TRIAGE_TEST_ARTIFACTS`` or ``tests/artifacts``."""
    path = Path(os.environ.get("TRIAGE_TEST_ARTIFACTS") or REPO_ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Heads:
    critical: HeadSeries
    routine: HeadSeries


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("triage-viewer"), SERVER_ENV) as srv:
        db = Database(srv.database_url)
        try:
            create_account(
                db, READER, Role.radiologist, password=PASSWORD, display_name="Dr Vi Ewer"
            )
        finally:
            db.dispose()
        yield srv


@pytest.fixture(scope="module")
def heads(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Heads:
    """The routine study arrives first, the critical one after it."""
    sources = tmp_path_factory.mktemp("viewer-sources")
    routine = write_head_series(
        sources / "routine",
        bleed=False,
        description="CT HEAD (headache)",
        patient=("TEST^ROUTINE", "VIEW-0003"),
        accession="ACC-VIEW-3",
    )
    stow(server, routine.paths)
    analyse(server, routine.StudyInstanceUID, haemorrhage(bleed=False))
    critical = write_head_series(sources / "critical", bleed=True, description="CT HEAD (fall)")
    stow(server, critical.paths)
    analyse(server, critical.StudyInstanceUID, haemorrhage(bleed=True))
    return Heads(critical, routine)


def manifest(server: ServerProcess, uid: str) -> dict[str, Any]:
    answer = httpx.get(
        f"{server.http_url}/api/studies/{uid}/viewer", headers=server.headers, timeout=60
    )
    assert answer.status_code == 200, answer.text
    doc: dict[str, Any] = answer.json()
    return doc


def feedback(server: ServerProcess, uid: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{server.http_url}/api/studies/{uid}/feedback", headers=server.headers, timeout=30
    )
    assert answer.status_code == 200, answer.text
    records: list[dict[str, Any]] = answer.json()["records"]
    return records


def open_browser(server: ServerProcess, profile: Path) -> Browser:
    """A browser signed in as the reader with the form, on the worklist."""
    browser = signed_in_browser(profile)
    try:
        sign_in_with_the_form(browser, server.http_url, READER, PASSWORD)
        browser.click("#submit", navigates=True)
        assert browser.url() == f"{server.http_url}/", browser.dom()[:2000]
    except BaseException:
        browser.close()
        raise
    return browser


def key(browser: Browser, name: str) -> None:
    browser.act(
        f"document.dispatchEvent(new KeyboardEvent('keydown', {{key: {json.dumps(name)}}}))"
    )


def label(browser: Browser) -> str:
    return browser.text("#slice-label") or ""


def shot(browser: Browser, name: str) -> Image.Image:
    path = browser.screenshot(artifacts_dir() / name)
    return Image.open(path).convert("RGB")


def colour_at(browser: Browser, image: Image.Image, row: int, column: int) -> tuple[int, ...]:
    """The screenshot's colour at the centre of image pixel (row, column)."""
    where = browser.evaluate(f"viewer.imageToClient({row}, {column})")
    rgb = image.getpixel((round(where["x"] - 0.5), round(where["y"] - 0.5)))
    assert isinstance(rgb, tuple), rgb
    return tuple(int(v) for v in rgb)


def blended(grey: float, colour: str, alpha: float) -> tuple[float, float, float]:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return tuple(grey + (c - grey) * alpha for c in (r, g, b))  # type: ignore[return-value]


def close(actual: tuple[int, ...], expected: tuple[float, ...], tolerance: float) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def is_grey(rgb: tuple[int, ...], tolerance: int = 2) -> bool:
    return max(rgb) - min(rgb) <= tolerance


def page_errors(browser: Browser) -> list[str]:
    return [
        f"{m['source']}: {m['text']}"
        for m in browser.console
        if m["level"] == "error" and "favicon" not in str(m["url"])
    ]


def test_critical_ct_in_the_viewer(server: ServerProcess, heads: Heads, tmp_path: Path) -> None:
    uid = heads.critical.StudyInstanceUID
    doc = manifest(server, uid)
    (series,) = doc["series"]
    assert series["SeriesInstanceUID"] == heads.critical.SeriesInstanceUID
    slices = series["slices"]
    n = len(slices)
    assert n == len(heads.critical.paths)
    numbers = [heads.critical.instance_numbers[s["SOPInstanceUID"]] for s in slices]
    (overlay,) = series["overlays"]
    classes = {c["name"]: c for c in overlay["classes"]}
    iph = classes["IPH"]
    best = iph["best_index"]
    # The slice with the most IPH is the one through the bleed's centre (3 mm slices).
    assert abs(slices[best]["position"][2] - BLEED_CENTRE[2]) <= 1.5, slices[best]

    browser = open_browser(server, tmp_path / "chrome")
    try:
        # The worklist: the critical study first, although it arrived last; Enter opens it.
        rows = browser.evaluate("[...document.querySelectorAll('tr.item')].map(r => r.dataset.uid)")
        assert rows[0] == uid and heads.routine.StudyInstanceUID in rows[1:], rows
        browser.click(f'tr.item[data-uid="{uid}"]')
        link = browser.evaluate("document.getElementById('open-viewer').getAttribute('href')")
        assert link == f"/viewer#study={uid}"
        browser.act(
            "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))", navigates=True
        )
        assert browser.url() == f"{server.http_url}/viewer#study={uid}"
        assert browser.text("#title") == "CT HEAD (fall)"
        assert "VIEW-0001" in (browser.text("#patient") or "")
        assert "ACC-VIEW-1" in (browser.text("#patient") or "")
        assert browser.text("#read-state") == "unread"
        assert browser.text(".ai-note") == "AI output — not for diagnostic use"
        # Every slice was fetched in the background.
        assert browser.evaluate("viewer.state().loaded") == n

        # The label names the source image's InstanceNumber (head first: the highest).
        assert label(browser) == f"Im {numbers[0]} (1/{n})"
        assert numbers[0] == max(numbers) and numbers[0] != 1
        key(browser, "ArrowDown")
        assert label(browser) == f"Im {numbers[1]} (2/{n})"
        key(browser, "PageDown")
        assert label(browser) == f"Im {numbers[11]} (12/{n})"
        key(browser, "ArrowUp")
        assert label(browser) == f"Im {numbers[10]} (11/{n})"
        browser.act(
            "document.getElementById('stage').dispatchEvent(new WheelEvent('wheel',"
            " {deltaY: 120, bubbles: true, cancelable: true}))"
        )
        assert label(browser) == f"Im {numbers[11]} (12/{n})"
        key(browser, "End")
        assert label(browser) == f"Im {numbers[-1]} ({n}/{n})"
        key(browser, "Home")
        assert label(browser) == f"Im {numbers[0]} (1/{n})"
        assert browser.evaluate("document.getElementById('slice').value") == "0"

        # The legend's IPH jump goes to its best slice.
        assert browser.evaluate(
            "[...document.querySelectorAll('#legend [data-class]')].map(e => e.dataset.class)"
        ) == [c["name"] for c in overlay["classes"]]
        browser.click('#legend [data-class="IPH"] button.jump')
        assert browser.evaluate("viewer.state().index") == best
        assert label(browser) == f"Im {numbers[best]} ({best + 1}/{n})"

        # Overlay on: the bleed in IPH's colour over its grey, the brain grey.
        state = browser.evaluate("viewer.state()")
        assert state["window"] == {"center": 40, "width": 80} and state["overlayOn"] is True
        alpha = state["opacity"]
        bleed_at = heads.critical.pixel_of(BLEED_CENTRE)
        brain_at = heads.critical.pixel_of(BRAIN_POINT)
        bleed_grey = window_grey(BLEED_HU, 40, 80)
        brain_grey = window_grey(BRAIN_HU, 40, 80)
        image = shot(browser, "viewer-ct-overlay.png")
        on_bleed = colour_at(browser, image, *bleed_at)
        assert close(on_bleed, blended(bleed_grey, iph["color"], alpha), 4), on_bleed
        assert on_bleed[0] > on_bleed[1] + 40 and on_bleed[0] > on_bleed[2] + 40  # red
        on_brain = colour_at(browser, image, *brain_at)
        assert is_grey(on_brain) and abs(on_brain[0] - brain_grey) <= 2, on_brain

        # "o": the overlay off, the bleed grey; and on again.
        key(browser, "o")
        assert browser.evaluate("document.getElementById('overlay-on').checked") is False
        image = shot(browser, "viewer-ct-no-overlay.png")
        off_bleed = colour_at(browser, image, *bleed_at)
        assert is_grey(off_bleed) and abs(off_bleed[0] - bleed_grey) <= 2, off_bleed
        key(browser, "o")
        assert browser.evaluate("viewer.state().overlayOn") is True

        # A preset: the brain's grey as the stroke window (40/40) says.
        presets = {p["name"]: p for p in series["presets"]}
        assert set(presets) == {"brain", "subdural", "stroke", "bone"}
        browser.click('#presets button[data-preset="stroke"]')
        assert browser.text("#wl-label") == "W 40 L 40"
        stroke_grey = window_grey(BRAIN_HU, 40, 40)
        assert abs(stroke_grey - brain_grey) > 20
        image = shot(browser, "viewer-ct-stroke.png")
        on_brain = colour_at(browser, image, *brain_at)
        assert is_grey(on_brain) and abs(on_brain[0] - stroke_grey) <= 2, on_brain
        browser.click('#presets button[data-preset="bone"]')
        image = shot(browser, "viewer-ct-bone.png")
        bone_grey = window_grey(BRAIN_HU, 600, 2800)
        assert abs(colour_at(browser, image, *brain_at)[0] - bone_grey) <= 2
        browser.click('#presets button[data-preset="brain"]')
        assert browser.text("#wl-label") == "W 80 L 40"

        # Window by dragging with the left button: right widens, down raises the level.
        box = browser.evaluate(
            "(r => ({x: r.left + r.width / 2, y: r.top + r.height / 2}))"
            "(document.getElementById('stage').getBoundingClientRect())"
        )
        x, y = box["x"], box["y"]
        drag = [
            ("mousePressed", x, y),
            ("mouseMoved", x + 40, y + 20),
            ("mouseReleased", x + 40, y + 20),
        ]
        for kind, px, py in drag:
            browser.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": px, "y": py, "button": "left", "buttons": 1, "clickCount": 1},
            )
        browser.settle()
        assert browser.text("#wl-label") == "W 120 L 60"
        # Zoom, then "r" resets zoom and window.
        key(browser, "+")
        assert browser.evaluate("viewer.state().zoom") == pytest.approx(1.25)
        key(browser, "r")
        assert browser.evaluate("viewer.state().zoom") == 1
        assert browser.text("#wl-label") == "W 80 L 40"
        render_ms = browser.evaluate("window.viewerLastRenderMs")
        assert isinstance(render_ms, int | float) and render_ms >= 0

        # Claim from the viewer's header.
        browser.click("#claim")
        assert browser.text("#read-state") == f"claimed by {READER}"
        assert study(server, uid)["claimed_by"] == READER

        # Agree with the finding: stored with the model, shown under it.
        item = f'li[data-finding="{HAEMORRHAGE}"]'
        browser.type(f"{item} .fb-comment", "clear bleed")
        browser.click(f'{item} button[data-verdict="agree"]')
        (agreed,) = feedback(server, uid)
        assert (agreed["reader"], agreed["verdict"], agreed["comment"]) == (
            READER,
            "agree",
            "clear bleed",
        )
        assert agreed["model"]["name"] == "blast-ct-v1"
        said = browser.text(f"{item} .fb-said") or ""
        assert said.startswith(f"{READER}: agree — clear bleed"), said

        # Acknowledge the critical finding: shown, and in the audit trail as the reader's.
        browser.click(f"{item} button.ack")
        assert (browser.text(f"{item} .acked") or "").startswith("acknowledged")
        (ack,) = audit(server, actor=READER, action="acknowledge")
        assert ack["target"] == uid and ack["outcome"] == "success"
        assert ack["detail"] == {"finding": HAEMORRHAGE}
        views = audit(server, actor=READER, action="study_view", target=uid)
        assert any(v["detail"] == {"viewer": True} for v in views), views

        # The reader's view of the study, kept as an artefact.
        shot(browser, "viewer-ct.png")
        assert page_errors(browser) == []
    finally:
        browser.close()


def test_missed_on_this_slice(server: ServerProcess, heads: Heads, tmp_path: Path) -> None:
    uid = heads.routine.StudyInstanceUID
    (series,) = manifest(server, uid)["series"]
    browser = open_browser(server, tmp_path / "chrome")
    try:
        browser.navigate(f"{server.http_url}/viewer#study={uid}")
        assert browser.text("#title") == "CT HEAD (headache)"
        assert browser.text(f'li[data-finding="{HAEMORRHAGE}"] .muted') == "not flagged"
        assert browser.evaluate("document.querySelectorAll('button.ack').length") == 0
        key(browser, "PageDown")
        key(browser, "PageDown")
        key(browser, "ArrowDown")
        index = browser.evaluate("viewer.state().index")
        assert index == 21
        shown = series["slices"][index]
        number = heads.routine.instance_numbers[shown["SOPInstanceUID"]]
        assert label(browser).startswith(f"Im {number} (")
        assert browser.evaluate("document.getElementById('missed-finding').value") == HAEMORRHAGE
        browser.type("#missed-comment", "small bleed the AI missed")
        browser.click("#missed-send")
        (missed,) = feedback(server, uid)
        assert missed["verdict"] == "missed" and missed["reader"] == READER
        assert missed["finding"] == HAEMORRHAGE
        assert missed["SOPInstanceUID"] == shown["SOPInstanceUID"]
        assert missed["InstanceNumber"] == number
        assert missed["SeriesInstanceUID"] == heads.routine.SeriesInstanceUID
        assert missed["comment"] == "small bleed the AI missed"
        said = browser.text(f'#missed .fb-said[data-reader="{READER}"]') or ""
        assert f"missed on Im {number}" in said, said
        # Its "show" button comes back to that slice from elsewhere.
        key(browser, "Home")
        browser.click(f'#missed .fb-said[data-reader="{READER}"] button')
        assert browser.evaluate("viewer.state().index") == index
        assert page_errors(browser) == []
    finally:
        browser.close()


def test_radiograph_with_heatmaps(server: ServerProcess, xray_dir: Path, tmp_path: Path) -> None:
    data = radiograph_copy(
        xray_dir / "siim-cr-chest.dcm", accession="ACC-VIEW-CR", description="CR CHEST PA"
    )
    stow(server, [data])
    uid = next(
        i["StudyInstanceUID"]
        for i in httpx.get(
            f"{server.http_url}/api/worklist", headers=server.headers, timeout=30
        ).json()["items"]
        if i["AccessionNumber"] == "ACC-VIEW-CR"
    )
    analyse(server, uid, chest([EFFUSION, PNEUMOTHORAX]))
    (series,) = manifest(server, uid)["series"]
    assert series["kind"] == "image" and series["presets"] == []
    rows, columns = series["rows"], series["columns"]
    browser = open_browser(server, tmp_path / "chrome")
    try:
        browser.navigate(f"{server.http_url}/viewer#study={uid}")
        assert browser.text("#title") == "CR CHEST PA"
        (only,) = series["slices"]
        assert label(browser) == f"Im {only['InstanceNumber']} (1/1)"
        assert browser.evaluate(
            "[...document.querySelectorAll('#presets button')].map(b => b.dataset.preset)"
        ) == ["default"]
        # The flagged finding's heatmap is shown first; both can be chosen.
        assert browser.evaluate("viewer.state().overlay") == EFFUSION.code
        assert browser.evaluate(
            "[...document.getElementById('overlay').options].map(o => o.value)"
        ) == [o["finding"] for o in series["overlays"]]

        image = shot(browser, "viewer-radiograph.png")
        samples = [
            colour_at(browser, image, r, c)
            for r in range(64, rows, rows // 8)
            for c in range(64, columns, columns // 8)
        ]
        greys = [s[1] for s in samples]
        assert max(greys) - min(greys) > 60, greys  # an image, not a flat field
        hot = colour_at(browser, image, *heat_peak_pixel(EFFUSION.peak, rows, columns))
        assert hot[0] > hot[2] + 60, hot  # red to yellow over the grey
        cold = colour_at(browser, image, *heat_peak_pixel((60, 60), rows, columns))
        assert is_grey(cold), cold  # no saliency there: the plain image

        # The other finding's map: the effusion's place is plain grey now.
        browser.act(
            "(s => { s.value = 'pneumothorax'; s.dispatchEvent(new Event('change')); })"
            "(document.getElementById('overlay'))"
        )
        image = shot(browser, "viewer-radiograph-pneumothorax.png")
        assert is_grey(colour_at(browser, image, *heat_peak_pixel(EFFUSION.peak, rows, columns)))
        hot = colour_at(browser, image, *heat_peak_pixel(PNEUMOTHORAX.peak, rows, columns))
        assert hot[0] > hot[2] + 60, hot
        assert page_errors(browser) == []
    finally:
        browser.close()


def test_monochrome1_radiograph_is_shown_inverted(
    server: ServerProcess, xray_dir: Path, tmp_path: Path
) -> None:
    """``siim-cr-chest-monochrome1.dcm`` holds the same stored values as the MONOCHROME2
    file with only PhotometricInterpretation changed: a correct viewer shows its negative."""
    uids = {}
    for name, accession in (
        ("siim-cr-chest.dcm", "ACC-VIEW-M2"),
        ("siim-cr-chest-monochrome1.dcm", "ACC-VIEW-M1"),
    ):
        stow(server, [radiograph_copy(xray_dir / name, accession=accession, description=name)])
        items = httpx.get(
            f"{server.http_url}/api/worklist", headers=server.headers, timeout=30
        ).json()["items"]
        uid = next(i["StudyInstanceUID"] for i in items if i["AccessionNumber"] == accession)
        analyse(server, uid, chest([EFFUSION]))
        uids[accession] = uid
    (plain,) = manifest(server, uids["ACC-VIEW-M2"])["series"]
    (negative,) = manifest(server, uids["ACC-VIEW-M1"])["series"]
    assert (plain["photometric"], negative["photometric"]) == ("MONOCHROME2", "MONOCHROME1")
    assert plain["window"] == negative["window"]
    rows, columns = plain["rows"], plain["columns"]
    # The middle of the image, which actual size shows on the stage.
    grid = [
        (r, c)
        for r in range(rows // 4, 3 * rows // 4, rows // 12)
        for c in range(columns // 4, 3 * columns // 4, columns // 10)
    ]
    greys = {}
    browser = open_browser(server, tmp_path / "chrome")
    try:
        for accession, uid in uids.items():
            browser.navigate(f"{server.http_url}/viewer#study={uid}")
            key(browser, "o")  # the grey image alone,
            key(browser, "1")  # at actual size: each image pixel a screen pixel
            step = browser.evaluate(
                "(a => viewer.imageToClient(1, 1).x - a.x)(viewer.imageToClient(0, 0))"
            )
            assert step == pytest.approx(1.0)
            image = shot(browser, f"viewer-radiograph-{accession[-2:].lower()}.png")
            samples = [colour_at(browser, image, r, c) for r, c in grid]
            assert all(is_grey(s) for s in samples), samples
            greys[accession] = [s[0] for s in samples]
        assert max(greys["ACC-VIEW-M2"]) - min(greys["ACC-VIEW-M2"]) > 60
        sums = [a + b for a, b in zip(greys["ACC-VIEW-M2"], greys["ACC-VIEW-M1"], strict=True)]
        assert all(s == 255 for s in sums), json.dumps(sums)
        assert page_errors(browser) == []
    finally:
        browser.close()


def test_a_slice_that_cannot_be_decoded_says_why(server: ServerProcess, tmp_path: Path) -> None:
    """A stored file cut short after the analysis: its slice shows the server's reason, the
    others are shown as usual."""
    head = write_head_series(
        tmp_path / "cut",
        bleed=True,
        n=12,
        size=128,
        pixel_spacing=(1.6, 1.6),
        description="CT HEAD (cut short)",
        accession="ACC-VIEW-CUT",
    )
    stow(server, head.paths)
    analyse(server, head.StudyInstanceUID, haemorrhage(bleed=True))
    (series,) = manifest(server, head.StudyInstanceUID)["series"]
    broken = 5
    sop = series["slices"][broken]["SOPInstanceUID"]
    db = Database(server.database_url)
    try:
        with db.session() as s:
            path = s.scalar(select(InstanceRow.path).where(InstanceRow.SOPInstanceUID == sop))
    finally:
        db.dispose()
    assert path is not None
    stored = Path(path)
    stored.write_bytes(stored.read_bytes()[:-5000])  # the pixel data cut short
    browser = open_browser(server, tmp_path / "chrome")
    try:
        browser.navigate(f"{server.http_url}/viewer#study={head.StudyInstanceUID}")
        assert browser.evaluate("viewer.state().loaded") == len(series["slices"]) - 1
        for _ in range(broken):
            key(browser, "ArrowDown")
        corner = browser.text("#corner-tr") or ""
        assert corner.startswith(f"{label(browser)}: "), corner
        assert "cannot be decoded" in corner, corner  # the server's reason
        key(browser, "ArrowDown")
        assert browser.text("#corner-tr") == label(browser)  # the next one is drawn
        assert browser.evaluate("window.viewerLastRenderMs") is not None
    finally:
        browser.close()


def test_real_head_ct_in_the_viewer(server: ServerProcess, cq500_dir: Path, tmp_path: Path) -> None:
    """The real head CT (238 slices of 512², JPEG lossless) in the viewer, with a made-up
    haemorrhage overlay laid on its real geometry: the best slice shows the overlay colour,
    toggling hides it; the screenshot is kept (viewer-real-ct.png)."""
    files = sorted(p for p in cq500_dir.rglob("*") if p.is_file())
    stow(server, files)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    analyse(server, uid, blob_haemorrhage())
    doc = manifest(server, uid)
    (series,) = doc["series"]
    assert len(series["slices"]) == len(files)
    assert (series["rows"], series["columns"]) == (512, 512)
    (overlay,) = series["overlays"]
    (iph,) = [c for c in overlay["classes"] if c["name"] == "IPH"]
    best = iph["best_index"]
    browser = open_browser(server, tmp_path / "chrome")
    try:
        browser.click(f'tr.item[data-uid="{uid}"]')
        browser.act(
            "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))", navigates=True
        )
        assert browser.url() == f"{server.http_url}/viewer#study={uid}"
        for _ in range(10):  # 238 slices: a budget or more of loading
            if browser.evaluate("viewer.state().loaded") == len(files):
                break
            browser.settle()
        assert browser.evaluate("viewer.state().loaded") == len(files)
        browser.evaluate(f"viewer.setSlice({best})")
        browser.settle()
        number = series["slices"][best]["InstanceNumber"]
        assert label(browser).startswith(f"Im {number} ("), label(browser)

        box = browser.evaluate(
            "(r => [r.left, r.top, r.right, r.bottom])"
            "(document.getElementById('canvas').getBoundingClientRect())"
        )

        def coloured(image: Image.Image) -> int:
            """Pixels of the image where red clearly dominates (the IPH colour over grey)."""
            pixels = image.crop(tuple(round(v) for v in box)).getdata()
            return sum(1 for r, g, b in pixels if r > g + 40 and r > b + 40)

        with_overlay = coloured(shot(browser, "viewer-real-ct.png"))
        key(browser, "o")
        without = coloured(shot(browser, "viewer-real-ct-overlay-off.png"))
        assert with_overlay > 2000, with_overlay  # a 15 mm ball, drawn
        assert without < with_overlay / 20, (with_overlay, without)
        assert page_errors(browser) == []
    finally:
        browser.close()
