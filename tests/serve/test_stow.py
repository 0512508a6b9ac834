"""DICOMweb STOW-RS (``POST /dicomweb/studies``): real files, real database, real store."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.conftest import pydicom_file, running_server
from tests.signin import auth_headers
from triage.auth.roles import Role
from triage.db import Database
from triage.db.tables import InstanceRow, QuarantineRow
from triage.ingest.store import Ingestor, StoreStatus, quarantine_listing
from triage.serve.app import create_app
from triage.serve.multipart import MultipartError, parse_media_type, split_multipart

BOUNDARY = "triage-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

# Tags of the Store Instances Response Module (PS3.18 Table I.1-1), as in DICOM JSON.
RETRIEVE_URL = "00081190"
REFERENCED_SOP_SEQ = "00081199"
FAILED_SOP_SEQ = "00081198"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"


def multipart_body(
    parts: Sequence[bytes | tuple[str | None, bytes]],
    boundary: str = BOUNDARY,
    *,
    newline: bytes = b"\r\n",
    preamble: bytes = b"",
    epilogue: bytes = b"",
) -> bytes:
    """A multipart/related body; a bare ``bytes`` part is sent as application/dicom, a
    ``(media type, bytes)`` part with that Content-Type (None: no headers at all)."""
    delim = b"--" + boundary.encode()
    out = bytearray(preamble + (newline if preamble else b""))
    for part in parts:
        media_type, data = ("application/dicom", part) if isinstance(part, bytes) else part
        out += delim + newline
        if media_type is not None:
            out += f"Content-Type: {media_type}".encode() + newline
        out += newline + data + newline
    out += delim + b"--" + newline + epilogue
    return bytes(out)


def ct_bytes(**changes: str) -> bytes:
    """CT_small.dcm as a Part 10 file, with attributes changed (new SOPInstanceUID etc.)."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def header(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(data), stop_before_pixels=True)


@dataclass
class Stow:
    db: Database
    client: TestClient

    def post(
        self,
        body: bytes | Iterator[bytes],
        *,
        content_type: str = MULTIPART,
        study_uid: str | None = None,
    ) -> httpx.Response:
        url = "/dicomweb/studies" + (f"/{study_uid}" if study_uid else "")
        return self.client.post(url, content=body, headers={"Content-Type": content_type})

    def instances(self) -> list[InstanceRow]:
        with self.db.session() as s:
            return list(s.scalars(select(InstanceRow).order_by(InstanceRow.id)).all())

    def quarantined(self) -> list[dict[str, Any]]:
        return list(reversed(quarantine_listing(self.db)["items"]))


def make_stow(tmp_path: Path, *, max_upload_bytes: int = 64 * 1024**2, **opts: Any) -> Stow:
    (tmp_path / "incoming").mkdir(parents=True)
    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    ingestor = Ingestor(
        db,
        tmp_path / "dicom",
        tmp_path / "incoming",
        tmp_path / "quarantine",
        **{"min_free_bytes": 0, **opts},
    )
    app = create_app(db, ingestor=ingestor, max_upload_bytes=max_upload_bytes)
    # STOW-RS needs the ingest permission: a PACS's integration account signs in by token.
    return Stow(db, TestClient(app, headers=auth_headers(db, "pacs", Role.integration)))


@pytest.fixture()
def stow(tmp_path: Path) -> Stow:
    return make_stow(tmp_path)


@pytest.fixture(scope="module")
def ct() -> bytes:
    return pydicom_file("CT_small.dcm").read_bytes()


@pytest.fixture(scope="module")
def cr() -> bytes:
    return pydicom_file("RG1_J2KI.dcm").read_bytes()


def items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(doc.get(tag, {}).get("Value", []))


def uid_of(item: dict[str, Any], tag: str) -> str | None:
    value = item.get(tag, {}).get("Value")
    return str(value[0]) if value else None


