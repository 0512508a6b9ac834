"""Malicious input against a running ``triage serve``, through STOW-RS, C-STORE and import:
each is rejected with its reason and kept in quarantine, nothing is written outside the data
directory, and the server keeps serving."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE

from tests.conftest import pydicom_file, run_cli, running_server
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::UserWarning")]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct(**changes: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def malicious_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the reason it must be rejected with)."""
    normal = part10(ct())
    return {
        "sop-uid-traversal": (
            part10(ct(SOPInstanceUID="1.2.3/../../../../../tmp/triage-evil")),
            "SOPInstanceUID contains characters other than digits and dots",
        ),
        "study-uid-traversal": (
            part10(ct(StudyInstanceUID="../../../../etc/cron.d/x")),
            "StudyInstanceUID contains characters other than digits and dots",
        ),
        "absolute-path-uid": (
            part10(ct(SeriesInstanceUID="/etc/passwd")),
            "SeriesInstanceUID contains characters other than digits and dots",
        ),
        "oversized-dimensions": (
            part10(ct(Rows=65535, Columns=65535, NumberOfFrames=100000)),
            "image too large",
        ),
        "truncated-pixel-data": (normal[:-10000], "truncated"),
        "garbage": (random.Random(0).randbytes(4096), "not DICOM"),
        "executable-preamble": (b"MZ\x90\x00" + normal[4:], "preamble holds an executable"),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("malicious")
    with running_server(root / "data", {"TRIAGE_SERIES_QUIET_SECONDS": "3600"}) as srv:
        yield srv


def quarantined(server: ServerProcess) -> list[dict[str, object]]:
    items: list[dict[str, object]] = httpx.get(
        f"{server.http_url}/api/quarantine", headers=server.headers
    ).json()["items"]
    return items


def assert_contained(server: ServerProcess) -> None:
    data_dir = server.data_dir.resolve()
    outside = [p for p in data_dir.parent.rglob("*") if not p.resolve().is_relative_to(data_dir)]
    assert [p.name for p in outside if p.name != data_dir.name] == []
    assert not Path("/tmp/triage-evil").exists()
    assert httpx.get(f"{server.http_url}/api/health").status_code == 200
    assert "Traceback" not in server.log()
    assert (
        httpx.get(f"{server.http_url}/api/worklist", headers=server.headers).json()["items"] == []
    )


@pytest.mark.parametrize("name", sorted(malicious_files()))
def test_stow_rs_rejects(server: ServerProcess, name: str) -> None:
    data, reason = malicious_files()[name]
    before = len(quarantined(server))
    boundary = "evil"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = httpx.post(
        f"{server.http_url}/dicomweb/studies",
        content=body,
        headers={
            **server.headers,
            "Content-Type": f"multipart/related; type=application/dicom; boundary={boundary}",
        },
    )
    assert response.status_code == 409, response.text
    (failed,) = json.loads(response.text)["00081198"]["Value"]
    assert failed["00081197"]["Value"][0] in (0xC000, 0xA900)
    items = quarantined(server)
    assert len(items) == before + 1
    assert reason in str(items[0]["reason"])
    assert_contained(server)


@pytest.mark.parametrize(
    "name", ["sop-uid-traversal", "study-uid-traversal", "oversized-dimensions"]
)
def test_c_store_rejects(server: ServerProcess, name: str) -> None:
    data, reason = malicious_files()[name]
    ds = pydicom.dcmread(io.BytesIO(data))
    ae = AE(ae_title="EVIL")
    ae.add_requested_context(CT_IMAGE_STORAGE, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status in (0xC000, 0xA900)
    assert reason in str(quarantined(server)[0]["reason"])
    assert_contained(server)


def test_import_rejects_all(server: ServerProcess, tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    for name, (data, _) in malicious_files().items():
        (folder / f"{name}.dcm").write_bytes(data)
    before = len(quarantined(server))
    result = run_cli(["import", str(folder)], server.data_dir)
    assert result.returncode == 1
    assert f"{len(malicious_files())} rejected" in result.stdout.replace("\n", " ")
    reasons = [str(item["reason"]) for item in quarantined(server)]
    assert len(reasons) == before + len(malicious_files())
    for _, reason in malicious_files().values():
        assert any(reason in r for r in reasons), reason
    assert_contained(server)
