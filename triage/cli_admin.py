"""``triage accounts``, ``triage tokens`` and ``triage audit``: accounts, API tokens and the
audit trail from the command line (the first admin account is made here).

Every change is audited with the actor ``cli:<operating-system user>``.
"""

from __future__ import annotations

import getpass
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, NoReturn

import typer
from rich.table import Table

from triage.auth.roles import Permission, Role

accounts_app = typer.Typer(help="Accounts that sign in: radiologists, admins, integrations.")
tokens_app = typer.Typer(help="Bearer tokens for the API and integrations.")
audit_app = typer.Typer(help="The tamper-evident audit trail.")

RoleOption = Annotated[Role, typer.Option("--role", help="radiologist, admin or integration.")]


def _cli():  # type: ignore[no-untyped-def]
    from triage import cli  # late: triage.cli registers these groups at import

    return cli


def _fail(message: str, code: int = 2) -> NoReturn:
    _cli()._fail(message, code)
    raise AssertionError("unreachable")  # _fail exits


def _db(data_dir: str | None):  # type: ignore[no-untyped-def]
    """The data folder's database (``--data-dir`` when given), created when new."""
    from pathlib import Path

    cli = _cli()
    settings = cli._settings(Path(data_dir) if data_dir else None)
    try:
        settings.ensure_dirs()
    except OSError as exc:
        _fail(f"cannot create the data folder {settings.data_dir}: {exc.strerror or exc}")
    return cli._open_db(settings)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:64]
    except Exception:
        return "cli:unknown"


def _audit(db, action: str, target_kind: str, target: str, **detail: object) -> None:  # type: ignore[no-untyped-def]
    from triage.audit import atna
    from triage.audit.chain import AuditEvent, append

    try:
        atna.install(_cli()._settings(None))  # TRIAGE_ATNA_SYSLOG, when set
    except (ValueError, OSError) as exc:
        _fail(f"TRIAGE_ATNA_SYSLOG: {exc}")
    try:
        append(
            db,
            AuditEvent(
                action=action,
                actor=_actor(),
                target_kind=target_kind,
                target=target,
                source_address="local",
                detail=detail,
            ),
        )
    finally:
        atna.close(timeout=5.0)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


DataDir = Annotated[
    str | None,
    typer.Option(
        "--data-dir", help="The data folder (default: TRIAGE_DATA_DIR).", show_default=False
    ),
]


