"""``triage worklist`` and ``triage quarantine`` print data as text, never as terminal input.

Study text comes from DICOM headers written by other systems. Console markup in it
(``[/bold]``, ``[link=...]``) must print literally, not crash or style the table; control
characters (ESC starts terminal escape sequences: colours, window titles, clearing the
screen) must never reach the terminal. Run in a child process on a real database.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert, update

from tests.conftest import run_cli
from tests.studies import add_study
from triage.db import Database
from triage.db.tables import QuarantineRow, SeriesRow, StudyRow

# Wide enough that rich does not wrap the table's cells.
WIDE = {"COLUMNS": "400", "TERM": "xterm-256color"}
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def make_data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = Database(f"sqlite:///{(data_dir / 'triage.db').resolve()}")
    db.migrate()
    texts = {
        "1.1": dict(StudyDescription="[/bold] CHEST"),
        "1.2": dict(StudyDescription="[link=http://x]y[/link]"),
        "1.3": dict(
            StudyDescription="\x1b]0;owned\x07HEAD \x1b[31mRED\x1b[0m\x9b2J",
            claimed_by="bob\x1b[2J",
            read_state="claimed",
            claim_expires_at=datetime(2099, 1, 1, tzinfo=UTC),
            ai_status="failed",
            ai_error="blast-ct-v1: [red]bad[/red] \x1b[5mblink\rover\u202eevil",
        ),
    }
    try:
        for n, (uid, values) in enumerate(texts.items()):
            add_study(db, uid, 5.0 + n)
            with db.session() as s:
                s.execute(update(StudyRow).where(StudyRow.StudyInstanceUID == uid).values(**values))
        with db.session() as s:
            s.execute(
                update(SeriesRow)
                .where(SeriesRow.SeriesInstanceUID == "1.2.1")
                .values(Modality="[/]")
            )
            s.execute(
                insert(QuarantineRow).values(
                    received_at=datetime.now(UTC),
                    source="[bold]scu\x1b[2J",
                    status_code=0xC000,
                    reason="not DICOM: [/link] \x1b]8;;http://x\x1b\\click",
                    sha256=hashlib.sha256(b"x").hexdigest(),
                    size_bytes=1,
                    path=str(data_dir / "quarantine" / "x"),
                )
            )
    finally:
        db.dispose()
    return data_dir


def test_worklist_prints_markup_literally_and_no_control_characters(tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path)
    out = run_cli(["worklist"], data_dir, **WIDE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    text = out.stdout
    assert "[/bold] CHEST" in text
    assert "[link=http://x]y[/link]" in text
    assert "[/]" in text  # a modality with markup in it
    # Control characters are shown as escapes; none is written as it is.
    assert not CONTROL.search(text), repr(CONTROL.findall(text))
    assert "\\x1b]0;owned\\x07HEAD \\x1b[31mRED\\x1b[0m\\x9b2J" in text
    assert "bob\\x1b[2J" in text
    # The model error is listed under the table, on one line.
    assert re.search(
        r"(?m)^#\d: blast-ct-v1: \[red\]bad\[/red\] \\x1b\[5mblink\\rover\\u202eevil$", text
    )


def test_worklist_json_keeps_the_values(tmp_path: Path) -> None:
    """The JSON document is for programs: values as stored (JSON escapes control characters)."""
    data_dir = make_data_dir(tmp_path)
    out = run_cli(["worklist", "--json"], data_dir)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\\u001b]0;owned\\u0007HEAD" in out.stdout


def test_quarantine_prints_markup_literally_and_no_control_characters(tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path)
    out = run_cli(["quarantine"], data_dir, **WIDE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not CONTROL.search(out.stdout), repr(CONTROL.findall(out.stdout))
    assert "[bold]scu\\x1b[2J" in out.stdout
    assert "not DICOM: [/link] \\x1b]8;;http://x\\x1b\\click" in out.stdout