def test_two_good_parts_are_stored_byte_for_byte(stow: Stow, ct: bytes, cr: bytes) -> None:
    resp = stow.post(multipart_body([ct, cr]))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/dicom+json")
    assert "warning" not in resp.headers
    doc = resp.json()
    assert FAILED_SOP_SEQ not in doc
    assert doc[RETRIEVE_URL] == {"vr": "UR"}  # Type 2, empty: no WADO-RS here
    refs = items(doc, REFERENCED_SOP_SEQ)
    expected = [(str(header(d).SOPClassUID), str(header(d).SOPInstanceUID)) for d in (ct, cr)]
    assert [(uid_of(i, SOP_CLASS), uid_of(i, SOP_INSTANCE)) for i in refs] == expected
    assert all(WARNING_REASON not in i for i in refs)

    rows = stow.instances()
    assert [r.SOPInstanceUID for r in rows] == [uid for _, uid in expected]
    for row, data in zip(rows, (ct, cr), strict=True):
        assert Path(row.path).read_bytes() == data
        assert row.sha256 == hashlib.sha256(data).hexdigest()
        assert row.source == "stow:testclient"
    assert stow.quarantined() == []


def test_good_and_garbage_is_202_and_the_garbage_is_quarantined(stow: Stow, ct: bytes) -> None:
    garbage = b"\r\n--not dicom--\r\n" + bytes(range(256)) * 4
    resp = stow.post(multipart_body([ct, garbage]))
    assert resp.status_code == 202, resp.text
    assert resp.headers["warning"] == ('299 triage "1 instance(s) failed; see GET /api/quarantine"')
    doc = resp.json()
    assert [uid_of(i, SOP_INSTANCE) for i in items(doc, REFERENCED_SOP_SEQ)] == [
        str(header(ct).SOPInstanceUID)
    ]
    (failed,) = items(doc, FAILED_SOP_SEQ)
    assert failed[FAILURE_REASON]["Value"] == [0xC000]
    assert SOP_INSTANCE not in failed and SOP_CLASS not in failed  # unknown: left out
    assert len(stow.instances()) == 1
    (q,) = stow.quarantined()
    assert q["status"] == "0xC000" and q["source"] == "stow:testclient"
    assert q["sha256"] == hashlib.sha256(garbage).hexdigest()
    assert q["size_bytes"] == len(garbage)


def test_all_bad_is_409(stow: Stow) -> None:
    resp = stow.post(multipart_body([b"nope", b"\x00" * 300]))
    assert resp.status_code == 409, resp.text
    doc = resp.json()
    assert REFERENCED_SOP_SEQ not in doc
    assert [i[FAILURE_REASON]["Value"] for i in items(doc, FAILED_SOP_SEQ)] == [[0xC000]] * 2
    assert "2 instance(s) failed" in resp.headers["warning"]
    assert stow.instances() == []
    assert len(stow.quarantined()) == 2


def test_stored_with_a_warning_is_202_with_warning_reason(stow: Stow) -> None:
    data = ct_bytes(Modality="MR", SOPInstanceUID=pydicom.uid.generate_uid())
    resp = stow.post(multipart_body([data]))
    assert resp.status_code == 202, resp.text
    assert "warning" not in resp.headers  # nothing failed
    (ref,) = items(resp.json(), REFERENCED_SOP_SEQ)
    assert ref[WARNING_REASON]["Value"] == [0xB007]
    assert len(stow.instances()) == 1


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        f"multipart/mixed; boundary={BOUNDARY}",
        f"multipart/related; type=application/dicom+json; boundary={BOUNDARY}",
        f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}',
        "",
    ],
)
def test_other_request_media_types_are_415(stow: Stow, ct: bytes, content_type: str) -> None:
    resp = stow.post(multipart_body([ct]), content_type=content_type)
    assert resp.status_code == 415, resp.text
    assert stow.instances() == []


@pytest.mark.parametrize(
    "content_type",
    [
        f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
        f"Multipart/Related; boundary={BOUNDARY}; type=application/dicom",
        f"multipart/related; boundary={BOUNDARY}",
        f'multipart/related;type="application/dicom";boundary="{BOUNDARY}";start="<1@x>"',
    ],
)
def test_request_content_type_variants_are_accepted(
    stow: Stow, ct: bytes, content_type: str
) -> None:
    resp = stow.post(multipart_body([ct]), content_type=content_type)
    assert resp.status_code == 200, resp.text
    assert len(stow.instances()) == 1


