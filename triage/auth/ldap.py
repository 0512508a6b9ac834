"""Sign-in through the hospital's directory (LDAP, Active Directory).

The directory checks the password; nothing of it is kept here. One sign-in:

1. the username is checked like a local one (:func:`~triage.auth.accounts.username_problem`,
   so it holds no filter metacharacters) and an empty password is refused before anything
   is sent: a simple bind with an empty password is an *unauthenticated* bind (RFC 4513
   5.1.2), which many directories answer "success";
2. the service account (``TRIAGE_LDAP_BIND_DN``, or an anonymous session) searches
   ``TRIAGE_LDAP_USER_BASE`` with ``TRIAGE_LDAP_USER_FILTER``, the username escaped
   (RFC 4515): exactly one entry must answer;
3. a second connection binds as that entry's DN with the password: the directory's answer
   is the password check (its lockout and password policy apply);
4. the user's groups: their ``memberOf`` values (Active Directory, OpenLDAP's memberof
   overlay) and, when ``TRIAGE_LDAP_GROUP_BASE`` is set, the groups under it that list the
   DN as ``member`` or ``uniqueMember`` (groupOfNames, groupOfUniqueNames, AD groups);
5. ``TRIAGE_LDAP_GROUP_ROLES`` maps group DNs to roles; the highest wins (admin >
   radiologist > integration); a user in none of them is refused.

Every failure is an outcome, never an exception: a wrong or unknown user is
``bad_credentials`` (the two are not told apart), an unreachable, slow or misconfigured
directory ``directory_unavailable``; each is logged in one line, without the password.
:func:`sign_in_with_directory` then keeps the local account (``source=ldap``, no password)
in step with the directory: its role and display name are the directory's at each sign-in.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ldap3 import ANONYMOUS, NONE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from triage.auth.accounts import (
    Account,
    AccountError,
    upsert_directory_account,
    username_problem,
)
from triage.auth.passwords import MAX_LENGTH as MAX_PASSWORD_LENGTH
from triage.auth.roles import Role, highest_role
from triage.config import Settings
from triage.db import Database

log = logging.getLogger(__name__)

DEFAULT_USER_FILTER = "(&(objectClass=person)(uid={username}))"
"""The roles from highest to lowest: a user in several mapped groups gets the first."""

# Bind answers that mean "not this user with this password" (RFC 4511 4.1.9): Active
# Directory answers 49 for a wrong password, a disabled, expired or locked account alike.
_REFUSED_BIND_CODES = frozenset({48, 49, 50, 53})  # inappropriateAuth, invalidCredentials,
# insufficientAccessRights, unwillingToPerform
_SIZE_LIMIT_EXCEEDED = 4


class LdapConfigError(ValueError):
    """The ``TRIAGE_LDAP_*`` settings cannot work; ``str(exc)`` says which and why."""


class DirectoryOutcome(enum.StrEnum):
    ok = "ok"
    bad_credentials = "bad_credentials"
    """Unknown user, wrong or empty password, or a username that cannot be one."""
    no_role = "no_role"
    """The password is right but no group of the user maps to a role."""
    directory_unavailable = "directory_unavailable"
    """Unreachable, too slow, a TLS failure, or the service account refused."""
    local_account = "local_account"
    """(:func:`sign_in_with_directory` only) a local account holds the name."""
    disabled = "disabled"
    """(:func:`sign_in_with_directory` only) the local row of this user is disabled."""


def normal_dn(dn: str) -> str:
    """A DN in one spelling for comparisons: attribute types and values lower-cased, the
    spaces around separators gone (directory DNs compare case-insensitively)."""
    try:
        parts = parse_dn(dn, escape=False, strip=True)
    except LDAPException:
        return dn.strip().lower()
    return "".join(f"{attr.lower()}={value.lower()}{sep}" for attr, value, sep in parts)


@dataclass(frozen=True)
class LdapSettings:
    """How to reach the directory and read users and groups (see :class:`triage.config.Settings`
    for the meaning of each ``TRIAGE_LDAP_*`` field)."""

    url: str
    user_base: str
    group_roles: Mapping[str, Role]
    user_filter: str = DEFAULT_USER_FILTER
    bind_dn: str | None = None
    bind_password: str | None = field(default=None, repr=False)
    group_base: str | None = None
    starttls: bool = False
    ca_file: Path | None = None
    timeout_seconds: int = 5
    """Whole seconds: ldap3 sets the socket's receive timeout (SO_RCVTIMEO) from an int."""
    roles_by_dn: dict[str, Role] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
            raise LdapConfigError(
                f"TRIAGE_LDAP_URL {self.url!r} is not ldap://host[:port] or ldaps://host[:port]"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise LdapConfigError(f"TRIAGE_LDAP_URL {self.url!r} has a bad port") from None
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise LdapConfigError(
                f"TRIAGE_LDAP_URL {self.url!r}: only the scheme, host and port are read"
            )
        if self.starttls and self.use_ssl:
            raise LdapConfigError("TRIAGE_LDAP_STARTTLS is for ldap:// URLs (ldaps:// is TLS)")
        if not self.user_base.strip():
            raise LdapConfigError("TRIAGE_LDAP_USER_BASE is needed with TRIAGE_LDAP_URL")
        flt = self.user_filter.strip()
        if "{username}" not in flt or not (flt.startswith("(") and flt.endswith(")")):
            raise LdapConfigError(
                "TRIAGE_LDAP_USER_FILTER must be a parenthesised filter holding {username},"
                f" e.g. {DEFAULT_USER_FILTER}"
            )
        if self.bind_dn and not self.bind_password:
            # An empty password would make the service bind an unauthenticated one.
            raise LdapConfigError("TRIAGE_LDAP_BIND_DN needs TRIAGE_LDAP_BIND_PASSWORD")
        if self.bind_password and not self.bind_dn:
            raise LdapConfigError("TRIAGE_LDAP_BIND_PASSWORD is set without TRIAGE_LDAP_BIND_DN")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise LdapConfigError(f"TRIAGE_LDAP_CA_FILE {self.ca_file} is not a file")
        if not isinstance(self.timeout_seconds, int) or self.timeout_seconds < 1:
            raise LdapConfigError("TRIAGE_LDAP_TIMEOUT_SECONDS is a whole number of seconds, >= 1")
        if not self.group_roles:
            raise LdapConfigError(
                "TRIAGE_LDAP_GROUP_ROLES maps no group to a role: nobody could sign in"
            )
        roles: dict[str, Role] = {}
        for dn, role in self.group_roles.items():
            try:
                parse_dn(dn)
                roles[normal_dn(dn)] = Role(role)
            except (LDAPException, ValueError):
                raise LdapConfigError(
                    f"TRIAGE_LDAP_GROUP_ROLES: {dn!r} -> {role!r} is not a group DN and a role"
                    f" ({', '.join(r.value for r in Role)})"
                ) from None
        object.__setattr__(self, "roles_by_dn", roles)
        if not self.use_ssl and not self.starttls:
            _warn_cleartext(self.url, parts.hostname)

    @classmethod
    def from_settings(cls, settings: Settings) -> LdapSettings | None:
        """The directory settings, or None when ``TRIAGE_LDAP_URL`` is not set. Raises
        :class:`LdapConfigError` for settings that cannot work."""
        if not settings.ldap_url:
            return None
        return cls(
            url=settings.ldap_url,
            user_base=settings.ldap_user_base or "",
            group_roles={dn: Role(role) for dn, role in settings.ldap_group_roles.items()},
            user_filter=settings.ldap_user_filter,
            bind_dn=settings.ldap_bind_dn or None,
            bind_password=(
                settings.ldap_bind_password.get_secret_value()
                if settings.ldap_bind_password
                else None
            ),
            group_base=settings.ldap_group_base or None,
            starttls=settings.ldap_starttls,
            ca_file=settings.ldap_ca_file,
            timeout_seconds=settings.ldap_timeout_seconds,
        )

    @property
    def use_ssl(self) -> bool:
        return urlsplit(self.url).scheme.lower() == "ldaps"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (636 if self.use_ssl else 389)


@functools.cache
def _warn_cleartext(url: str, host: str) -> None:
    """Once per URL: passwords to a directory off this machine travel in clear."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning(
            "TRIAGE_LDAP_URL %s has neither ldaps:// nor TRIAGE_LDAP_STARTTLS: passwords"
            " cross the network in clear",
            url,
        )


@dataclass(frozen=True)
class DirectoryResult:
    """What the directory said of one sign-in. ``username`` is lower-cased (directory
    usernames compare case-insensitively; it names the local account)."""

    outcome: DirectoryOutcome
    username: str
    display_name: str | None = None
    role: Role | None = None
    dn: str | None = None
    groups: tuple[str, ...] = ()
    """The user's groups that map to a role (as the directory spells them)."""

    @property
    def ok(self) -> bool:
        return self.outcome == DirectoryOutcome.ok


class _Unavailable(Exception):
    """The directory answered in a way that is not the user's fault (logged by the caller)."""


@dataclass(frozen=True)
class _UserEntry:
    dn: str
    display_name: str | None
    member_of: tuple[str, ...]


def user_filter(settings: LdapSettings, username: str) -> str:
    """The search filter for ``username``, escaped so that no value can change the filter's
    structure (``*``, ``(``, ``)``, ``\\`` and NUL become ``\\2a``, ``\\28``, ``\\29``,
    ``\\5c``, ``\\00``)."""
    return settings.user_filter.strip().replace("{username}", escape_filter_chars(username))


def _server(settings: LdapSettings) -> Server:
    tls = None
    if settings.use_ssl or settings.starttls:
        host = settings.host
        try:
            ipaddress.ip_address(host)
            sni = None
        except ValueError:
            sni = host
        # The certificate is checked against the CA and the host name (ldap3 does both when
        # validate is CERT_REQUIRED; the context is Python's default, TLS 1.2 or later).
        tls = Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=str(settings.ca_file) if settings.ca_file else None,
            sni=sni,
        )
    return Server(
        settings.host,
        port=settings.port,
        use_ssl=settings.use_ssl,
        tls=tls,
        get_info=NONE,
        connect_timeout=settings.timeout_seconds,
    )


