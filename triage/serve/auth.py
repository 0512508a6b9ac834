"""Who is asking, and may they: the principal of each request and the check per route.

A request is signed in by a bearer token (``Authorization: Bearer trg_…``, for the API and
integrations; ``triage.auth.tokens``) or by the page's session cookie
(``triage.auth.sessions``). A token that is presented is the only credential looked at:
a wrong one is 401 even if a cookie is there too. A state-changing request signed in by
the cookie must carry the session's CSRF token in ``X-CSRF-Token`` (a page on another site
can make the browser send the cookie, but cannot read the token).

Each route declares the one permission it needs with :func:`require`; the permission is
also written into the OpenAPI document (``x-permission``), so the access tests can be
generated from it. No credentials: 401. The wrong role: 403.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.routing import APIRoute
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection

from triage.audit.chain import AuditEvent, Outcome, append, append_in
from triage.auth.accounts import Account
from triage.auth.ldap import LdapSettings
from triage.auth.oidc import Provider
from triage.auth.roles import Permission
from triage.auth.sessions import IDLE, MAX_AGE, Session, resolve_session
from triage.auth.tokens import resolve_token
from triage.db import Database

SESSION_COOKIE = "triage_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SIGNED_IN = "signed_in"
"""The ``x-permission`` of routes any signed-in account may use (who am I, sign out)."""

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="An API token (`triage tokens create USER --name NAME`): trg_…",
)
cookie_scheme = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    scheme_name="session",
    description="The page's session cookie, set by POST /api/auth/login; state-changing"
    f" requests also need the session's CSRF token in {CSRF_HEADER}.",
)


@dataclass(frozen=True)
class AuthConfig:
    """How sign-in works on this server."""

    session_idle: timedelta = IDLE
    session_max_age: timedelta = MAX_AGE
    ldap: LdapSettings | None = None
    oidc: Provider | None = None
    oidc_redirect_url: str | None = None
    """The redirect URI registered at the provider; None: this server's callback as the
    browser reached it."""


@dataclass(frozen=True)
class Principal:
    """The signed-in account of a request, and how it signed in."""

    account: Account
    session: Session | None = None
    address: str | None = None
    permissions: frozenset[Permission] = field(default_factory=frozenset)

    @property
    def username(self) -> str:
        return self.account.username

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def _principal(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    session_value: str | None,
) -> Principal:
    """The request's principal; raises 401 when it has none, 403 for a missing CSRF token."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    db: Database = request.app.state.db
    config: AuthConfig = request.app.state.auth
    address = client_address(request)
    if request.headers.get("authorization") is not None:
        if credentials is None:
            raise _unauthorized("the Authorization header must be 'Bearer <token>'")
        account = resolve_token(db, credentials.credentials)
        if account is None:
            raise _unauthorized("the token is unknown, revoked or expired, or its account disabled")
        principal = Principal(account, None, address, account.permissions)
    elif session_value:
        found = resolve_session(db, session_value, idle=config.session_idle)
        if found is None:
            raise _unauthorized("the session has ended: sign in again")
        account, session = found
        if request.method not in SAFE_METHODS and not secrets.compare_digest(
            request.headers.get(CSRF_HEADER, "").encode(), session.csrf_token.encode()
        ):
            raise HTTPException(
                status_code=403,
                detail=f"a request signed in by the page's session needs its {CSRF_HEADER}",
            )
        principal = Principal(account, session, address, account.permissions)
    else:
        raise _unauthorized("sign in first: a bearer token or the page's session")
    request.state.principal = principal
    return principal


def require(permission: Permission | None) -> Callable[..., Any]:
    """A dependency that returns the request's :class:`Principal` when it holds
    ``permission`` (None: any signed-in account), else raises 401 or 403."""

    def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
        session_value: Annotated[str | None, Depends(cookie_scheme)],
    ) -> Principal:
        principal = _principal(request, credentials, session_value)
        if permission is not None and not principal.may(permission):
            raise HTTPException(
                status_code=403,
                detail=f"the {principal.account.role} role may not do this ({permission})",
            )
        return principal

    dependency.permission = permission or SIGNED_IN  # type: ignore[attr-defined]
    return dependency


