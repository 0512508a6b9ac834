"""Malformed input and Deflate bombs through every entry point: ``Ingestor.ingest``, a real
C-STORE SCP (pynetdicom sending the files' bytes as they are), STOW-RS and ``triage import``.

Each is refused with 0xC000 and a reason naming what is wrong, and kept in quarantine; 0xA700
(retry) stays for what a retry can cure. Bombs are refused without being inflated: the peak
resident memory (VmHWM, reset before each ingest) stays far below the inflated size.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from sqlalchemy import select

from tests.conftest import run_cli
from tests.ingest.malformed import (
    DEFLATED,
    MiB,
    ct,
    families,
    many_elements_bomb,
    nested,
    part10,
    pixel_bomb,
    private_bomb,
    split,
    with_elements,
)
from tests.signin import auth_headers
from triage.auth.roles import Role
from triage.config import Settings
from triage.db import Database
from triage.db.tables import InstanceRow, QuarantineRow
from triage.ingest.scp import ScpOptions, start_scp
from triage.ingest.store import Ingestor, StoreStatus, quarantine_listing
from triage.serve.app import create_app
from triage.serve.launcher import free_port

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Bombs inflate to 320 MiB; the limits below refuse them after at most 32 MiB inflated.
BOMB_BYTES = 320 * MiB
LIMITS = {"max_inflated_bytes": 32 * MiB, "max_element_bytes": 16 * MiB}
PEAK_CEILING = 96 * MiB  # growth of the peak resident memory allowed while refusing a bomb
BOMBS: dict[str, tuple[Callable[[], bytes], str]] = {
    "pixel-data-bomb": (
        lambda: pixel_bomb(BOMB_BYTES),
        "Deflate data set too large: PixelData (7FE0,0010) declares 335544320 bytes, past the"
        " 33554432-byte ceiling",
    ),
    "private-element-bomb": (
        lambda: private_bomb(BOMB_BYTES),
        "element too large: (0009,1010) declares 335544320 bytes, over the 16777216-byte",
    ),
    "many-elements-bomb": (
        lambda: many_elements_bomb(80, 4 * MiB),
        # seven elements (28 MiB) are inflated, the eighth would pass the budget
        "Deflate data set too large: (0009,1007) declares 4194304 bytes, past the 33554432",
    ),
}


def make_ingestor(root: Path, **options: Any) -> Ingestor:
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite:///{root / 'triage.db'}")
    db.migrate()
    return Ingestor(
        db, root / "dicom", root / "incoming", root / "quarantine", **{**LIMITS, **options}
    )


@pytest.fixture()
def ingestor(tmp_path: Path) -> Iterator[Ingestor]:
    ing = make_ingestor(tmp_path)
    try:
        yield ing
    finally:
        ing.db.dispose()


def assert_kept(db: Database, data: bytes, reason: str, status: str = "0xC000") -> None:
    """A quarantine record for exactly these bytes, with the reason and status, and the
    bytes kept under the quarantine folder."""
    digest = hashlib.sha256(data).hexdigest()
    items = [i for i in quarantine_listing(db)["items"] if i["sha256"] == digest]
    assert len(items) == 1, items
    assert reason in str(items[0]["reason"])
    assert items[0]["status"] == status
    assert "internal error" not in str(items[0]["reason"])
    with db.session() as s:
        kept = Path(
            s.scalars(select(QuarantineRow.path).where(QuarantineRow.id == items[0]["id"])).one()
        )
    assert kept.read_bytes() == data


def assert_kept_as_sent(db: Database, data: bytes, reason: str) -> None:
    """C-STORE: the receiver rebuilds the file meta, so the record kept is the data set as
    sent (``data`` without its meta) behind new file meta."""
    _, data_set = split(data)
    with db.session() as s:
        rows = s.execute(
            select(QuarantineRow.path, QuarantineRow.reason, QuarantineRow.status_code)
        ).all()
    matches = [r for r in rows if Path(r.path).read_bytes().endswith(data_set)]
    assert len(matches) == 1, reason
    assert reason in matches[0].reason and matches[0].status_code == 0xC000


def stored(db: Database) -> list[InstanceRow]:
    with db.session() as s:
        return list(s.scalars(select(InstanceRow)).all())


# --- the families, straight through Ingestor.ingest -------------------------------------


@pytest.mark.parametrize("name", sorted(families()))
def test_malformed_input_is_refused_with_its_reason_and_kept(ingestor: Ingestor, name: str) -> None:
    data, phrase = families()[name]
    outcome = ingestor.ingest(data, source="probe")
    assert outcome.status == StoreStatus.cannot_understand, outcome.reason
    assert phrase in outcome.reason
    assert outcome.quarantine_id is not None
    assert_kept(ingestor.db, data, phrase)
    assert stored(ingestor.db) == []


def test_low_disk_is_still_out_of_resources(tmp_path: Path) -> None:
    """A retry cures low disk: 0xA700, and nothing is kept (the sender still has it)."""
    ing = make_ingestor(tmp_path, min_free_bytes=2**62)
    for data in (part10(ct()), families()["deflate-corrupt"][0]):
        outcome = ing.ingest(data, source="probe")
        assert outcome.status == StoreStatus.out_of_resources
        assert "disk free" in outcome.reason
    assert quarantine_listing(ing.db)["items"] == []
    assert stored(ing.db) == []


def test_refused_input_that_cannot_be_kept_is_out_of_resources(tmp_path: Path) -> None:
    """Refusing means keeping the bytes; when quarantine cannot (its folder is a file here,
    as with a failing disk), the answer is 0xA700 so that the sender keeps the instance."""
    ing = make_ingestor(tmp_path)
    ing.quarantine_dir.write_bytes(b"not a folder")
    outcome = ing.ingest(families()["unknown-vr"][0], source="probe")
    assert outcome.status == StoreStatus.out_of_resources
    assert "unknown VR" in outcome.reason and "could not be kept in quarantine" in outcome.reason


def test_a_transient_database_failure_is_out_of_resources(ingestor: Ingestor) -> None:
    with ingestor.db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE instances")
    outcome = ingestor.ingest(part10(ct()), source="probe")
    assert outcome.status == StoreStatus.out_of_resources
    assert outcome.reason.endswith("retry later")


@pytest.mark.parametrize(
    "uid", ["1.2.0.3", "0.1.2", "1.2.840.10008.0", "2.25.329800735698586629295641978511506172918"]
)
def test_valid_uids_are_accepted(ingestor: Ingestor, uid: str) -> None:
    outcome = ingestor.ingest(part10(ct(SOPInstanceUID=uid)), source="probe")
    assert outcome.status == StoreStatus.success, outcome.reason


def test_nesting_within_the_limit_and_deflated_instances_are_stored(ingestor: Ingestor) -> None:
    nested_ok = with_elements(front=nested(20))
    assert ingestor.ingest(nested_ok, source="probe").status == StoreStatus.success
    source = ct(SOPInstanceUID="1.2.826.0.1.3680043.8.498.7")
    deflated = part10(source, DEFLATED)
    outcome = ingestor.ingest(deflated, source="probe")
    assert outcome.status == StoreStatus.success, outcome.reason
    row = next(r for r in stored(ingestor.db) if r.SOPInstanceUID == source.SOPInstanceUID)
    assert Path(row.path).read_bytes() == deflated  # stored as received
    assert row.TransferSyntaxUID == DEFLATED
    back = pydicom.dcmread(row.path)
    assert np.array_equal(back.pixel_array, ct().pixel_array)


def test_limits_come_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings(data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    assert defaults.max_inflated_bytes == defaults.max_element_bytes == 256 * MiB
    monkeypatch.setenv("TRIAGE_MAX_INFLATED_BYTES", str(32 * MiB))
    monkeypatch.setenv("TRIAGE_MAX_ELEMENT_BYTES", str(16 * MiB))
    db = Database(f"sqlite:///{tmp_path / 'triage.db'}")
    db.migrate()
    try:
        ing = Ingestor.from_settings(Settings(data_dir=tmp_path), db)
        assert (ing.max_inflated_bytes, ing.max_element_bytes) == (32 * MiB, 16 * MiB)
        outcome = ing.ingest(private_bomb(64 * MiB), source="probe")
        assert "(TRIAGE_MAX_ELEMENT_BYTES)" in outcome.reason
    finally:
        db.dispose()


# --- Deflate bombs and the peak resident memory -----------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, field
    return int(match.group(1))


@contextmanager
def peak_growth() -> Iterator[dict[str, int]]:
    """The growth of this process's peak resident memory over the block, in bytes (the
    peak is reset first: writing 5 to /proc/self/clear_refs, Linux 4.0+)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("the peak resident memory (VmHWM) cannot be reset here")
    result: dict[str, int] = {}
    start = _status_kib("VmRSS")
    yield result
    result["bytes"] = (_status_kib("VmHWM") - start) * 1024


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, str]]:
    return {name: (build(), phrase) for name, (build, phrase) in BOMBS.items()}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_deflate_bomb_is_refused_without_inflating_it(
    ingestor: Ingestor, bombs: dict[str, tuple[bytes, str]], name: str
) -> None:
    data, phrase = bombs[name]
    assert len(data) < BOMB_BYTES // 500  # a small file ...
    assert BOMB_BYTES > 3 * PEAK_CEILING  # ... whose inflating would pass the ceiling
    with peak_growth() as growth:
        outcome = ingestor.ingest(data, source="probe")
    assert outcome.status == StoreStatus.cannot_understand
    assert phrase in outcome.reason
    assert growth["bytes"] < PEAK_CEILING, growth
    assert_kept(ingestor.db, data, phrase)


