"""Accounts: create, change, disable, and check a sign-in with a password.

A sign-in that fails ``max_failures`` times in a row locks the account for ``lockout`` (the
answer while locked is the same as for a wrong password, and no password is checked). An
unknown username costs the same time as a known one (a dummy hash is checked).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from triage.auth.passwords import hash_password, needs_rehash, password_problem, verify_password
from triage.auth.roles import Permission, Role, permissions_of
from triage.db import Database
from triage.db.tables import AccountRow, SessionRow

USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MAX_FAILURES = 5
LOCKOUT = timedelta(minutes=15)


class AccountError(ValueError):
    """A request about accounts that cannot be done; ``str(exc)`` says why."""


class AccountSource(enum.StrEnum):
    local = "local"
    ldap = "ldap"
    oidc = "oidc"


@dataclass(frozen=True)
class Account:
    id: int
    username: str
    display_name: str | None
    role: Role
    source: AccountSource
    disabled: bool
    has_password: bool
    locked_until: datetime | None
    last_login_at: datetime | None
    grants: frozenset[Permission] = frozenset()

    @property
    def permissions(self) -> frozenset[Permission]:
        """What this account may do: its role's permissions and those granted to it."""
        return permissions_of(self.role) | self.grants

    @classmethod
    def of(cls, row: AccountRow) -> Account:
        return cls(
            id=row.id,
            username=row.username,
            display_name=row.display_name,
            role=Role(row.role),
            source=AccountSource(row.source),
            disabled=bool(row.disabled),
            has_password=row.password_hash is not None,
            locked_until=_aware(row.locked_until),
            last_login_at=_aware(row.last_login_at),
            grants=parse_grants(row.grants),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "username": self.username,
            "display_name": self.display_name,
            "role": self.role.value,
            "source": self.source.value,
            "disabled": self.disabled,
            "has_password": self.has_password,
            "locked_until": self.locked_until.isoformat() if self.locked_until else None,
            "last_login_at": self.last_login_at.isoformat() if self.last_login_at else None,
            "grants": sorted(p.value for p in self.grants),
        }