def _open(settings: LdapSettings, user: str | None, password: str | None) -> Connection:
    """A connection, TLS started when configured, not bound yet."""
    conn = Connection(
        _server(settings),
        user=user,
        password=password,
        authentication=SIMPLE if user else ANONYMOUS,
        auto_bind=False,
        auto_referrals=False,  # a referral would take the service password elsewhere
        receive_timeout=settings.timeout_seconds,
        raise_exceptions=False,
        read_only=True,
    )
    try:
        conn.open(read_server_info=False)
        if settings.starttls and not conn.start_tls(read_server_info=False):
            raise _Unavailable(f"StartTLS refused: {_describe(conn)}")
    except BaseException:
        _close(conn)
        raise
    return conn


def _close(conn: Connection) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass


def _values(attributes: Mapping[str, Any], name: str) -> list[str]:
    for key, value in attributes.items():
        if key.lower() == name.lower():
            if isinstance(value, list | tuple):
                return [str(v) for v in value]
            return [str(value)] if value not in (None, "") else []
    return []


def _find_user(conn: Connection, settings: LdapSettings, username: str) -> _UserEntry | None:
    """The one entry the user filter finds for ``username``; None for none or several."""
    conn.search(
        settings.user_base,
        user_filter(settings, username),
        search_scope=SUBTREE,
        attributes=["cn", "displayName", "memberOf"],
        size_limit=2,
        time_limit=settings.timeout_seconds,
    )
    code = conn.result.get("result") if conn.result else None
    if code not in (0, _SIZE_LIMIT_EXCEEDED):
        raise _Unavailable(f"the user search failed: {_describe(conn)}")
    entries = [r for r in conn.response or [] if r.get("type") == "searchResEntry"]
    if len(entries) != 1:
        if entries:
            log.warning(
                "directory sign-in of %r refused: TRIAGE_LDAP_USER_FILTER finds %s entries",
                username,
                "several" if code == _SIZE_LIMIT_EXCEEDED else len(entries),
            )
        return None
    attrs = entries[0].get("attributes") or {}
    names = _values(attrs, "displayName") or _values(attrs, "cn")
    return _UserEntry(
        dn=str(entries[0]["dn"]),
        display_name=names[0][:128] if names else None,
        member_of=tuple(_values(attrs, "memberOf")),
    )


