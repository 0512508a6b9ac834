"""The Storage SCP with real DCMTK clients (echoscu, storescu)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests.conftest import pydicom_file
from triage.db import Database
from triage.db.tables import InstanceRow
from triage.demo.run import STORESCU_PROPOSE, dcmtk_tool, send_with_pynetdicom
from triage.ingest.scp import StoreContext, start_scp
from triage.ingest.store import quarantine_listing
from triage.serve.launcher import free_port


@pytest.fixture()
def scp(tmp_path: Path) -> Iterator[tuple[int, Database]]:
    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    (tmp_path / "incoming").mkdir()
    port = free_port()
    server = start_scp(
        host="127.0.0.1",
        port=port,
        ae_title="TRIAGE",
        ctx=StoreContext(
            db=db,
            store_dir=tmp_path / "dicom",
            tmp_dir=tmp_path / "incoming",
            quarantine_dir=tmp_path / "quarantine",
        ),
    )
    try:
        yield port, db
    finally:
        server.shutdown()
        db.dispose()


def tool(name: str) -> str:
    path = dcmtk_tool(name)
    if path is None:
        pytest.skip(f"DCMTK {name} is not installed (apt-get install dcmtk; .ci/run does)")
    return path


def test_echo(scp: tuple[int, Database]) -> None:
    port, _ = scp
    subprocess.run([tool("echoscu"), "-aec", "TRIAGE", "127.0.0.1", str(port)], check=True)


def test_wrong_called_ae_title_is_rejected(scp: tuple[int, Database]) -> None:
    port, _ = scp
    res = subprocess.run(
        [tool("echoscu"), "-aec", "SOMEONE", "127.0.0.1", str(port)], capture_output=True
    )
    assert res.returncode != 0


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # CT, explicit little endian
        "MR_small_RLE.dcm",  # MR is not a stored class: refused by the SCP
        "693_J2KR.dcm",  # CT, JPEG 2000 lossless: stored as received
        "RG1_J2KI.dcm",  # CR, JPEG 2000
        "SC_rgb_rle.dcm",  # secondary capture, RLE
        "JPEG-LL.dcm",  # JPEG lossless
    ],
)
def test_store_keeps_bytes_of_accepted_classes(
    scp: tuple[int, Database], tmp_path: Path, name: str
) -> None:
    port, db = scp
    src = pydicom_file(name)
    ds = pydicom.dcmread(src)
    accepted = ds.SOPClassUID.name.startswith(("CT", "Secondary", "Computed", "Digital X-Ray"))
    res = subprocess.run(
        [
            tool("storescu"),
            STORESCU_PROPOSE.get(str(ds.file_meta.TransferSyntaxUID), "-xe"),
            "-aec",
            "TRIAGE",
            "127.0.0.1",
            str(port),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    with db.session() as s:
        rows = s.scalars(select(InstanceRow)).all()
    if not accepted:
        assert rows == []
        return
    assert res.returncode == 0, res.stderr
    assert len(rows) == 1
    stored = pydicom.dcmread(rows[0].path)
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == rows[0].TransferSyntaxUID
    assert stored.pixel_array.shape == ds.pixel_array.shape


def test_rejected_instance_gets_a_failure_status_and_is_quarantined(
    scp: tuple[int, Database], tmp_path: Path
) -> None:
    port, db = scp
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID = "1.2.840.9999." + "1" * 60  # 73 characters: not a valid UID
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    res = subprocess.run(
        [tool("storescu"), "-v", "-aec", "TRIAGE", "127.0.0.1", str(port), str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0  # storescu saw the failure status (0xC000)
    assert "Error: CannotUnderstand" in res.stdout + res.stderr
    with db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []
    (item,) = quarantine_listing(db)["items"]
    assert "at most 64" in str(item["reason"])
    assert item["source"] == "dicom:STORESCU"


def test_calling_ae_allow_list(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    port = free_port()
    ctx = StoreContext(
        db=db,
        store_dir=tmp_path / "dicom",
        tmp_dir=tmp_path / "incoming",
        quarantine_dir=tmp_path / "quarantine",
    )
    server = start_scp(
        host="127.0.0.1", port=port, ae_title="TRIAGE", ctx=ctx, allowed_calling_aets=["PACS1"]
    )
    try:
        echo = [tool("echoscu"), "-aec", "TRIAGE"]
        ok = subprocess.run([*echo, "-aet", "PACS1", "127.0.0.1", str(port)], capture_output=True)
        assert ok.returncode == 0
        bad = subprocess.run(
            [*echo, "-aet", "INTRUDER", "127.0.0.1", str(port)], capture_output=True
        )
        assert bad.returncode != 0
        assert b"Rejected" in bad.stdout + bad.stderr
    finally:
        server.shutdown()
        db.dispose()


def test_pynetdicom_fallback_sends_compressed_files_as_they_are(
    scp: tuple[int, Database],
) -> None:
    """The demo's sender when DCMTK is absent: each file in its own transfer syntax."""
    port, db = scp
    files = [pydicom_file("RG1_J2KI.dcm"), pydicom_file("CT_small.dcm")]
    send_with_pynetdicom(files, host="127.0.0.1", port=port, called_ae="TRIAGE")
    with db.session() as s:
        rows = s.scalars(select(InstanceRow).order_by(InstanceRow.id)).all()
    assert [pydicom.dcmread(r.path).pixel_array.shape for r in rows] == [
        pydicom.dcmread(f).pixel_array.shape for f in files
    ]
    assert [r.TransferSyntaxUID for r in rows] == [
        str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files
    ]
