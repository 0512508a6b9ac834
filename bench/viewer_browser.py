"""Image viewer in the browser: the time to draw a slice with its overlay, as the page
measures it (``window.viewerLastRenderMs``: ``performance.now()`` around windowing the
slice's values through the lookup table, blending the overlay, ``putImageData`` and the
scaled ``drawImage``, for a slice already in memory).

A ``triage serve`` child process gets a head CT (``--ct``: the real CQ500 series by default,
``synthetic`` for the test suite's 256² head) and a radiograph (``--xray``) through STOW-RS,
analysed by the server's worker code with made-up model output (a labelled ball and
scattered EAH for the CT, two heatmaps for the radiograph: ``tests/e2e/viewer_seed.py``).
Headless Chromium (``tests/e2e/browser.py``, Debian's ``chromium``, software canvas) opens
``/viewer#study=...`` signed in and waits until every slice has been fetched in the
background (in real time: in the tests' virtual time ``performance.now()`` stands still),
then:

* CT: ``--slices`` steps down the series (as ArrowDown or the wheel does), each draw timed;
  the same with the overlay off; and each draw followed by a 1-pixel ``getImageData``,
  which makes Chromium rasterise the canvas now (the draw cost the page's own measure may
  leave to the next frame);
* radiograph: ``--slices`` window changes (a left-button drag: the lookup table is rebuilt
  and the image drawn again), timed the same way.

Median, 95th percentile and maximum against the goal (≤ 50 ms a slice); also the seconds
from opening the page to the first slice drawn and to every slice in memory (the server
decodes each slice on its first request: a cold cache), and how long the viewer document's
request took (the server lays the series and the overlays out on its first request). Run
with nothing else busy; the CPUs other processes kept busy during the timed parts (not this
run's server, browser or itself) and the load averages before and after are reported.

Usage:
    python bench/viewer_browser.py
    python bench/viewer_browser.py --ct synthetic --slices 50 --json /tmp/viewer.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpuload import busy_cpu_seconds  # noqa: E402

from tests.e2e.browser import Browser  # noqa: E402
from tests.e2e.viewer_seed import (  # noqa: E402
    SERVER_ENV,
    Heat,
    analyse,
    blob_haemorrhage,
    chest,
    radiograph_copy,
    stow,
    write_head_series,
)
from triage.serve.auth import SESSION_COOKIE  # noqa: E402
from triage.serve.launcher import ServerProcess  # noqa: E402

GOAL_MS = 50.0
SHARED = REPO.parent / "shared" / "data"


def lscpu() -> dict[str, Any]:
    """CPU model and the bf16 features, from ``lscpu``."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {
        "model": fields.get("Model name", platform.processor()).strip(),
        "cpus": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": bool({"amx_bf16", "amx_tile"} & flags),
    }