# --- C-STORE: a real SCP, the files' bytes sent as they are --------------------------------


@contextmanager
def running_scp(ingestor: Ingestor) -> Iterator[int]:
    port = free_port()
    server = start_scp(ScpOptions(host="127.0.0.1", port=port, ae_title="TRIAGE"), ingestor)
    try:
        yield port
    finally:
        server.shutdown()


def c_store_raw(
    port: int, files: list[Path], monkeypatch: pytest.MonkeyPatch, called_ae: str = "TRIAGE"
) -> list[int]:
    """C-STORE each file with pynetdicom, its data set bytes sent unparsed (chunked)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="PROBE")
    for ts in sorted({str(read_file_meta_info(f).TransferSyntaxUID) for f in files}):
        ae.add_requested_context(CT_IMAGE_STORAGE, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


# Not sendable over DICOM: the transfer syntax is negotiated, so an invalid one never
# reaches the data set.
C_STORE_FAMILIES = sorted(set(families()) - {"transfer-syntax-not-a-transfer-syntax"})


def test_c_store_of_malformed_input_and_bombs(
    tmp_path: Path,
    ingestor: Ingestor,
    bombs: dict[str, tuple[bytes, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cases = {n: families()[n] for n in C_STORE_FAMILIES} | bombs
    files = []
    for name, (data, _) in cases.items():
        (tmp_path / f"{name}.dcm").write_bytes(data)
        files.append(tmp_path / f"{name}.dcm")
    with running_scp(ingestor) as port, peak_growth() as growth:
        statuses = c_store_raw(port, files, monkeypatch)
    assert statuses == [0xC000] * len(files), dict(zip(cases, statuses, strict=True))
    assert growth["bytes"] < PEAK_CEILING, growth
    for data, phrase in cases.values():
        assert_kept_as_sent(ingestor.db, data, phrase)
    sources = {i["source"] for i in quarantine_listing(ingestor.db)["items"]}
    assert sources == {"dicom:PROBE"}
    assert stored(ingestor.db) == []


def test_storescu_sends_an_invalid_uid_and_is_refused(
    tmp_path: Path, ingestor: Ingestor, storescu: str
) -> None:
    data, phrase = families()["uid-leading-zero"]
    path = tmp_path / "leading-zero.dcm"
    path.write_bytes(data)
    with running_scp(ingestor) as port:
        res = subprocess.run(
            [storescu, "-v", "-aec", "TRIAGE", "127.0.0.1", str(port), str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode != 0  # storescu saw the failure status
    assert "Error: CannotUnderstand" in res.stdout + res.stderr
    (item,) = quarantine_listing(ingestor.db)["items"]
    assert phrase in str(item["reason"]) and item["status"] == "0xC000"


# --- STOW-RS ---------------------------------------------------------------------------------

BOUNDARY = "malformed-7c1e"


def multipart(parts: list[bytes]) -> bytes:
    return (
        b"".join(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
            for p in parts
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )


def test_stow_rs_of_malformed_input_and_bombs(
    ingestor: Ingestor, bombs: dict[str, tuple[bytes, str]]
) -> None:
    cases = families() | bombs
    client = TestClient(create_app(ingestor.db, ingestor=ingestor, max_upload_bytes=64 * MiB))
    pacs = auth_headers(ingestor.db, "pacs", Role.integration)  # STOW-RS needs ingest
    with peak_growth() as growth:
        resp = client.post(
            "/dicomweb/studies",
            content=multipart([data for data, _ in cases.values()]),
            headers={
                **pacs,
                "Content-Type": f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
            },
        )
    assert resp.status_code == 409, resp.text
    failed = resp.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000] * len(cases)
    assert growth["bytes"] < PEAK_CEILING, growth
    for data, phrase in cases.values():
        assert_kept(ingestor.db, data, phrase)
    assert stored(ingestor.db) == []


# --- triage import -----------------------------------------------------------------------------


def test_triage_import_refuses_and_keeps_every_one(
    tmp_path: Path, bombs: dict[str, tuple[bytes, str]]
) -> None:
    cases = families() | bombs
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (data, _) in cases.items():
        (folder / f"{name}.dcm").write_bytes(data)
    data_dir = tmp_path / "data"
    env = {f"TRIAGE_{k.upper()}": str(v) for k, v in LIMITS.items()}
    result = run_cli(["import", str(folder)], data_dir, **env)
    out = result.stdout.replace("\n", " ")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{len(cases)} rejected" in out
    assert "0xA700" not in out and "internal error" not in out
    with sqlite3.connect(data_dir / "triage.db") as conn:
        rows = conn.execute("SELECT sha256, status_code, reason, path FROM quarantine").fetchall()
    by_hash = {r[0]: r for r in rows}
    assert len(rows) == len(cases)
    for data, phrase in cases.values():
        digest, status, reason, path = by_hash[hashlib.sha256(data).hexdigest()]
        assert status == 0xC000 and phrase in reason
        assert Path(path).read_bytes() == data