def _describe(conn: Connection) -> str:
    result = conn.result or {}
    text = f"{result.get('description', '?')} ({result.get('result', '?')})"
    message = str(result.get("message") or "").strip()
    return f"{text}: {message}" if message else text


def _password_ok(settings: LdapSettings, name: str, dn: str, password: str) -> bool:
    """Bind as ``dn`` with ``password`` on a connection of its own: the directory checks it."""
    conn = _open(settings, dn, password)
    try:
        if conn.bind(read_server_info=False):
            return True
        code = conn.result.get("result") if conn.result else None
        if code in _REFUSED_BIND_CODES:
            log.info("directory sign-in of %r refused by the directory: %s", name, _describe(conn))
            return False
        raise _Unavailable(f"the user's bind failed: {_describe(conn)}")
    finally:
        _close(conn)


def _group_dns(conn: Connection, settings: LdapSettings, dn: str) -> list[str]:
    """Groups under ``TRIAGE_LDAP_GROUP_BASE`` listing ``dn`` as a member."""
    if not settings.group_base:
        return []
    member = escape_filter_chars(dn)
    conn.search(
        settings.group_base,
        f"(|(member={member})(uniqueMember={member}))",
        search_scope=SUBTREE,
        attributes=["1.1"],  # no attributes: the DNs are all that is needed
        time_limit=settings.timeout_seconds,
    )
    code = conn.result.get("result") if conn.result else None
    if code not in (0, _SIZE_LIMIT_EXCEEDED):
        raise _Unavailable(f"the group search failed: {_describe(conn)}")
    if code == _SIZE_LIMIT_EXCEEDED:
        log.warning("the group search of %s hit the directory's size limit: groups missed", dn)
    return [str(r["dn"]) for r in conn.response or [] if r.get("type") == "searchResEntry"]


