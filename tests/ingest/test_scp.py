"""The Storage SCP with real DCMTK clients (echoscu, storescu)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from tests.conftest import pydicom_file
from triage.db import Database
from triage.db.tables import InstanceRow
from triage.demo.run import STORESCU_PROPOSE, dcmtk_tool, send_with_pynetdicom
from triage.ingest.scp import ScpOptions, accepts_anyone, parse_networks, start_scp
from triage.ingest.store import Ingestor, quarantine_listing
from triage.serve.launcher import free_port


def make_ingestor(tmp_path: Path) -> Ingestor:
    (tmp_path / "incoming").mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    return Ingestor(db, tmp_path / "dicom", tmp_path / "incoming", tmp_path / "quarantine")


@contextmanager
def running_scp(tmp_path: Path, **options: Any) -> Iterator[tuple[int, Database]]:
    """An SCP on a free port with its own database; ``options`` go to ScpOptions."""
    ingestor = make_ingestor(tmp_path)
    port = free_port()
    server = start_scp(
        ScpOptions(host="127.0.0.1", port=port, ae_title="TRIAGE", **options), ingestor
    )
    try:
        yield port, ingestor.db
    finally:
        server.shutdown()
        ingestor.db.dispose()


@pytest.fixture()
def scp(tmp_path: Path) -> Iterator[tuple[int, Database]]:
    with running_scp(tmp_path) as value:
        yield value


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
        "MR_small_RLE.dcm",  # MR: outside the models' scope, stored all the same
        "693_J2KR.dcm",  # CT, JPEG 2000 lossless: stored as received
        "RG1_J2KI.dcm",  # CR, JPEG 2000
        "SC_rgb_rle.dcm",  # secondary capture, RLE
        "JPEG-LL.dcm",  # JPEG lossless
    ],
)
def test_store_keeps_bytes_in_every_transfer_syntax(
    scp: tuple[int, Database], tmp_path: Path, name: str
) -> None:
    port, db = scp
    src = pydicom_file(name)
    ds = pydicom.dcmread(src)
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


def test_calling_ae_allow_list(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with running_scp(tmp_path, allowed_calling_aets=["PACS1"]) as (port, _):
        echo = [tool("echoscu"), "-aec", "TRIAGE"]
        ok = subprocess.run([*echo, "-aet", "PACS1", "127.0.0.1", str(port)], capture_output=True)
        assert ok.returncode == 0
        bad = subprocess.run(
            [*echo, "-aet", "INTRUDER", "127.0.0.1", str(port)], capture_output=True
        )
        assert bad.returncode != 0
        assert b"Rejected" in bad.stdout + bad.stderr
    assert "calling AE 'INTRUDER'" in caplog.text


def test_peer_address_allow_list(tmp_path: Path) -> None:
    echo = [tool("echoscu"), "-aec", "TRIAGE", "127.0.0.1"]
    with running_scp(tmp_path / "a", allowed_peer_addresses=["10.0.0.0/8"]) as (port, _):
        refused = subprocess.run([*echo, str(port)], capture_output=True)
        assert refused.returncode != 0
    with running_scp(tmp_path / "b", allowed_peer_addresses=["127.0.0.0/8"]) as (port, _):
        subprocess.run([*echo, str(port)], check=True, capture_output=True)


def test_bad_peer_address_setting_is_named() -> None:
    with pytest.raises(ValueError, match="'not-an-ip'"):
        parse_networks(["127.0.0.1", "not-an-ip"])


def test_association_limit(tmp_path: Path) -> None:
    """With max_associations=1 a second concurrent association is rejected."""
    from pynetdicom import AE

    with running_scp(tmp_path, max_associations=1) as (port, _):
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        assert held.is_established
        try:
            second = subprocess.run(
                [tool("echoscu"), "-aec", "TRIAGE", "127.0.0.1", str(port)], capture_output=True
            )
            assert second.returncode != 0
        finally:
            held.release()


def test_dicom_over_tls_with_storescu(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    """TLS on: storescu over TLS with a client certificate stores; plain TCP fails."""
    options = {
        "tls_cert": tls_files["server.pem"],
        "tls_key": tls_files["server.key"],
        "tls_ca": tls_files["ca.pem"],
    }
    src = pydicom_file("CT_small.dcm")
    with running_scp(tmp_path, **options) as (port, db):
        tls = [
            "+tls",
            str(tls_files["client.key"]),
            str(tls_files["client.pem"]),
            "+cf",
            str(tls_files["ca.pem"]),
        ]
        ok = subprocess.run(
            [tool("storescu"), *tls, "-aec", "TRIAGE", "127.0.0.1", str(port), str(src)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        plain = subprocess.run(
            [tool("echoscu"), "-aec", "TRIAGE", "-to", "5", "127.0.0.1", str(port)],
            capture_output=True,
            timeout=60,
        )
        assert plain.returncode != 0
        with db.session() as s:
            (row,) = s.scalars(select(InstanceRow)).all()
        assert pydicom.dcmread(row.path).SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID


def test_tls_needs_both_cert_and_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TRIAGE_DICOM_TLS_KEY"):
        ScpOptions("127.0.0.1", 0, "TRIAGE", tls_cert=tmp_path / "x.pem").ssl_context()


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


def test_maximum_pdu_size_is_announced(tmp_path: Path) -> None:
    """The listener announces TRIAGE_MAX_PDU_BYTES as its maximum PDU length."""
    from pynetdicom import AE

    with running_scp(tmp_path, max_pdu_bytes=32768) as (port, _):
        ae = AE(ae_title="PDU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        try:
            assert assoc.is_established
            assert assoc.acceptor.maximum_length == 32768
        finally:
            assoc.release()


def test_an_open_listener_says_so_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="triage.ingest.scp"):
        with running_scp(tmp_path / "open"):
            pass
    assert "accepts any calling AE title (set TRIAGE_ALLOWED_CALLING_AETS)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="triage.ingest.scp"):
        with running_scp(tmp_path / "closed", allowed_calling_aets=["PACS1"]):
            pass
    assert "accepts" not in caplog.text


def test_the_listener_is_on_loopback_until_a_site_opens_it() -> None:
    from triage.config import Settings

    assert Settings().dicom_host == "127.0.0.1"
    everywhere = ScpOptions(host="0.0.0.0", port=1, ae_title="T", allowed_calling_aets=["P"])
    assert accepts_anyone(everywhere) == "any peer address (set TRIAGE_ALLOWED_PEER_ADDRESSES)"
