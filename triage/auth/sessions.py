"""Sign-in sessions of the web page: a random cookie value whose sha256 is kept, a CSRF
token, an idle timeout and an absolute lifetime.

The cookie value (256 random bits) is what the browser holds; the database keeps only its
sha256, so a copy of the database signs no one in. A session ends at sign-out, after
``idle`` without a request, at ``expires_at`` (``max_age`` after sign-in), and when its
account is disabled or its password changed (``triage.auth.accounts`` ends them). Each
request sees the account as it is now (a role changed by an admin applies at the next
request).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from triage.auth.accounts import Account, _aware
from triage.db import Database
from triage.db.tables import AccountRow, SessionRow

IDLE = timedelta(minutes=60)
MAX_AGE = timedelta(hours=12)
# last_seen_at is written at most this often: a page polling every 2 s is not a write per poll.
_TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True)
class Session:
    id: int
    csrf_token: str
    created_at: datetime
    expires_at: datetime


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def start_session(
    db: Database,
    account: Account,
    *,
    source_address: str | None = None,
    now: datetime | None = None,
    max_age: timedelta = MAX_AGE,
) -> tuple[str, Session]:
    """A new session for ``account``: (the cookie value, shown this once; the session)."""
    now = now or datetime.now(UTC)
    value = secrets.token_urlsafe(32)
    row = SessionRow(
        account_id=account.id,
        token_sha256=_digest(value),
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        last_seen_at=now,
        expires_at=now + max_age,
        source_address=(source_address or "")[:64] or None,
    )
    with db.session() as s:
        s.add(row)
        s.flush()
        return value, Session(row.id, row.csrf_token, now, now + max_age)


def resolve_session(
    db: Database, value: str, *, now: datetime | None = None, idle: timedelta = IDLE
) -> tuple[Account, Session] | None:
    """The account and session a cookie value belongs to, or None (unknown, signed out,
    idle too long, past its lifetime, or its account disabled)."""
    if not value or len(value) > 128:
        return None
    now = now or datetime.now(UTC)
    with db.session() as s:
        found = s.execute(
            select(SessionRow, AccountRow)
            .join(AccountRow, AccountRow.id == SessionRow.account_id)
            .where(SessionRow.token_sha256 == _digest(value))
        ).first()
        if found is None:
            return None
        row, account = found
        last_seen = _aware(row.last_seen_at) or now
        expires = _aware(row.expires_at) or now
        if row.ended_at is not None or account.disabled or expires <= now or now - last_seen > idle:
            return None
        if now - last_seen >= _TOUCH_EVERY:
            s.execute(update(SessionRow).where(SessionRow.id == row.id).values(last_seen_at=now))
        return Account.of(account), Session(
            row.id, row.csrf_token, _aware(row.created_at) or now, expires
        )


def end_session(db: Database, session_id: int, *, now: datetime | None = None) -> None:
    """Sign out: the session's cookie no longer works."""
    with db.session() as s:
        s.execute(
            update(SessionRow)
            .where(SessionRow.id == session_id, SessionRow.ended_at.is_(None))
            .values(ended_at=now or datetime.now(UTC))
        )
