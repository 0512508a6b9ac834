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
