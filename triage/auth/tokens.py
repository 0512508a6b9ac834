"""Bearer tokens for the API and integrations: shown once, kept as a sha256, revocable.

A token is ``trg_`` and 43 URL-safe characters (256 random bits); its sha256 is what the
database holds, so a copy of the database gives no working token. A token works while it
is not revoked, not expired, and its account is not disabled.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from triage.auth.accounts import Account, AccountError, _aware
from triage.db import Database
from triage.db.tables import AccountRow, ApiTokenRow

PREFIX = "trg_"


@dataclass(frozen=True)
class TokenInfo:
    id: int
    username: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def as_dict(self) -> dict[str, object]:
        def iso(v: datetime | None) -> str | None:
            return v.isoformat() if v else None

        return {
            "id": self.id,
            "username": self.username,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
        }


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _info(row: ApiTokenRow, username: str) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        username=username,
        name=row.name,
        prefix=row.prefix,
        created_at=_aware(row.created_at) or row.created_at,
        expires_at=_aware(row.expires_at),
        revoked_at=_aware(row.revoked_at),
        last_used_at=_aware(row.last_used_at),
    )


def create_token(
    db: Database,
    username: str,
    name: str,
    *,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> tuple[str, TokenInfo]:
    """A new token for ``username``: (the token, shown this once; what is kept of it)."""
    name = name.strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise AccountError("a token name is 1 to 64 printable characters")
    token = PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        account = s.scalars(select(AccountRow).where(AccountRow.username == username)).first()
        if account is None:
            raise AccountError(f"no account named {username!r}")
        row = ApiTokenRow(
            account_id=account.id,
            name=name,
            token_sha256=_digest(token),
            prefix=token[:12],
            created_at=now or datetime.now(UTC),
            expires_at=expires_at,
        )
        s.add(row)
        s.flush()
        return token, _info(row, username)


def list_tokens(db: Database, username: str | None = None) -> list[TokenInfo]:
    with db.session() as s:
        stmt = select(ApiTokenRow, AccountRow.username).join(
            AccountRow, AccountRow.id == ApiTokenRow.account_id
        )
        if username is not None:
            stmt = stmt.where(AccountRow.username == username)
        return [_info(row, user) for row, user in s.execute(stmt.order_by(ApiTokenRow.id))]


MAX_ID = 2**31 - 1  # an INTEGER key on every backend


def revoke_token(db: Database, token_id: int, *, now: datetime | None = None) -> TokenInfo:
    if not 1 <= token_id <= MAX_ID:
        raise AccountError(f"no token with id {token_id}")
    with db.session() as s:
        found = s.execute(
            select(ApiTokenRow, AccountRow.username)
            .join(AccountRow, AccountRow.id == ApiTokenRow.account_id)
            .where(ApiTokenRow.id == token_id)
        ).first()
        if found is None:
            raise AccountError(f"no token with id {token_id}")
        row, username = found
        if row.revoked_at is None:
            row.revoked_at = now or datetime.now(UTC)
        s.flush()
        return _info(row, username)


LAST_USED_RESOLUTION = timedelta(seconds=60)
"""How stale a token's ``last_used_at`` may be: a token used again within this time is
not written again, so that a client's every request is not a write (on SQLite the one
writer at a time; every write a commit)."""


def resolve_token(db: Database, token: str, *, now: datetime | None = None) -> Account | None:
    """The account a presented token signs in, or None (unknown, revoked, expired, disabled)."""
    if not token.startswith(PREFIX) or len(token) > 128:
        return None
    now = now or datetime.now(UTC)
    with db.session() as s:
        found = s.execute(
            select(ApiTokenRow, AccountRow)
            .join(AccountRow, AccountRow.id == ApiTokenRow.account_id)
            .where(ApiTokenRow.token_sha256 == _digest(token))
        ).first()
        if found is None:
            return None
        row, account = found
        expires = _aware(row.expires_at)
        if row.revoked_at is not None or account.disabled or (expires and expires <= now):
            return None
        last_used = _aware(row.last_used_at)
        if last_used is None or now - last_used >= LAST_USED_RESOLUTION or now < last_used:
            s.execute(update(ApiTokenRow).where(ApiTokenRow.id == row.id).values(last_used_at=now))
        return Account.of(account)
