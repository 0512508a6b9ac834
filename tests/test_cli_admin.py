"""``triage accounts``, ``triage tokens`` and ``triage audit`` as a user runs them."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli
from triage.auth.tokens import resolve_token
from triage.db import Database

PASSWORD = "correct horse battery"


def cli_stdin(args: list[str], data_dir: Path, text: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "TRIAGE_DATA_DIR": str(data_dir)}
    env.pop("TRIAGE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "triage.cli", *args],
        input=text,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_first_admin_accounts_tokens_and_the_audit_trail(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = cli_stdin(
        ["accounts", "add", "alice", "--role", "admin", "--password-stdin"], data, PASSWORD + "\n"
    )
    assert made.returncode == 0, made.stderr
    assert "created admin account alice" in made.stdout
    short = cli_stdin(["accounts", "add", "bob", "--password-stdin"], data, "short\n")
    assert (
        short.returncode == 2
        and short.stderr.strip() == "error: a password needs at least 12 characters"
    )
    assert "Traceback" not in short.stderr
    assert (
        run_cli(
            ["accounts", "add", "ris", "--role", "integration", "--no-password"], data
        ).returncode
        == 0
    )
    token = run_cli(
        ["tokens", "create", "ris", "--name", "RIS", "--days", "30"], data
    ).stdout.strip()
    db = Database(f"sqlite:///{(data / 'triage.db').resolve()}")
    account = resolve_token(db, token)
    assert account is not None and account.username == "ris"

    last_admin = run_cli(["accounts", "disable", "alice"], data)
    assert last_admin.returncode == 2 and "last enabled admin" in last_admin.stderr

    listed = json.loads(run_cli(["accounts", "list", "--json"], data).stdout)["items"]
    assert [(a["username"], a["role"], a["has_password"]) for a in listed] == [
        ("alice", "admin", True),
        ("ris", "integration", False),
    ]
    tokens = json.loads(run_cli(["tokens", "list", "--json"], data).stdout)["items"]
    assert token not in json.dumps(tokens) and tokens[0]["prefix"] == token[:12]
    assert run_cli(["tokens", "revoke", str(tokens[0]["id"])], data).returncode == 0
    assert resolve_token(db, token) is None

    audit = json.loads(run_cli(["audit", "list", "--json"], data).stdout)["items"]
    assert [r["action"] for r in reversed(audit)] == [
        "account_create",
        "account_create",
        "token_create",
        "token_revoke",
    ]
    assert all(r["actor"].startswith("cli:") for r in audit)
    ok = run_cli(["audit", "verify"], data)
    assert ok.returncode == 0 and "intact: 4 record(s)" in ok.stdout

    with sqlite3.connect(data / "triage.db") as conn:
        conn.execute("UPDATE audit_log SET target = 'mallory' WHERE id = 2")
    broken = run_cli(["audit", "verify"], data)
    assert broken.returncode == 1
    assert "broken at record 2: record 2 was altered" in broken.stderr
    db.dispose()
