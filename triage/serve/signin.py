"""Sign-in and sign-out of the page: ``/api/auth/login``, ``/api/auth/logout``, ``/api/auth/me``.

A local account's password is checked here (``triage.auth.accounts``, with its lockout); a
name with no local password account goes to the hospital's directory when one is
configured (``triage.auth.ldap``). Success starts a session (``triage.auth.sessions``) whose
cookie is HttpOnly, SameSite=Lax, Path=/ and, when the request came over HTTPS, Secure; the
answer carries the session's CSRF token for the page to send back on state changes. Every
attempt, success or failure, writes one audit record.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from triage.audit.chain import Outcome
from triage.auth.accounts import (
    Account,
    AccountSource,
    LoginOutcome,
    check_password_login,
    get_account,
)
from triage.auth.ldap import DirectoryOutcome, sign_in_with_directory
from triage.auth.sessions import end_session, start_session
from triage.db import Database
from triage.serve.auth import SESSION_COOKIE, AuthConfig, Principal, SignedIn, audit, client_address

router = APIRouter(tags=["sign-in"])


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)


def _me(principal: Principal | Account, csrf: str | None) -> dict[str, Any]:
    account = principal.account if isinstance(principal, Principal) else principal
    return {
        "username": account.username,
        "display_name": account.display_name,
        "role": account.role.value,
        "permissions": sorted(p.value for p in account.permissions),
        "csrf_token": csrf,
    }


def _audit_name(username: str) -> str:
    """The name tried, as the audit record keeps it (printable, at most 64 characters)."""
    return "".join(c if c.isprintable() else "?" for c in username)[:64]


def _sign_in(request: Request, body: LoginRequest) -> tuple[Account | None, str, str]:
    """(the account on success, the method, what went wrong: "" on success)."""
    db: Database = request.app.state.db
    config: AuthConfig = request.app.state.auth
    local = get_account(db, body.username)
    if config.ldap is not None and (local is None or local.source == AccountSource.ldap):
        directory = sign_in_with_directory(db, config.ldap, body.username, body.password)
        if directory.ok:
            return directory.account, "ldap", ""
        return None, "ldap", directory.outcome.value
    result = check_password_login(db, body.username, body.password)
    if result.ok:
        return result.account, "password", ""
    return None, "password", result.outcome.value


@router.post("/api/auth/login")
async def login(body: LoginRequest, request: Request) -> JSONResponse:
    """Sign in with a username and password (a local account, else the hospital's directory
    when configured). Sets the session cookie; answers who signed in and the CSRF token.
    401 for a wrong name or password (and while locked out: 429), 503 when the directory
    cannot be reached."""
    account, method, problem = await run_in_threadpool(_sign_in, request, body)
    name = _audit_name(body.username)
    if account is None:
        await run_in_threadpool(
            lambda: audit(
                request,
                "login",
                actor=name,
                outcome=Outcome.failure,
                target_kind="account",
                target=name,
                detail={"method": method, "reason": problem},
            )
        )
        if problem == LoginOutcome.locked:
            raise HTTPException(
                status_code=429,
                detail="too many failed sign-ins: this account is locked for a while",
                headers={"Retry-After": "900"},
            )
        if problem == DirectoryOutcome.directory_unavailable:
            raise HTTPException(status_code=503, detail="the directory cannot be reached")
        if problem in (LoginOutcome.disabled, DirectoryOutcome.disabled):
            raise HTTPException(status_code=403, detail="this account is disabled")
        if problem == DirectoryOutcome.no_role:
            raise HTTPException(
                status_code=403, detail="no directory group of this account may use triage"
            )
        raise HTTPException(status_code=401, detail="wrong username or password")
    config: AuthConfig = request.app.state.auth
    db: Database = request.app.state.db
    value, session = await run_in_threadpool(
        lambda: start_session(
            db, account, source_address=client_address(request), max_age=config.session_max_age
        )
    )
    await run_in_threadpool(
        lambda: audit(
            request,
            "login",
            principal=Principal(account, session),
            target_kind="account",
            target=account.username,
            detail={"method": method},
        )
    )
    response = JSONResponse(_me(account, session.csrf_token))
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=math.ceil(config.session_max_age.total_seconds()),
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/api/auth/logout", status_code=204)
async def logout(principal: SignedIn, request: Request) -> Response:
    """Sign out: the session's cookie stops working and is cleared (a bearer token is not
    touched: it is revoked with ``triage tokens revoke``)."""
    db: Database = request.app.state.db
    if principal.session is not None:
        session_id = principal.session.id
        await run_in_threadpool(lambda: end_session(db, session_id, now=datetime.now(UTC)))
        await run_in_threadpool(
            lambda: audit(
                request,
                "logout",
                principal=principal,
                target_kind="account",
                target=principal.username,
            )
        )
    response = Response(status_code=204)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/api/auth/me")
def me(principal: SignedIn) -> dict[str, Any]:
    """Who is signed in: username, display name, role, permissions and (for the page's
    session) the CSRF token to send in ``X-CSRF-Token``."""
    return _me(principal, principal.session.csrf_token if principal.session else None)