def group_cpu_seconds(pids: set[int], groups: set[int]) -> float:
    """CPU seconds (user + system) of this process, of ``pids`` and of every process in the
    process ``groups`` (Chromium and its helpers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if pid in pids or int(fields[2]) in groups:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Load:
    """The CPUs other processes kept busy during the timed parts (not this run's server,
    browser or itself), from ``/proc/stat`` and theirs."""

    def __init__(self, server: ServerProcess, browser: Browser) -> None:
        assert server.proc is not None and browser.proc is not None
        self.pids, self.groups = {server.proc.pid}, {browser.proc.pid}
        self.wall = self.busy = self.mine = 0.0
        self._start: tuple[float, float, float] | None = None

    def __enter__(self) -> Load:
        self._start = (time.monotonic(), busy_cpu_seconds() or 0.0, self._mine())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        wall, busy, mine = self._start
        self.wall += time.monotonic() - wall
        self.busy += (busy_cpu_seconds() or 0.0) - busy
        self.mine += self._mine() - mine

    def _mine(self) -> float:
        return group_cpu_seconds(self.pids, self.groups)

    def others(self) -> float | None:
        return round(max(0.0, self.busy - self.mine) / self.wall, 2) if self.wall else None


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    median = statistics.median(ordered)
    return {
        "n": len(ordered),
        "median_ms": round(median, 2),
        "p95_ms": round(p95, 2),
        "max_ms": round(ordered[-1], 2),
        "p95_ratio_to_goal": round(p95 / GOAL_MS, 3),
    }


def study_uid(server: ServerProcess, accession: str) -> str:
    with server.client() as client:
        items = client.get("/api/worklist").json()["items"]
    return str(next(i["StudyInstanceUID"] for i in items if i["AccessionNumber"] == accession))


def open_viewer(browser: Browser, server: ServerProcess, uid: str) -> dict[str, Any]:
    """Open the study in real time (never virtual: ``performance.now()`` stands still in
    virtual time) and wait until every slice is in memory. The state, with the seconds from
    the navigation to the first slice drawn and to every slice loaded (polled every 50 ms)."""
    browser.send("Page.navigate", {"url": "about:blank"})
    started = time.monotonic()
    browser.send("Page.navigate", {"url": f"{server.http_url}/viewer#study={uid}"})
    deadline = started + 600
    state: dict[str, Any] | None = None
    first = None
    while time.monotonic() < deadline:
        time.sleep(0.05)  # a benchmark waits on the wall clock; tests settle in virtual time
        try:
            state = browser.evaluate(
                "window.viewer ? {...viewer.state(), drawn: window.viewerRenders || 0} : null"
            )
        except Exception:  # noqa: BLE001 - the page is between documents
            continue
        if state and state["drawn"] and first is None:
            first = time.monotonic() - started
        if state and state["slices"] and state["loaded"] == state["slices"]:
            state["first_slice_s"] = round(
                first if first is not None else time.monotonic() - started, 2
            )
            state["all_slices_s"] = round(time.monotonic() - started, 2)
            state["manifest_s"] = browser.evaluate(
                "(e => e ? Math.round(e.duration) / 1000 : null)(performance"
                ".getEntriesByType('resource').find(r => r.name.endsWith('/viewer')))"
            )
            return state
    raise RuntimeError(f"slices still loading: {state}")


def timed(browser: Browser, action: str, flush: bool = False) -> float:
    """Run ``action`` (one draw) in the page; the page's own time for it (ms), plus with
    ``flush`` the time of a 1-pixel readback that rasterises the canvas."""
    script = (
        "(() => { const before = window.viewerRenders;"
        f" {action};"
        " if (window.viewerRenders === before) { throw new Error('nothing was drawn'); }"
        " let extra = 0;"
        + (
            " const t = performance.now();"
            " document.getElementById('canvas').getContext('2d').getImageData(0, 0, 1, 1);"
            " extra = performance.now() - t;"
            if flush
            else ""
        )
        + " return window.viewerLastRenderMs + extra; })()"
    )
    value: float = browser.evaluate(script)
    return value


def measure_ct(browser: Browser, slices: int) -> dict[str, Any]:
    n = int(browser.evaluate("viewer.state().slices"))
    steps = min(slices, n - 1)
    out: dict[str, Any] = {"slices_in_series": n}
    for name, overlay, flush in (
        ("overlay_on", True, False),
        ("overlay_off", False, False),
        ("overlay_on_rasterised", True, True),
    ):
        browser.evaluate(f"viewer.setSlice(0); viewer.setOverlayOn({str(overlay).lower()})")
        out[name] = summary([timed(browser, "viewer.step(1)", flush) for _ in range(steps)])
    browser.evaluate("viewer.setOverlayOn(true)")
    return out


def measure_radiograph(browser: Browser, slices: int) -> dict[str, Any]:
    state = browser.evaluate("viewer.state()")
    c, w = state["window"]["center"], state["window"]["width"]
    out: dict[str, Any] = {}
    for name, flush in (("window_change", False), ("window_change_rasterised", True)):
        out[name] = summary(
            [
                timed(browser, f"viewer.setWindow({c}, {w + 1 + i % 7})", flush)
                for i in range(slices)
            ]
        )
    return out


def with_accession(path: Path, accession: str) -> bytes:
    """The file with its AccessionNumber set (to find the study), bytes."""
    ds = pydicom.dcmread(path)
    ds.AccessionNumber = accession
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ct", default=str(SHARED / "cq500-ct0"), help="a series folder or 'synthetic'"
    )
    parser.add_argument("--xray", default=str(SHARED / "xray" / "siim-cr-chest.dcm"))
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--screenshots", type=Path, default=None, help="a folder for a screenshot of each view"
    )
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        sys.exit("Debian's chromium is needed (apt-get install chromium)")

    load_before = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="viewer-bench-") as tmp:
        root = Path(tmp)
        server = ServerProcess(root / "data", SERVER_ENV).start()
        try:
            if args.ct == "synthetic" or not Path(args.ct).is_dir():
                head = write_head_series(root / "ct", bleed=True, accession="BENCH-CT")
                ct_files: list[Path] = head.paths
                ct_source = "synthetic 256² head, 40 slices (tests/e2e/viewer_seed.py)"
            else:
                ct_files = sorted(Path(args.ct).glob("*.dcm")) or sorted(
                    p for p in Path(args.ct).rglob("*") if p.is_file()
                )
                ct_source = args.ct
            ct_bytes = [with_accession(p, "BENCH-CT") for p in ct_files]
            stow(server, ct_bytes)
            ct_uid = study_uid(server, "BENCH-CT")
            analyse(server, ct_uid, blob_haemorrhage())
            cr_uid = None
            if Path(args.xray).is_file():
                stow(
                    server,
                    [radiograph_copy(Path(args.xray), accession="BENCH-CR", description="CR")],
                )
                cr_uid = study_uid(server, "BENCH-CR")
                analyse(
                    server,
                    cr_uid,
                    chest(
                        [
                            Heat("pleural_effusion", "Pleural effusion", 0.8, (20, 44)),
                            Heat("pneumothorax", "Pneumothorax", 0.2, (40, 14)),
                        ]
                    ),
                )
            browser = Browser(root / "chrome").start()
            try:
                browser.set_cookie(SESSION_COOKIE, server.session_cookie(), server.http_url)
                version = browser.send("Browser.getVersion", session=False)["product"]
                load = Load(server, browser)
                ct_state = open_viewer(browser, server, ct_uid)
                with load:
                    ct = measure_ct(browser, args.slices)
                if args.screenshots:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    browser.evaluate(f"viewer.setSlice({ct_state['best_index']})")
                    browser.screenshot(args.screenshots / "viewer-bench-ct.png")
                ct["rows_columns"] = [ct_state["rows"], ct_state["columns"]]
                ct["first_slice_s"] = ct_state["first_slice_s"]
                ct["all_slices_loaded_s"] = ct_state["all_slices_s"]
                ct["manifest_request_s"] = ct_state["manifest_s"]
                cr = None
                if cr_uid is not None:
                    cr_state = open_viewer(browser, server, cr_uid)
                    with load:
                        cr = measure_radiograph(browser, args.slices)
                    if args.screenshots:
                        browser.screenshot(args.screenshots / "viewer-bench-radiograph.png")
                    cr["rows_columns"] = [cr_state["rows"], cr_state["columns"]]
                    cr["first_slice_s"] = cr_state["first_slice_s"]
                    cr["manifest_request_s"] = cr_state["manifest_s"]
            finally:
                browser.close()
        finally:
            server.stop()

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": lscpu(),
        "browser": version,
        "command": " ".join(["python", "bench/viewer_browser.py", *sys.argv[1:]]),
        "ct_source": ct_source,
        "ct": ct,
        "radiograph": cr,
        "goal_ms": GOAL_MS,
        "other_processes_busy_cpus": load.others(),
        "load_average_before_after": [load_before, [round(v, 2) for v in os.getloadavg()]],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
