"""Sign-in and sign-out of the page: ``/api/auth/login``, ``/api/auth/logout``, ``/api/auth/me``,
and single sign-on through an OpenID Connect provider (``/api/auth/oidc/start`` and
``/api/auth/oidc/callback``, ``triage.auth.oidc``).

A local account's password is checked here (``triage.auth.accounts``, with its lockout); a
name with no local password account goes to the hospital's directory when one is
configured (``triage.auth.ldap``). Success starts a session (``triage.auth.sessions``) whose
cookie is HttpOnly, SameSite=Lax, Path=/ and, when the request came over HTTPS, Secure; the
answer carries the session's CSRF token for the page to send back on state changes. Every
attempt, success or failure, writes one audit record.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from triage.audit.chain import Outcome
from triage.auth import oidc
from triage.auth.accounts import (
    Account,
    AccountSource,
    LoginOutcome,
    check_password_login,
    get_account,
)
from triage.auth.ldap import DirectoryOutcome, sign_in_with_directory
from triage.auth.oidc import Provider
from triage.auth.sessions import end_session, start_session
from triage.db import Database
from triage.serve.auth import SESSION_COOKIE, AuthConfig, Principal, SignedIn, audit, client_address

log = logging.getLogger(__name__)
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


def _start_session(request: Request, account: Account, method: str, response: Response) -> str:
    """Start a session, record the sign-in, set the cookie on ``response``; the CSRF token."""
    config: AuthConfig = request.app.state.auth
    db: Database = request.app.state.db
    value, session = start_session(
        db, account, source_address=client_address(request), max_age=config.session_max_age
    )
    audit(
        request,
        "login",
        principal=Principal(account, session),
        target_kind="account",
        target=account.username,
        detail={"method": method},
    )
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=math.ceil(config.session_max_age.total_seconds()),
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return session.csrf_token


def _audit_failure(request: Request, name: str, method: str, reason: str) -> None:
    audit(
        request,
        "login",
        actor=name,
        outcome=Outcome.failure,
        target_kind="account",
        target=name,
        detail={"method": method, "reason": reason},
    )


@router.get("/api/auth/methods")
def methods(request: Request) -> dict[str, Any]:
    """How one may sign in here: with a password (local accounts, and the directory when
    configured) and, when configured, through the OpenID Connect provider."""
    config: AuthConfig = request.app.state.auth
    oidc = config.oidc
    return {
        "password": True,
        "directory": config.ldap is not None,
        "oidc": (
            {"name": oidc.settings.display_name, "start": "/api/auth/oidc/start"} if oidc else None
        ),
    }


@router.post("/api/auth/login")
async def login(body: LoginRequest, request: Request) -> JSONResponse:
    """Sign in with a username and password (a local account, else the hospital's directory
    when configured). Sets the session cookie; answers who signed in and the CSRF token.
    401 for a wrong name or password (and while locked out: 429), 503 when the directory
    cannot be reached."""
    account, method, problem = await run_in_threadpool(_sign_in, request, body)
    name = _audit_name(body.username)
    if account is None:
        await run_in_threadpool(_audit_failure, request, name, method, problem)
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
    response = JSONResponse({})
    csrf = await run_in_threadpool(_start_session, request, account, method, response)
    response.body = response.render(_me(account, csrf))
    response.headers["content-length"] = str(len(response.body))
    return response


OIDC_STATE_COOKIE = "triage_oidc_state"
_OIDC_COOKIE_PATH = "/api/auth/oidc"


def _oidc(request: Request) -> Provider:
    config: AuthConfig = request.app.state.auth
    if config.oidc is None:
        raise HTTPException(status_code=404, detail="single sign-on is not configured")
    return config.oidc


def _redirect_uri(request: Request) -> str:
    config: AuthConfig = request.app.state.auth
    return config.oidc_redirect_url or str(request.url_for("oidc_callback"))


def _to_login(problem: str) -> RedirectResponse:
    response = RedirectResponse(f"/login?error={quote(problem)}", status_code=303)
    response.delete_cookie(OIDC_STATE_COOKIE, path=_OIDC_COOKIE_PATH)
    return response


@router.get("/api/auth/oidc/start")
async def oidc_start(
    request: Request, next: Annotated[str, Query(max_length=512)] = "/"
) -> RedirectResponse:
    """Single sign-on: sends the browser to the OpenID Connect provider (authorization
    code flow with PKCE); 404 when not configured."""
    provider = _oidc(request)
    db: Database = request.app.state.db
    try:
        url, state = await run_in_threadpool(
            lambda: oidc.begin(db, provider, _redirect_uri(request), return_to=next)
        )
    except oidc.ProviderError as exc:
        log.warning("single sign-on unavailable: %s", exc)
        return _to_login(oidc.OidcOutcome.provider_unavailable)
    response = RedirectResponse(url, status_code=303)
    response.set_cookie(
        OIDC_STATE_COOKIE,
        state,
        max_age=math.ceil(oidc.PENDING_FOR.total_seconds()),
        path=_OIDC_COOKIE_PATH,
        httponly=True,
        samesite="lax",  # sent on the provider's redirect back (a top-level GET)
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/api/auth/oidc/callback", name="oidc_callback")
async def oidc_callback(
    request: Request,
    state: Annotated[str, Query(max_length=256)] = "",
    code: Annotated[str | None, Query(max_length=4096)] = None,
    error: Annotated[str | None, Query(max_length=256)] = None,
) -> RedirectResponse:
    """Where the provider sends the browser back: signs in and goes to the page (or back to
    the sign-in page naming what went wrong). Each attempt writes one audit record."""
    provider = _oidc(request)
    db: Database = request.app.state.db
    result = await run_in_threadpool(
        lambda: oidc.finish(
            db,
            provider,
            state=state,
            browser_state=request.cookies.get(OIDC_STATE_COOKIE),
            code=code,
            error=error,
            redirect_uri=_redirect_uri(request),
        )
    )
    if not result.ok or result.account is None:
        name = _audit_name(result.username or "?")
        await run_in_threadpool(_audit_failure, request, name, "oidc", result.outcome.value)
        return _to_login(result.outcome)
    response = RedirectResponse(result.return_to, status_code=303)
    response.delete_cookie(OIDC_STATE_COOKIE, path=_OIDC_COOKIE_PATH)
    await run_in_threadpool(_start_session, request, result.account, "oidc", response)
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