def test_body_over_the_limit_is_413_and_nothing_is_stored(
    tmp_path: Path, ct: bytes, cr: bytes
) -> None:
    body = multipart_body([ct, cr])
    stow = make_stow(tmp_path, max_upload_bytes=len(body) - 1)
    resp = stow.post(body)  # Content-Length announces too much: refused before reading
    assert resp.status_code == 413, resp.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    resp = stow.post(chunks())
    assert resp.status_code == 413, resp.text
    assert stow.instances() == [] and stow.quarantined() == []
    with stow.db.session() as s:
        assert s.scalar(select(func.count()).select_from(QuarantineRow)) == 0

    resp = make_stow(tmp_path / "exact", max_upload_bytes=len(body)).post(chunks())
    assert resp.status_code == 200, resp.text  # exactly at the limit is fine


def test_study_uid_in_path_refuses_other_studies_into_quarantine(
    stow: Stow, ct: bytes, cr: bytes
) -> None:
    study = str(header(ct).StudyInstanceUID)
    assert str(header(cr).StudyInstanceUID) != study
    resp = stow.post(multipart_body([ct, cr]), study_uid=study)
    assert resp.status_code == 202, resp.text
    doc = resp.json()
    assert [uid_of(i, SOP_INSTANCE) for i in items(doc, REFERENCED_SOP_SEQ)] == [
        str(header(ct).SOPInstanceUID)
    ]
    (failed,) = items(doc, FAILED_SOP_SEQ)
    assert failed[FAILURE_REASON]["Value"] == [0xA900]
    assert uid_of(failed, SOP_INSTANCE) == str(header(cr).SOPInstanceUID)
    assert uid_of(failed, SOP_CLASS) == str(header(cr).SOPClassUID)

    assert [r.SOPInstanceUID for r in stow.instances()] == [str(header(ct).SOPInstanceUID)]
    (q,) = stow.quarantined()
    assert q["status"] == "0xA900" and "StudyInstanceUID differs" in q["reason"]
    assert q["sha256"] == hashlib.sha256(cr).hexdigest()
    with stow.db.session() as s:
        kept = s.scalar(select(QuarantineRow.path))
    assert kept is not None and Path(kept).read_bytes() == cr

    resp = stow.post(multipart_body([cr]), study_uid=study)  # only the other study
    assert resp.status_code == 409, resp.text


def test_study_uid_in_path_must_be_a_uid(stow: Stow, ct: bytes) -> None:
    resp = stow.post(multipart_body([ct]), study_uid="not-a-uid")
    assert resp.status_code == 400, resp.text
    assert stow.instances() == []


def test_resending_the_same_instances_is_200(stow: Stow, ct: bytes, cr: bytes) -> None:
    body = multipart_body([ct, cr])
    assert stow.post(body).status_code == 200
    resp = stow.post(body)
    assert resp.status_code == 200, resp.text
    assert len(items(resp.json(), REFERENCED_SOP_SEQ)) == 2
    assert len(stow.instances()) == 2
    assert stow.quarantined() == []


def test_metadata_part_is_a_failed_entry(stow: Stow, ct: bytes) -> None:
    metadata = b'[{"00100010": {"vr": "PN"}}]'
    resp = stow.post(multipart_body([ct, ("application/dicom+json", metadata)]))
    assert resp.status_code == 202, resp.text
    (failed,) = items(resp.json(), FAILED_SOP_SEQ)
    assert failed[FAILURE_REASON]["Value"] == [0xC000]
    (q,) = stow.quarantined()
    assert "unsupported part media type" in q["reason"]
    assert q["sha256"] == hashlib.sha256(metadata).hexdigest()

    resp = stow.post(multipart_body([("application/octet-stream", ct)]))
    assert resp.status_code == 409, resp.text
    assert len(stow.instances()) == 1


def test_part_header_variants(stow: Stow, ct: bytes) -> None:
    other = ct_bytes(SOPInstanceUID=pydicom.uid.generate_uid())
    third = ct_bytes(SOPInstanceUID=pydicom.uid.generate_uid())
    body = multipart_body(
        [
            ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", ct),
            (None, other),  # no part headers: taken as application/dicom
            ("Application/DICOM", third),
        ],
        preamble=b"This is a preamble.",
        epilogue=b"and an epilogue\r\n",
    )
    resp = stow.post(body)
    assert resp.status_code == 200, resp.text
    rows = stow.instances()
    assert [Path(r.path).read_bytes() for r in rows] == [ct, other, third]


