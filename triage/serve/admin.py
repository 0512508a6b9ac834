"""Accounts, tokens and the audit trail over HTTP, for admins (the page's admin view and
scripts): the same operations as ``triage accounts``, ``triage tokens`` and ``triage audit``,
each change written to the audit trail as one record naming the admin who made it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from triage.audit import chain
from triage.audit.chain import Outcome
from triage.auth import accounts, tokens
from triage.auth.accounts import AccountError
from triage.auth.roles import Permission, Role
from triage.db import Database
from triage.serve.auth import ManageAccounts, ReadAudit, audit

router = APIRouter(tags=["administration"])
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
"""Filters hold no control characters (PostgreSQL cannot compare text holding NUL)."""


class NewAccount(BaseModel):
    username: str = Field(description="1-64 letters, digits, '.', '_', '@' or '-'.")
    role: Role
    password: str | None = Field(
        default=None, description="At least 12 characters; none: a token-only account."
    )
    display_name: str | None = Field(default=None, max_length=128)
    grants: list[Permission] = Field(
        default_factory=list, description="Permissions beyond the role's."
    )


class AccountChange(BaseModel):
    role: Role | None = None
    disabled: bool | None = None
    password: str | None = None
    grants: list[Permission] | None = None


class NewToken(BaseModel):
    username: str
    name: str = Field(description="What the token is for (1-64 printable characters).")
    days: int | None = Field(
        default=None, ge=1, le=3650, description="Expires after this many days (default: never)."
    )


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _refused(exc: AccountError) -> HTTPException:
    status = 404 if str(exc).startswith("no account") or str(exc).startswith("no token") else 400
    return HTTPException(status_code=status, detail=str(exc))


@router.get("/api/accounts")
def list_accounts(principal: ManageAccounts, request: Request) -> dict[str, Any]:
    """Every account with its role, source, state and grants."""
    return {"accounts": [a.as_dict() for a in accounts.list_accounts(_db(request))]}


@router.post("/api/accounts", status_code=201)
def create_account(body: NewAccount, principal: ManageAccounts, request: Request) -> JSONResponse:
    """Create a local account (409 when the name is taken)."""
    db = _db(request)
    try:
        account = accounts.create_account(
            db, body.username, body.role, password=body.password, display_name=body.display_name
        )
        if body.grants:
            account = accounts.set_grants(db, account.username, body.grants)
    except AccountError as exc:
        status = 409 if "exists already" in str(exc) else 400
        raise HTTPException(status_code=status, detail=str(exc)) from None
    audit(
        request,
        "account_create",
        principal=principal,
        target_kind="account",
        target=account.username,
        detail={"role": account.role.value, "grants": sorted(g.value for g in account.grants)},
    )
    return JSONResponse(account.as_dict(), status_code=201)


def _apply(db: Database, username: str, body: AccountChange) -> tuple[str, dict[str, Any]]:
    """Apply one change; (its audit action, its detail)."""
    if body.role is not None:
        accounts.set_role(db, username, body.role)
        return "account_role", {"role": body.role.value}
    if body.disabled is not None:
        accounts.set_disabled(db, username, body.disabled)
        return ("account_disable" if body.disabled else "account_enable"), {}
    if body.password is not None:
        accounts.set_password(db, username, body.password)  # ends its sessions too
        return "account_password", {}
    if body.grants is not None:
        account = accounts.set_grants(db, username, body.grants)
        return "account_grants", {"grants": sorted(g.value for g in account.grants)}
    raise AccountError("name one change: role, disabled, password or grants")


@router.patch("/api/accounts/{username}")
def change_account(
    username: str, body: AccountChange, principal: ManageAccounts, request: Request
) -> dict[str, Any]:
    """Change one thing of an account: its role, whether it is disabled, its password (which
    signs out its sessions) or its grants. The last enabled admin cannot be disabled or
    demoted (409)."""
    db = _db(request)
    if sum(v is not None for v in body.model_dump().values()) != 1:
        raise HTTPException(
            status_code=400, detail="name exactly one change: role, disabled, password or grants"
        )
    try:
        action, detail = _apply(db, username, body)
    except AccountError as exc:
        if "last" in str(exc) and "admin" in str(exc):
            raise HTTPException(status_code=409, detail=str(exc)) from None
        raise _refused(exc) from None
    audit(
        request, action, principal=principal, target_kind="account", target=username, detail=detail
    )
    account = accounts.get_account(db, username)
    assert account is not None
    return account.as_dict()


@router.get("/api/tokens")
def list_tokens(
    principal: ManageAccounts,
    request: Request,
    username: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)] = None,
) -> dict[str, Any]:
    """API tokens (never the token itself: its first characters), of one account or all."""
    return {"tokens": [t.as_dict() for t in tokens.list_tokens(_db(request), username)]}


@router.post("/api/tokens", status_code=201)
def create_token(body: NewToken, principal: ManageAccounts, request: Request) -> JSONResponse:
    """A new token for an account; the answer is the only time the token is shown."""
    expires = datetime.now(UTC) + timedelta(days=body.days) if body.days else None
    try:
        token, info = tokens.create_token(
            _db(request), body.username, body.name, expires_at=expires
        )
    except AccountError as exc:
        raise _refused(exc) from None
    audit(
        request,
        "token_create",
        principal=principal,
        target_kind="token",
        target=str(info.id),
        detail={"account": info.username, "name": info.name},
    )
    return JSONResponse({**info.as_dict(), "token": token}, status_code=201)


@router.delete("/api/tokens/{token_id}")
def revoke_token(token_id: int, principal: ManageAccounts, request: Request) -> dict[str, Any]:
    """Revoke a token: it stops working at once."""
    try:
        info = tokens.revoke_token(_db(request), token_id)
    except AccountError as exc:
        raise _refused(exc) from None
    audit(
        request,
        "token_revoke",
        principal=principal,
        target_kind="token",
        target=str(token_id),
        detail={"account": info.username},
    )
    return info.as_dict()


@router.get("/api/audit")
async def list_audit(
    principal: ReadAudit,
    request: Request,
    actor: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)] = None,
    action: Annotated[str | None, Query(max_length=32, pattern=PRINTABLE)] = None,
    target: Annotated[str | None, Query(max_length=128, pattern=PRINTABLE)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> dict[str, Any]:
    """Audit records, newest first, filtered by who, what, which target and when. Reading
    the trail is itself recorded (``audit_list``)."""
    db = _db(request)
    records = await run_in_threadpool(
        lambda: chain.listing(
            db, actor=actor, action=action, target=target, since=since, until=until, limit=limit
        )
    )
    filters = {
        k: v
        for k, v in {"actor": actor, "action": action, "target": target}.items()
        if v is not None
    }
    await run_in_threadpool(
        lambda: audit(
            request, "audit_list", principal=principal, target_kind="audit", detail=filters
        )
    )
    return {"records": records}


@router.get("/api/audit/verify")
async def verify_audit(principal: ReadAudit, request: Request) -> JSONResponse:
    """Check the hash chain: 200 ``{"ok": true, "checked": N}``, or 409 naming the first
    record that breaks it (also recorded, and sent to ATNA as a Security Alert)."""
    db = _db(request)
    result = await run_in_threadpool(chain.verify, db)
    await run_in_threadpool(
        lambda: audit(
            request,
            "audit_verify",
            principal=principal,
            outcome=Outcome.success if result.ok else Outcome.failure,
            target_kind="audit",
            detail={"checked": result.checked, "first_bad_id": result.first_bad_id},
        )
    )
    doc = {
        "ok": result.ok,
        "checked": result.checked,
        "first_bad_id": result.first_bad_id,
        "problem": result.problem,
    }
    return JSONResponse(doc, status_code=200 if result.ok else 409)
