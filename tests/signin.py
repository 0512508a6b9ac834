"""Credentials for tests of the HTTP API: accounts with tokens, and signed-in clients."""

from __future__ import annotations

from typing import TYPE_CHECKING

from triage.auth.accounts import create_account, get_account, set_grants
from triage.auth.roles import Permission, Role
from triage.auth.tokens import create_token

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from triage.db import Database


def token_for(
    db: Database,
    username: str = "test-admin",
    role: Role = Role.admin,
    *,
    grants: tuple[Permission, ...] = (),
) -> str:
    """A new API token of ``username`` (the account is made with ``role`` when missing)."""
    if get_account(db, username) is None:
        create_account(db, username, role)
    if grants:
        set_grants(db, username, grants)
    token, _info = create_token(db, username, "tests")
    return token


def auth_headers(
    db: Database, username: str = "test-admin", role: Role = Role.admin
) -> dict[str, str]:
    """``Authorization`` with a new token of ``username``."""
    return {"Authorization": f"Bearer {token_for(db, username, role)}"}


def sign_in(
    client: TestClient, db: Database, username: str = "test-admin", role: Role = Role.admin
) -> TestClient:
    """``client`` with a bearer token of ``username`` on every request; returns it."""
    client.headers.update(auth_headers(db, username, role))
    return client