def role_of(settings: LdapSettings, groups: list[str]) -> tuple[Role | None, tuple[str, ...]]:
    """The highest role the groups map to, and the groups that map to a role (each once)."""
    mapped: dict[str, tuple[str, Role]] = {}
    for group in groups:
        key = normal_dn(group)
        if key in settings.roles_by_dn:
            mapped.setdefault(key, (group, settings.roles_by_dn[key]))
    role = highest_role(role for _, role in mapped.values())
    return (role, tuple(group for group, _ in mapped.values())) if role else (None, ())


def authenticate(settings: LdapSettings, username: str, password: str) -> DirectoryResult:
    """Check ``username`` and ``password`` with the directory and read the user's role.

    Never raises for anything the directory or the network does: see
    :class:`DirectoryOutcome`.
    """
    name = username.lower()
    refused = DirectoryResult(DirectoryOutcome.bad_credentials, name)
    if username_problem(username):
        log.info("directory sign-in refused: %r cannot be a username", username[:80])
        return refused
    if not password or len(password) > MAX_PASSWORD_LENGTH:
        # Never sent: an empty password would make the bind unauthenticated, and "succeed".
        log.info("directory sign-in of %r refused: empty or oversized password", name)
        return refused
    service: Connection | None = None
    try:
        service = _open(settings, settings.bind_dn, settings.bind_password)
        if not service.bind(read_server_info=False):
            raise _Unavailable(f"the service account's bind was refused: {_describe(service)}")
        entry = _find_user(service, settings, username)
        if entry is None:
            log.info("directory sign-in of %r refused: no such user", name)
            return refused
        if not _password_ok(settings, name, entry.dn, password):
            return DirectoryResult(DirectoryOutcome.bad_credentials, name, dn=entry.dn)
        groups = list(entry.member_of) + _group_dns(service, settings, entry.dn)
    except _Unavailable as exc:
        log.error("directory sign-in of %r: directory unavailable: %s", name, exc)
        return DirectoryResult(DirectoryOutcome.directory_unavailable, name)
    except (LDAPException, OSError) as exc:
        log.error(
            "directory sign-in of %r: directory unavailable (%s): %s",
            name,
            settings.url,
            f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300],
        )
        return DirectoryResult(DirectoryOutcome.directory_unavailable, name)
    except Exception as exc:  # ldap3 lets a few others through (struct.error, ValueError)
        log.error(
            "directory sign-in of %r: directory unavailable (%s): unexpected %s: %s",
            name,
            settings.url,
            type(exc).__name__,
            str(exc).replace("\n", " ")[:300],
        )
        log.debug("the unexpected error's traceback", exc_info=True)
        return DirectoryResult(DirectoryOutcome.directory_unavailable, name)
    finally:
        if service is not None:
            _close(service)
    role, mapped = role_of(settings, groups)
    if role is None:
        log.info(
            "directory sign-in of %r refused: no group of this user maps to a role (%d groups)",
            name,
            len(groups),
        )
        return DirectoryResult(
            DirectoryOutcome.no_role, name, display_name=entry.display_name, dn=entry.dn
        )
    return DirectoryResult(
        DirectoryOutcome.ok,
        name,
        display_name=entry.display_name,
        role=role,
        dn=entry.dn,
        groups=mapped,
    )


