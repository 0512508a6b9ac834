"""Malformed input and Deflate bombs against a running ``triage serve``, over STOW-RS (HTTP)
and C-STORE: every one refused with 0xC000 and its reason, kept in quarantine, never 0xA700;
the server's peak resident memory stays far below what inflating the bombs would take, and
it keeps serving."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_server
from tests.ingest.malformed import families
from tests.ingest.test_malformed import (
    BOMBS,
    BOUNDARY,
    C_STORE_FAMILIES,
    LIMITS,
    PEAK_CEILING,
    c_store_raw,
    multipart,
)
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("malformed")
    env = {f"TRIAGE_{k.upper()}": str(v) for k, v in LIMITS.items()}
    with running_server(root / "data", {"TRIAGE_SERIES_QUIET_SECONDS": "3600", **env}) as srv:
        yield srv


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[bytes, str]]:
    return families() | {name: (build(), phrase) for name, (build, phrase) in BOMBS.items()}


def reset_peak(server: ServerProcess) -> int:
    """Reset the server's VmHWM; its resident memory now, in bytes."""
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status")
    try:
        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")
    except OSError:
        pytest.skip("the server's peak resident memory cannot be reset here")
    match = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.MULTILINE)
    assert match
    return int(match.group(1)) * 1024


def peak_growth(server: ServerProcess, start: int) -> int:
    peak = server.peak_rss_mb()
    assert peak is not None
    return int(peak * 1024**2) - start


def quarantined(server: ServerProcess) -> list[dict[str, object]]:
    items: list[dict[str, object]] = httpx.get(
        f"{server.http_url}/api/quarantine", headers=server.headers
    ).json()["items"]
    return items


def assert_serving(server: ServerProcess) -> None:
    assert httpx.get(f"{server.http_url}/api/health").status_code == 200
    assert "Traceback" not in server.log()
    assert (
        httpx.get(f"{server.http_url}/api/worklist", headers=server.headers).json()["items"] == []
    )
    assert all(item["status"] == "0xC000" for item in quarantined(server))


def test_stow_rs_over_http(server: ServerProcess, cases: dict[str, tuple[bytes, str]]) -> None:
    before = len(quarantined(server))
    start = reset_peak(server)
    response = httpx.post(
        f"{server.http_url}/dicomweb/studies",
        content=multipart([data for data, _ in cases.values()]),
        headers={
            **server.headers,
            "Content-Type": f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
        },
        timeout=120,
    )
    growth = peak_growth(server, start)
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000] * len(cases)
    assert growth < PEAK_CEILING, growth
    reasons = [str(item["reason"]) for item in quarantined(server)]
    assert len(reasons) == before + len(cases)
    for name, (_, phrase) in cases.items():
        assert any(phrase in r for r in reasons), name
    assert_serving(server)


def test_c_store(
    server: ServerProcess,
    cases: dict[str, tuple[bytes, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = [n for n in cases if n in C_STORE_FAMILIES or n in BOMBS]
    files = []
    for name in names:
        (tmp_path / f"{name}.dcm").write_bytes(cases[name][0])
        files.append(tmp_path / f"{name}.dcm")
    before = len(quarantined(server))
    start = reset_peak(server)
    statuses = c_store_raw(server.dicom_port, files, monkeypatch, called_ae=server.ae_title)
    growth = peak_growth(server, start)
    assert statuses == [0xC000] * len(files), dict(zip(names, statuses, strict=True))
    assert growth < PEAK_CEILING, growth
    items = quarantined(server)
    assert len(items) == before + len(files)
    for name in names:
        assert any(cases[name][1] in str(i["reason"]) for i in items), name
    assert_serving(server)