@accounts_app.command("add")
def accounts_add(
    username: str,
    role: RoleOption = Role.radiologist,
    display_name: Annotated[str | None, typer.Option("--name", help="Shown on the page.")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    no_password: Annotated[
        bool,
        typer.Option("--no-password", help="No local password (token-only integrations)."),
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Create an account (the first admin too). Passwords: at least 12 characters."""
    from triage.auth.accounts import AccountError, create_account

    db = _db(data_dir)
    password = None if no_password else _read_password(password_stdin)
    try:
        account = create_account(db, username, role, password=password, display_name=display_name)
    except AccountError as exc:
        _fail(str(exc))
    _audit(db, "account_create", "account", account.username, role=account.role.value)
    typer.echo(f"created {account.role.value} account {account.username}")


@accounts_app.command("list")
def accounts_list(
    as_json: Annotated[bool, typer.Option("--json")] = False, data_dir: DataDir = None
) -> None:
    """List the accounts."""
    from triage.auth.accounts import list_accounts

    accounts = list_accounts(_db(data_dir))
    if as_json:
        sys.stdout.write(json.dumps({"items": [a.as_dict() for a in accounts]}, indent=2) + "\n")
        return
    cli = _cli()
    table = Table(title="Accounts")
    for col in ("username", "name", "role", "source", "state", "last sign-in"):
        table.add_column(col)
    for a in accounts:
        state = "disabled" if a.disabled else "enabled"
        last = a.last_login_at.isoformat()[:19] if a.last_login_at else ""
        table.add_row(
            *(
                cli._cell(v)
                for v in (a.username, a.display_name or "", a.role, a.source, state, last)
            )
        )
    cli.console.print(table)


def _change(data_dir: str | None, action: str, username: str, **detail: object) -> None:
    from triage.auth.accounts import (
        AccountError,
        set_disabled,
        set_grants,
        set_password,
        set_role,
    )

    db = _db(data_dir)
    try:
        if action == "account_role":
            set_role(db, username, Role(str(detail["role"])))
        elif action in ("account_disable", "account_enable"):
            set_disabled(db, username, action == "account_disable")
        elif action == "account_password":
            set_password(db, username, str(detail.pop("password")))  # ends its sessions
        elif action == "account_grants":
            set_grants(db, username, list(detail["grants"]))  # type: ignore[call-overload]
    except AccountError as exc:
        _fail(str(exc))
    _audit(db, action, "account", username, **detail)
    typer.echo(f"{action.removeprefix('account_')}: {username}")


@accounts_app.command("set-role")
def accounts_set_role(username: str, role: RoleOption, data_dir: DataDir = None) -> None:
    """Give an account another role."""
    _change(data_dir, "account_role", username, role=role.value)


@accounts_app.command("disable")
def accounts_disable(username: str, data_dir: DataDir = None) -> None:
    """Disable an account (it cannot sign in; its tokens stop working)."""
    _change(data_dir, "account_disable", username)


@accounts_app.command("enable")
def accounts_enable(username: str, data_dir: DataDir = None) -> None:
    """Enable a disabled account again."""
    _change(data_dir, "account_enable", username)


@accounts_app.command("set-password")
def accounts_set_password(
    username: str,
    password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
    data_dir: DataDir = None,
) -> None:
    """Set a local account's password (and lift a lockout)."""
    _change(data_dir, "account_password", username, password=_read_password(password_stdin))


@accounts_app.command("grant")
def accounts_grant(
    username: str,
    permissions: Annotated[
        list[Permission] | None,
        typer.Argument(help="Permissions beyond the role's; none: take every grant away."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Grant an account permissions beyond its role's (replacing earlier grants), e.g. an
    integration that may read patient names: ``triage accounts grant ris view_patients``."""
    _change(data_dir, "account_grants", username, grants=sorted(p.value for p in permissions or []))


@tokens_app.command("create")
def tokens_create(
    username: str,
    name: Annotated[str, typer.Option("--name", help="What the token is for, e.g. 'RIS'.")],
    days: Annotated[
        int | None, typer.Option("--days", min=1, help="Expires after this many days.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a token for an account; it is printed once, only its hash is kept."""
    from triage.auth.accounts import AccountError
    from triage.auth.tokens import create_token

    db = _db(data_dir)
    expires = datetime.now(UTC) + timedelta(days=days) if days else None
    try:
        token, info = create_token(db, username, name, expires_at=expires)
    except AccountError as exc:
        _fail(str(exc))
    _audit(db, "token_create", "token", str(info.id), account=username, name=info.name)
    typer.echo(token)


@tokens_app.command("list")
def tokens_list(
    username: Annotated[str | None, typer.Argument()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    data_dir: DataDir = None,
) -> None:
    """List tokens (never the tokens themselves: their first characters)."""
    from triage.auth.tokens import list_tokens

    tokens = list_tokens(_db(data_dir), username)
    if as_json:
        sys.stdout.write(json.dumps({"items": [t.as_dict() for t in tokens]}, indent=2) + "\n")
        return
    cli = _cli()
    table = Table(title="Tokens")
    for col in ("id", "account", "name", "starts", "created", "expires", "revoked"):
        table.add_column(col)
    for t in tokens:
        table.add_row(
            *(
                cli._cell(v)
                for v in (
                    t.id,
                    t.username,
                    t.name,
                    t.prefix,
                    t.created_at.isoformat()[:19],
                    t.expires_at.isoformat()[:19] if t.expires_at else "",
                    t.revoked_at.isoformat()[:19] if t.revoked_at else "",
                )
            )
        )
    cli.console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int, data_dir: DataDir = None) -> None:
    """Revoke a token by its id (``triage tokens list``)."""
    from triage.auth.accounts import AccountError
    from triage.auth.tokens import revoke_token

    db = _db(data_dir)
    try:
        info = revoke_token(db, token_id)
    except AccountError as exc:
        _fail(str(exc))
    _audit(db, "token_revoke", "token", str(info.id), account=info.username)
    typer.echo(f"revoked token {info.id} ({info.prefix}...) of {info.username}")


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None) -> None:
    """Check the audit chain; exit 1 naming the first broken record."""
    from triage.audit.chain import verify

    result = verify(_db(data_dir))
    if result.ok:
        typer.echo(f"audit trail intact: {result.checked} record(s)")
        return
    typer.echo(f"audit trail broken at record {result.first_bad_id}: {result.problem}", err=True)
    raise typer.Exit(1)


@audit_app.command("list")
def audit_list(
    actor: Annotated[str | None, typer.Option("--actor")] = None,
    action: Annotated[str | None, typer.Option("--action")] = None,
    target: Annotated[str | None, typer.Option("--target")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    data_dir: DataDir = None,
) -> None:
    """The newest audit records, filtered."""
    from triage.audit.chain import listing

    items = listing(
        _db(data_dir),
        actor=actor,
        action=action,
        target=target,
        limit=limit,
    )
    if as_json:
        sys.stdout.write(json.dumps({"items": items}, indent=2) + "\n")
        return
    cli = _cli()
    table = Table(title="Audit trail")
    for col in ("#", "at", "actor", "action", "outcome", "target", "from"):
        table.add_column(col)
    for r in items:
        table.add_row(
            *(
                cli._cell(v)
                for v in (
                    r["id"],
                    str(r["at"])[:19],
                    r["actor"] or "",
                    r["action"],
                    r["outcome"],
                    f"{r['target_kind'] or ''} {r['target'] or ''}".strip(),
                    r["source_address"] or "",
                )
            )
        )
    cli.console.print(table)