def test_below_the_disk_reserve_is_503_with_retry_after(tmp_path: Path, ct: bytes) -> None:
    stow = make_stow(tmp_path, min_free_bytes=2**62)
    resp = stow.post(multipart_body([ct]))
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "60"
    assert "disk" in resp.json()["detail"]
    assert stow.instances() == []
    assert stow.quarantined() == []
    assert list((tmp_path / "incoming").iterdir()) == []


def test_a_body_that_would_cross_the_disk_reserve_is_refused_before_it_is_read(
    tmp_path: Path, ct: bytes
) -> None:
    body = multipart_body([ct, ("application/octet-stream", b"\0" * 8 * 1024**2)])
    free = shutil.disk_usage(tmp_path).free
    # Free now, but not once this body is written: refused from its Content-Length.
    stow = make_stow(tmp_path, min_free_bytes=free - len(body) // 2)
    resp = stow.post(body)
    assert resp.status_code == 503, resp.text
    assert stow.instances() == [] and stow.quarantined() == []
    assert list((tmp_path / "incoming").iterdir()) == []


def test_a_non_dicom_part_below_the_disk_reserve_is_not_quarantined(tmp_path: Path) -> None:
    stow = make_stow(tmp_path, min_free_bytes=2**62)
    ingestor: Ingestor = stow.client.app.state.ingestor  # type: ignore[attr-defined]
    outcome = ingestor.refuse(
        b"%PDF-1.4", source="stow:test", reason="not DICOM", status=StoreStatus.cannot_understand
    )
    assert outcome.status == StoreStatus.out_of_resources
    assert outcome.quarantine_id is None
    assert stow.quarantined() == []


def test_a_part_whose_content_length_disagrees_is_refused_and_kept(stow: Stow, ct: bytes) -> None:
    delim = f"--{BOUNDARY}".encode()
    body = (
        delim
        + b"\r\nContent-Type: application/dicom\r\nContent-Length: 10737418240\r\n\r\n"
        + ct
        + b"\r\n"
        + delim
        + b"--\r\n"
    )
    resp = stow.post(body)
    assert resp.status_code == 409, resp.text
    (failed,) = items(resp.json(), FAILED_SOP_SEQ)
    assert failed[FAILURE_REASON]["Value"] == [0xC000]
    (kept,) = stow.quarantined()
    assert "Content-Length 10737418240" in str(kept["reason"])
    assert kept["size_bytes"] == len(ct)
    assert stow.instances() == []


def test_a_part_with_a_matching_content_length_is_stored(stow: Stow, ct: bytes) -> None:
    delim = f"--{BOUNDARY}".encode()
    head = f"\r\nContent-Type: application/dicom\r\nContent-Length: {len(ct)}\r\n\r\n"
    resp = stow.post(delim + head.encode() + ct + b"\r\n" + delim + b"--\r\n")
    assert resp.status_code == 200, resp.text
    assert len(stow.instances()) == 1


def test_the_spooled_body_is_removed_after_every_request(
    stow: Stow, ct: bytes, tmp_path: Path
) -> None:
    assert stow.post(multipart_body([ct])).status_code == 200
    assert stow.post(b"not multipart at all").status_code == 400
    assert stow.post(multipart_body([("text/plain", b"x")])).status_code == 409
    assert list((tmp_path / "incoming").iterdir()) == []


def test_a_database_failure_is_out_of_resources_not_a_500(stow: Stow, ct: bytes) -> None:
    with stow.db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE instances")
    resp = stow.post(multipart_body([ct]))
    assert resp.status_code == 503, resp.text
    (failed,) = items(resp.json(), FAILED_SOP_SEQ)
    assert failed[FAILURE_REASON]["Value"] == [0xA700]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/related; type=application/dicom", b"--x\r\n\r\nabc\r\n--x--\r\n"),
        (MULTIPART, b""),
        (MULTIPART, b"no boundary anywhere"),
        (MULTIPART, f"--{BOUNDARY}--\r\n".encode()),
        (MULTIPART, f"--{BOUNDARY}\r\n\r\ntruncated part".encode()),
        (MULTIPART, f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\nbody".encode()),
    ],
)
def test_unparseable_multipart_is_400(stow: Stow, content_type: str, body: bytes) -> None:
    resp = stow.post(body, content_type=content_type)
    assert resp.status_code == 400, resp.text
    assert stow.instances() == [] and stow.quarantined() == []


