"""Accounts, passwords (argon2id), lockout and API tokens, on each configured database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from triage.auth.accounts import (
    AccountError,
    LoginOutcome,
    check_password_login,
    create_account,
    get_account,
    set_disabled,
    set_password,
    set_role,
)
from triage.auth.passwords import hash_password, verify_password
from triage.auth.roles import Permission, Role, permissions_of
from triage.auth.tokens import create_token, list_tokens, resolve_token, revoke_token
from triage.db import Database
from triage.db.tables import AccountRow, ApiTokenRow

PASSWORD = "correct horse battery"
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def test_passwords_are_argon2id_hashes_never_the_text(db: Database) -> None:
    create_account(db, "alice", Role.radiologist, password=PASSWORD)
    with db.session() as s:
        stored = s.scalar(select(AccountRow.password_hash))
    assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored
    assert verify_password(stored, PASSWORD) and not verify_password(stored, PASSWORD + "x")
    assert not verify_password(None, PASSWORD)
    assert not verify_password(hash_password(PASSWORD), "x" * 5000)  # too long: refused


def test_sign_in_success_failure_and_lockout(db: Database) -> None:
    create_account(db, "alice", Role.radiologist, password=PASSWORD)
    ok = check_password_login(db, "alice", PASSWORD, now=T0)
    assert ok.outcome == LoginOutcome.ok and ok.account and ok.account.username == "alice"
    assert get_account(db, "alice").last_login_at == T0  # type: ignore[union-attr]
    for _ in range(4):
        assert check_password_login(db, "alice", "wrong", now=T0).outcome == "bad_credentials"
    assert check_password_login(db, "alice", PASSWORD, now=T0).ok  # a success resets the count
    for _ in range(5):
        check_password_login(db, "alice", "wrong", now=T0)
    # Locked: even the right password is refused until the lockout ends.
    assert check_password_login(db, "alice", PASSWORD, now=T0).outcome == LoginOutcome.locked
    later = T0 + timedelta(minutes=16)
    assert check_password_login(db, "alice", PASSWORD, now=later).ok
    assert check_password_login(db, "nobody", PASSWORD, now=T0).outcome == "bad_credentials"


def test_disabled_accounts_cannot_sign_in_and_the_last_admin_stays(db: Database) -> None:
    create_account(db, "root", Role.admin, password=PASSWORD)
    create_account(db, "bob", Role.radiologist, password=PASSWORD)
    set_disabled(db, "bob", True)
    assert check_password_login(db, "bob", PASSWORD).outcome == LoginOutcome.disabled
    with pytest.raises(AccountError, match="last enabled admin"):
        set_disabled(db, "root", True)
    with pytest.raises(AccountError, match="last enabled admin"):
        set_role(db, "root", Role.radiologist)
    set_role(db, "bob", Role.admin)
    set_disabled(db, "bob", False)
    set_role(db, "root", Role.radiologist)  # bob is an enabled admin now
    assert get_account(db, "root").role == Role.radiologist  # type: ignore[union-attr]


def test_account_rules(db: Database) -> None:
    with pytest.raises(AccountError, match="at least 12"):
        create_account(db, "alice", Role.radiologist, password="short")
    with pytest.raises(AccountError, match="username"):
        create_account(db, "alice\n", Role.radiologist, password=PASSWORD)
    create_account(db, "alice", Role.radiologist, password=PASSWORD)
    with pytest.raises(AccountError, match="exists already"):
        create_account(db, "alice", Role.admin, password=PASSWORD)
    with pytest.raises(AccountError, match="no account"):
        set_password(db, "nobody", PASSWORD)
    set_password(db, "alice", "another long password")
    assert check_password_login(db, "alice", "another long password").ok


def test_role_permissions() -> None:
    assert Permission.claim in permissions_of(Role.radiologist)
    assert Permission.manage_accounts not in permissions_of(Role.radiologist)
    assert Permission.read_audit not in permissions_of(Role.radiologist)
    assert permissions_of(Role.integration) == {Permission.ingest, Permission.view_events}
    assert permissions_of("admin") == set(Permission)


def test_tokens_are_shown_once_kept_hashed_and_revocable(db: Database) -> None:
    create_account(db, "ris", Role.integration)
    token, info = create_token(db, "ris", "RIS", expires_at=T0 + timedelta(days=1), now=T0)
    assert token.startswith("trg_") and len(token) > 40 and info.prefix == token[:12]
    with db.session() as s:
        kept = s.scalar(select(ApiTokenRow.token_sha256))
    assert kept is not None and token not in kept and len(kept) == 64
    account = resolve_token(db, token, now=T0)
    assert account is not None and account.username == "ris" and account.role == Role.integration
    assert list_tokens(db, "ris")[0].last_used_at == T0
    # Used again within a minute: not written again (a request is not a write); later, it is.
    assert resolve_token(db, token, now=T0 + timedelta(seconds=30)) is not None
    assert list_tokens(db, "ris")[0].last_used_at == T0
    assert resolve_token(db, token, now=T0 + timedelta(seconds=61)) is not None
    assert list_tokens(db, "ris")[0].last_used_at == T0 + timedelta(seconds=61)
    assert resolve_token(db, token + "x", now=T0) is None
    assert resolve_token(db, "Bearer " + token, now=T0) is None
    assert resolve_token(db, token, now=T0 + timedelta(days=2)) is None  # expired
    set_disabled(db, "ris", True)
    assert resolve_token(db, token, now=T0) is None  # the account is disabled
    set_disabled(db, "ris", False)
    revoke_token(db, info.id, now=T0)
    assert resolve_token(db, token, now=T0) is None
    with pytest.raises(AccountError, match="no account"):
        create_token(db, "nobody", "x")
