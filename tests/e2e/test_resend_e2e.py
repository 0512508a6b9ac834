"""The same instance by two routes (C-STORE with storescu, then STOW-RS): a harmless resend,
although pynetdicom and the STOW-RS client wrote different file meta headers. A different
instance under the same SOPInstanceUID is kept in quarantine with the attributes that
differ named."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import pydicom_file, running_server
from tests.e2e.conftest import send
from triage.serve.launcher import ServerProcess

pytestmark = [pytest.mark.e2e]
BOUNDARY = "resend-e2e"


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "data", {"TRIAGE_SERIES_QUIET_SECONDS": "3600"}) as srv:
        yield srv


def stow(server: ServerProcess, data: bytes) -> httpx.Response:
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return httpx.post(
        f"{server.http_url}/dicomweb/studies",
        content=body,
        headers={
            **server.headers,
            "Content-Type": f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
        },
        timeout=60,
    )


def test_c_store_then_stow_rs_of_the_same_instance(
    server: ServerProcess, storescu: str, tmp_path: Path
) -> None:
    source = pydicom_file("CT_small.dcm")
    send(storescu, server, [source])
    assert (
        len(httpx.get(f"{server.http_url}/api/worklist", headers=server.headers).json()["items"])
        == 1
    )

    ds = pydicom.dcmread(source)
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.9999"  # another writer
    ds.file_meta.SourceApplicationEntityTitle = "OTHER_PACS"
    resent = io.BytesIO()
    ds.save_as(resent, enforce_file_format=True)
    response = stow(server, resent.getvalue())
    assert response.status_code == 200, response.text
    assert (
        httpx.get(f"{server.http_url}/api/quarantine", headers=server.headers).json()["items"] == []
    )

    ds.StudyDescription = "CHANGED"
    changed = io.BytesIO()
    ds.save_as(changed, enforce_file_format=True)
    response = stow(server, changed.getvalue())
    assert response.status_code == 200, response.text  # keep_first: the sender is not failed
    (kept,) = httpx.get(f"{server.http_url}/api/quarantine", headers=server.headers).json()["items"]
    assert "differs in StudyDescription" in str(kept["reason"])
    assert "CHANGED" not in str(kept["reason"])
    assert (
        len(httpx.get(f"{server.http_url}/api/worklist", headers=server.headers).json()["items"])
        == 1
    )