# The multipart parser alone: binary safety, line endings, look-alike boundaries.


def contents(body: bytes, boundary: str = BOUNDARY) -> list[bytes]:
    return [body[p.start : p.end] for p in split_multipart(body, boundary)]


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"])
def test_split_multipart_is_binary_safe(newline: bytes) -> None:
    tricky = [
        b"",
        b"\r\n",
        b"\r\n\r\n",
        b"\n--" + BOUNDARY.encode() + b"x not a delimiter\r\n",
        b"\r\n--" + BOUNDARY.encode() + b"-- also not one",
        bytes(range(256)) * 50,
        b"ends with CR\r",
    ]
    if newline == b"\n":
        tricky.pop()  # a bare-LF sender's trailing CR is indistinguishable from CRLF
    parts = [("application/dicom", t) for t in tricky]
    assert contents(multipart_body(parts, newline=newline)) == tricky


def test_split_multipart_headers_and_close_variants() -> None:
    body = (
        b"--b  \r\nContent-Type: application/dicom+json;\r\n charset=utf-8\r\n"
        b"Content-Location: x\r\n\r\nONE\r\n--b\r\n\r\nTWO\r\n--b"
    )
    one, two = split_multipart(body, "b")
    assert one.headers == {
        "content-type": "application/dicom+json; charset=utf-8",
        "content-location": "x",
    }
    assert one.media_type == "application/dicom+json"
    assert two.headers == {} and two.media_type == "application/dicom"
    assert [body[p.start : p.end] for p in (one, two)] == [b"ONE", b"TWO"]
    with pytest.raises(MultipartError):
        split_multipart(b"--b\r\nno blank line\r\n--b--", "b")
    with pytest.raises(MultipartError):
        split_multipart(b"--b\r\n\r\nx\r\n--b--", "")


def test_split_multipart_many_parts_and_look_alike_boundaries() -> None:
    many = multipart_body([b"x"] * 20_000)
    decoy = (b"\r\n--" + BOUNDARY.encode() + b"X") * 200_000
    big = multipart_body([decoy])
    assert len(split_multipart(many, BOUNDARY)) == 20_000
    (part,) = split_multipart(big, BOUNDARY)
    assert big[part.start : part.end] == decoy


def test_parse_media_type() -> None:
    assert parse_media_type('Multipart/Related; Type="application/dicom"; boundary="a;b\\"c"') == (
        "multipart/related",
        {"type": "application/dicom", "boundary": 'a;b"c'},
    )
    assert parse_media_type("multipart/related;type=application/dicom;boundary=x") == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "x"},
    )
    assert parse_media_type("") == ("", {})


@pytest.mark.e2e
def test_stow_to_the_real_server_lists_the_study(tmp_path: Path, ct: bytes, cr: bytes) -> None:
    with running_server(tmp_path, env={"TRIAGE_SERIES_QUIET_SECONDS": "60"}) as srv:
        resp = httpx.post(
            f"{srv.http_url}/dicomweb/studies",
            content=multipart_body([ct, cr]),
            headers={**srv.headers, "Content-Type": MULTIPART},
            timeout=60,
        )
        assert resp.status_code == 200, f"{resp.text}\n{srv.log()[-4000:]}"
        assert len(items(resp.json(), REFERENCED_SOP_SEQ)) == 2
        worklist = httpx.get(f"{srv.http_url}/api/worklist", headers=srv.headers, timeout=10).json()
        listed = {item["StudyInstanceUID"] for item in worklist["items"]}
        expected = {str(header(ct).StudyInstanceUID), str(header(cr).StudyInstanceUID)}
        assert listed == expected
        assert all(item["ai_status"] == "pending" for item in worklist["items"])