def _credentials_of(request: Request) -> tuple[HTTPAuthorizationCredentials | None, str | None]:
    header = request.headers.get("authorization")
    credentials = None
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=value.strip())
    return credentials, request.cookies.get(SESSION_COOKIE)


def signed_in_now(request: Request, permission: Permission) -> Principal | None:
    """The request's credential checked again, for a response that lasts (an event stream):
    its principal now, or None once the token is revoked, the session ended, the account
    disabled or the permission taken away."""
    request.state.principal = None
    credentials, session_value = _credentials_of(request)
    try:
        principal = _principal(request, credentials, session_value)
    except HTTPException:
        return None
    return principal if principal.may(permission) else None


def document_permissions(app: FastAPI) -> None:
    """Write each route's permission into the OpenAPI document as ``x-permission``
    (``public`` for routes without one), routers included."""

    def walk(routes: list[Any]) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)  # an included APIRouter
            if included is not None:
                walk(included.routes)
                continue
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            found = [
                getattr(dep.call, "permission", None)
                for dep in route.dependant.dependencies
                if getattr(dep.call, "permission", None) is not None
            ]
            route.openapi_extra = {
                **(route.openapi_extra or {}),
                "x-permission": found[0] if found else "public",
            }

    walk(app.routes)


def _event(
    request: Request,
    action: str,
    *,
    principal: Principal | None,
    actor: str | None,
    outcome: Outcome,
    target_kind: str | None,
    target: str | None,
    detail: Mapping[str, Any] | None,
) -> AuditEvent:
    return AuditEvent(
        action=action,
        outcome=outcome,
        actor=principal.username if principal else actor,
        actor_role=principal.account.role.value if principal else None,
        target_kind=target_kind,
        target=target,
        source_address=client_address(request),
        detail=dict(detail or {}),
    )


def audit(
    request: Request,
    action: str,
    *,
    principal: Principal | None = None,
    actor: str | None = None,
    outcome: Outcome = Outcome.success,
    target_kind: str | None = None,
    target: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Append one audit record of this request (who, from where, what); returns its id."""
    db: Database = request.app.state.db
    event = _event(
        request,
        action,
        principal=principal,
        actor=actor,
        outcome=outcome,
        target_kind=target_kind,
        target=target,
        detail=detail,
    )
    return append(db, event)


class AuditInTransaction:
    """The audit record of a successful change, written in the change's own transaction
    (``worklist.queue``'s ``record``: one commit for both, and no change without its record)
    and sent to the ATNA repository once committed (:meth:`committed`)."""

    def __init__(
        self,
        request: Request,
        action: str,
        *,
        principal: Principal,
        target_kind: str = "study",
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        self.request = request
        self.action = action
        self.principal = principal
        self.target_kind = target_kind
        self.detail = detail
        self._written: list[tuple[AuditEvent, datetime]] = []

    def __call__(self, conn: Connection, target: str) -> None:
        event = _event(
            self.request,
            self.action,
            principal=self.principal,
            actor=None,
            outcome=Outcome.success,
            target_kind=self.target_kind,
            target=target,
            detail=self.detail,
        )
        at = datetime.now(UTC)
        append_in(conn, event, now=at)
        self._written.append((event, at))

    def committed(self) -> None:
        """Send what was written to the ATNA repository (when one is configured)."""
        from triage.audit import atna  # late: as audit.chain.append does

        for event, at in self._written:
            atna.emit(event, at)
        self._written.clear()


SignedIn = Annotated[Principal, Depends(require(None))]
ViewPatients = Annotated[Principal, Depends(require(Permission.view_patients))]
Claim = Annotated[Principal, Depends(require(Permission.claim))]
Review = Annotated[Principal, Depends(require(Permission.review))]
ViewEvents = Annotated[Principal, Depends(require(Permission.view_events))]
ViewQuarantine = Annotated[Principal, Depends(require(Permission.view_quarantine))]
ManageAccounts = Annotated[Principal, Depends(require(Permission.manage_accounts))]
ReadAudit = Annotated[Principal, Depends(require(Permission.read_audit))]