@dataclass(frozen=True)
class DirectorySignIn:
    """A sign-in through the directory: its outcome, the local account on success (and when
    ``disabled``), and what the directory said."""

    outcome: DirectoryOutcome
    account: Account | None
    directory: DirectoryResult

    @property
    def ok(self) -> bool:
        return self.outcome == DirectoryOutcome.ok


def sign_in_with_directory(
    db: Database,
    settings: LdapSettings | Settings,
    username: str,
    password: str,
    *,
    now: datetime | None = None,
) -> DirectorySignIn:
    """Sign in through the directory and keep the local account (``source=ldap``) in step:
    created at the first sign-in, its role and display name the directory's each time.

    A local account (``source=local``) of the same name (compared case-insensitively) is
    never taken over: the sign-in is refused (``local_account``). A disabled account stays
    disabled (``disabled``, after the directory accepted the password, so that the answer
    tells nothing to someone without it). Raises :class:`LdapConfigError` when the
    directory is not configured.
    """
    ldap = settings if isinstance(settings, LdapSettings) else LdapSettings.from_settings(settings)
    if ldap is None:
        raise LdapConfigError("directory sign-in is not configured (TRIAGE_LDAP_URL)")
    result = authenticate(ldap, username, password)
    if not result.ok or result.role is None:
        return DirectorySignIn(result.outcome, None, result)
    try:
        account = upsert_directory_account(
            db, result.username, result.role, display_name=result.display_name, now=now
        )
    except AccountError as exc:
        log.warning("directory sign-in of %r refused: %s", result.username, exc)
        return DirectorySignIn(DirectoryOutcome.local_account, None, result)
    if account.disabled:
        log.info("directory sign-in of %r refused: the account is disabled", result.username)
        return DirectorySignIn(DirectoryOutcome.disabled, account, result)
    return DirectorySignIn(DirectoryOutcome.ok, account, result)
