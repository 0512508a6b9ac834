"""``triage import``: files and folders through the ingest path, bad files quarantined."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import func, select

from tests.conftest import pydicom_file, run_cli
from triage.db import Database
from triage.db.tables import InstanceRow


def test_import_folder_recursively_and_quarantine_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "in" / "nested"
    src.mkdir(parents=True)
    for name in ("CT_small.dcm", "RG1_UNCR.dcm"):
        (src / name).write_bytes(pydicom_file(name).read_bytes())
    (tmp_path / "in" / "garbage.dcm").write_bytes(b"definitely not DICOM")
    data_dir = tmp_path / "data"

    first = run_cli(["import", str(tmp_path / "in")], data_dir)
    assert first.returncode == 1  # one file was rejected
    assert "2 stored" in first.stdout and "1 rejected" in first.stdout

    again = run_cli(["import", str(src)], data_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 already stored" in again.stdout

    db = Database(f"sqlite:///{(data_dir / 'triage.db').resolve()}")
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(InstanceRow)) == 2
    listed = json.loads(run_cli(["quarantine", "--json"], data_dir).stdout)
    (item,) = listed["items"]
    assert item["source"] == "import" and item["reason"].startswith("not DICOM")
    assert "garbage.dcm: 0xC000 not DICOM" in first.stdout.replace("\n", "")


def test_import_on_a_full_disk_says_not_stored_not_quarantined(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "ct.dcm").write_bytes(pydicom_file("CT_small.dcm").read_bytes())
    data_dir = tmp_path / "data"
    result = run_cli(["import", str(src)], data_dir, TRIAGE_MIN_FREE_BYTES=str(2**62))
    assert result.returncode == 1
    out = " ".join(result.stdout.split())
    assert "0 rejected" in out and "1 not stored (not kept either: import them again)" in out
    assert "ct.dcm: 0xA700" in out
    assert json.loads(run_cli(["quarantine", "--json"], data_dir).stdout)["items"] == []


def test_a_lease_setting_outside_the_api_range_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["worklist"], tmp_path / "data", TRIAGE_CLAIM_LEASE_SECONDS="1e-300")
    assert result.returncode != 0
    assert "TRIAGE_CLAIM_LEASE_SECONDS" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