def _aware(value: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes; every time here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def parse_grants(text: str | None) -> frozenset[Permission]:
    """The permissions kept in ``accounts.grants`` (unknown names, from a newer version, are
    ignored rather than failing every request of the account)."""
    known = {p.value for p in Permission}
    return frozenset(Permission(n) for n in (text or "").split(",") if n.strip() in known)


def set_grants(db: Database, username: str, grants: Iterable[Permission | str]) -> Account:
    """Replace the permissions granted to ``username`` beyond its role's."""
    try:
        wanted = sorted({Permission(g).value for g in grants})
    except ValueError:
        raise AccountError(f"a grant is one of {', '.join(p.value for p in Permission)}") from None
    return _change(db, username, grants=",".join(wanted) or None)


def username_problem(username: str) -> str | None:
    if not USERNAME_RE.fullmatch(username):
        return (
            "a username is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a"
            " letter or digit"
        )
    return None


def create_account(
    db: Database,
    username: str,
    role: Role,
    *,
    password: str | None = None,
    display_name: str | None = None,
    source: AccountSource = AccountSource.local,
    now: datetime | None = None,
) -> Account:
    """A new account. Raises :class:`AccountError` for a bad name or password or a taken name."""
    problem = username_problem(username) or (password_problem(password) if password else None)
    if problem:
        raise AccountError(problem)
    row = AccountRow(
        username=username,
        display_name=display_name,
        role=Role(role).value,
        source=AccountSource(source).value,
        password_hash=hash_password(password) if password else None,
        disabled=False,
        created_at=now or datetime.now(UTC),
        failed_logins=0,
    )
    try:
        with db.session() as s:
            s.add(row)
            s.flush()
            return Account.of(row)
    except IntegrityError:
        raise AccountError(f"an account named {username!r} exists already") from None


def get_account(db: Database, username: str) -> Account | None:
    with db.session() as s:
        row = s.scalars(select(AccountRow).where(AccountRow.username == username)).first()
        return None if row is None else Account.of(row)


def list_accounts(db: Database) -> list[Account]:
    with db.session() as s:
        return [Account.of(r) for r in s.scalars(select(AccountRow).order_by(AccountRow.username))]


def count_admins(db: Database) -> int:
    return sum(1 for a in list_accounts(db) if a.role == Role.admin and not a.disabled)


def upsert_directory_account(
    db: Database,
    username: str,
    role: Role,
    *,
    display_name: str | None,
    source: AccountSource = AccountSource.ldap,
    now: datetime | None = None,
) -> Account:
    """The account of a user the directory (``source=ldap``) or the OpenID provider
    (``source=oidc``) has just signed in, with no password: created the first time, its
    role and display name the directory's each time, its last sign-in ``now`` unless it is
    disabled. The last-admin rule does not apply (the directory decides). Raises
    :class:`AccountError` when an account of another source holds the name, even spelled
    in another case: no silent takeover.
    """
    problem = username_problem(username)
    if problem:
        raise AccountError(problem)
    now = now or datetime.now(UTC)
    display = display_name[:128] if display_name else None
    for attempt in range(2):  # a concurrent first sign-in may insert the row before this one
        try:
            with db.session() as s:
                rows = s.scalars(
                    select(AccountRow).where(func.lower(AccountRow.username) == username.lower())
                ).all()
                if any(r.source != AccountSource(source).value for r in rows):
                    raise AccountError(
                        f"an account named {username!r} of another source exists; the"
                        f" {source} sign-in cannot take it over"
                    )
                row = next((r for r in rows if r.username == username), None)
                if row is None:
                    row = AccountRow(
                        username=username,
                        source=AccountSource(source).value,
                        password_hash=None,
                        disabled=False,
                        created_at=now,
                        failed_logins=0,
                    )
                    s.add(row)
                row.role = Role(role).value
                row.display_name = display
                if not row.disabled:
                    row.last_login_at = now
                s.flush()
                return Account.of(row)
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _change(
    db: Database, username: str, *, end_sessions: bool = False, **values: object
) -> Account:
    """Set ``values`` on the account; with ``end_sessions``, also end its open page
    sessions in the same transaction (they do not come back when the change is undone)."""
    with db.session() as s:
        row = s.scalars(select(AccountRow).where(AccountRow.username == username)).first()
        if row is None:
            raise AccountError(f"no account named {username!r}")
        for key, value in values.items():
            setattr(row, key, value)
        if end_sessions:
            s.execute(
                update(SessionRow)
                .where(SessionRow.account_id == row.id, SessionRow.ended_at.is_(None))
                .values(ended_at=datetime.now(UTC))
            )
        s.flush()
        return Account.of(row)


def _keep_an_admin(db: Database, username: str) -> None:
    account = get_account(db, username)
    if account and account.role == Role.admin and not account.disabled and count_admins(db) <= 1:
        raise AccountError("this is the last enabled admin account; make another admin first")


def set_role(db: Database, username: str, role: Role) -> Account:
    if Role(role) != Role.admin:
        _keep_an_admin(db, username)
    return _change(db, username, role=Role(role).value)


def set_disabled(db: Database, username: str, disabled: bool) -> Account:
    """Disable (or enable again) an account: its tokens stop working while it is disabled,
    and disabling ends its page sessions for good."""
    if disabled:
        _keep_an_admin(db, username)
    return _change(db, username, end_sessions=disabled, disabled=disabled)


def set_password(db: Database, username: str, password: str) -> Account:
    problem = password_problem(password)
    if problem:
        raise AccountError(problem)
    return _change(
        db,
        username,
        end_sessions=True,  # whoever signed in with the old password is signed out
        password_hash=hash_password(password),
        failed_logins=0,
        locked_until=None,
    )


class LoginOutcome(enum.StrEnum):
    ok = "ok"
    bad_credentials = "bad_credentials"
    locked = "locked"
    disabled = "disabled"


@dataclass(frozen=True)
class LoginResult:
    outcome: LoginOutcome
    account: Account | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == LoginOutcome.ok


def check_password_login(
    db: Database,
    username: str,
    password: str,
    *,
    now: datetime | None = None,
    max_failures: int = MAX_FAILURES,
    lockout: timedelta = LOCKOUT,
) -> LoginResult:
    """Check a local password sign-in and keep the failure count and lockout."""
    now = now or datetime.now(UTC)
    with db.session() as s:
        row = s.scalars(select(AccountRow).where(AccountRow.username == username)).first()
        if row is None or row.password_hash is None:
            verify_password(None, password)  # the same time as a real check
            return LoginResult(LoginOutcome.bad_credentials)
        locked_until = _aware(row.locked_until)
        if locked_until is not None and locked_until > now:
            return LoginResult(LoginOutcome.locked, Account.of(row))
        if not verify_password(row.password_hash, password):
            failures = row.failed_logins + 1
            values: dict[str, object] = {"failed_logins": failures}
            if failures >= max_failures:
                values.update(failed_logins=0, locked_until=now + lockout)
            s.execute(update(AccountRow).where(AccountRow.id == row.id).values(**values))
            return LoginResult(LoginOutcome.bad_credentials, Account.of(row))
        if row.disabled:
            return LoginResult(LoginOutcome.disabled, Account.of(row))
        row.failed_logins = 0
        row.locked_until = None
        row.last_login_at = now
        if needs_rehash(row.password_hash):
            row.password_hash = hash_password(password)
        s.flush()
        return LoginResult(LoginOutcome.ok, Account.of(row))
