"""Sign-in through an OpenID Connect provider (the hospital's single sign-on): the
authorization code flow with PKCE, for the page.

1. :func:`begin` makes a state, a nonce and a PKCE verifier, keeps them (the state as a
   sha256) in ``oidc_logins`` and returns the provider's authorization URL; the browser
   also gets the state in a cookie, so only the browser that started a sign-in can finish
   it (no login CSRF).
2. :func:`finish` takes the provider's answer (code and state) once, within
   :data:`PENDING_FOR`, exchanges the code at the token endpoint (client secret, PKCE
   verifier), and checks the ID token (``joserfc``): signed by a key of the provider's
   JWKS with an asymmetric algorithm, issuer, audience, expiry and nonce.
3. The username comes from a claim (``preferred_username`` by default), the role from the
   groups claim mapped through ``TRIAGE_OIDC_GROUP_ROLES`` (the highest wins; in no mapped
   group: refused), the display name from ``name``. Claims missing from the ID token are
   read from the userinfo endpoint. The local account (``source=oidc``) is kept in step as
   for the directory (``triage.auth.accounts.upsert_directory_account``).

The provider's discovery document and keys are fetched when first needed and cached; an
unknown key id fetches the keys again once (key rotation).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete, select

from triage.auth.accounts import (
    Account,
    AccountError,
    AccountSource,
    _aware,
    upsert_directory_account,
)
from triage.auth.roles import Role, highest_role
from triage.db import Database
from triage.db.tables import OidcLoginRow

if TYPE_CHECKING:
    from triage.config import Settings

log = logging.getLogger(__name__)

PENDING_FOR = timedelta(minutes=10)
"""How long a sign-in may take at the provider."""
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
"""ID token signatures accepted: asymmetric only (never ``none`` or a shared secret)."""
LEEWAY_SECONDS = 60


class OidcConfigError(ValueError):
    """The OpenID Connect settings cannot work; ``str(exc)`` names the setting."""


class OidcOutcome(enum.StrEnum):
    ok = "ok"
    bad_state = "bad_state"
    """Unknown, used, expired, or not this browser's sign-in."""
    provider_error = "provider_error"
    """The provider answered with an error (the user cancelled, consent refused...)."""
    provider_unavailable = "provider_unavailable"
    """The provider could not be reached or answered something unusable."""
    bad_token = "bad_token"
    """The ID token failed a check (signature, issuer, audience, expiry, nonce)."""
    no_username = "no_username"
    """No usable username in the claims."""
    no_role = "no_role"
    """In no group that maps to a role."""
    taken = "taken"
    """An account of another source holds the name."""
    disabled = "disabled"


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str | None
    group_roles: Mapping[str, Role]
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    username_claim: str = "preferred_username"
    groups_claim: str = "groups"
    display_name: str = "single sign-on"
    ca_file: Path | None = None
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        loopback = ("http://127.0.0.1", "http://localhost", "http://[::1]")
        if not self.issuer.startswith(("https://", *loopback)):
            raise OidcConfigError(
                "TRIAGE_OIDC_ISSUER must be an https:// URL (http:// only on this machine)"
            )
        if not self.client_id:
            raise OidcConfigError("TRIAGE_OIDC_CLIENT_ID is needed with TRIAGE_OIDC_ISSUER")
        if not self.group_roles:
            raise OidcConfigError(
                "TRIAGE_OIDC_GROUP_ROLES is needed with TRIAGE_OIDC_ISSUER: no one could sign"
                " in without a group mapped to a role"
            )
        if "openid" not in self.scopes:
            raise OidcConfigError("TRIAGE_OIDC_SCOPES must include openid")

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcSettings | None:
        if not settings.oidc_issuer:
            return None
        secret = settings.oidc_client_secret
        return cls(
            issuer=settings.oidc_issuer.rstrip("/"),
            client_id=settings.oidc_client_id or "",
            client_secret=secret.get_secret_value() if secret else None,
            group_roles={g: Role(r) for g, r in settings.oidc_group_roles.items()},
            scopes=tuple(settings.oidc_scopes),
            username_claim=settings.oidc_username_claim,
            groups_claim=settings.oidc_groups_claim,
            display_name=settings.oidc_display_name,
            ca_file=settings.oidc_ca_file,
            timeout_seconds=settings.oidc_timeout_seconds,
        )


@dataclass(frozen=True)
class OidcSignIn:
    outcome: OidcOutcome
    account: Account | None = None
    return_to: str = "/"
    username: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == OidcOutcome.ok


class ProviderError(Exception):
    """The provider could not be reached or gave something unusable."""


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _safe_return(path: str) -> str:
    """Only a path on this server (never ``//host`` or a URL): no open redirect."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path or len(path) > 512:
        return "/"
    return path


@dataclass
class Provider:
    """The provider's discovery document and keys, fetched once and cached."""

    settings: OidcSettings
    _metadata: dict[str, Any] | None = None
    _keys: KeySet | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self) -> httpx.Client:
        verify: Any = str(self.settings.ca_file) if self.settings.ca_file else True
        return httpx.Client(timeout=self.settings.timeout_seconds, verify=verify)

    def _get_json(self, url: str) -> dict[str, Any]:
        try:
            with self._client() as client:
                answer = client.get(url, headers={"Accept": "application/json"})
            answer.raise_for_status()
            doc = answer.json()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise ProviderError(f"{url}: {exc}") from None
        if not isinstance(doc, dict):
            raise ProviderError(f"{url}: not a JSON object")
        return doc

    def metadata(self) -> dict[str, Any]:
        with self._lock:
            if self._metadata is None:
                doc = self._get_json(f"{self.settings.issuer}/.well-known/openid-configuration")
                if str(doc.get("issuer", "")).rstrip("/") != self.settings.issuer:
                    raise ProviderError(
                        f"the provider calls itself {doc.get('issuer')!r}, not"
                        f" {self.settings.issuer!r} (TRIAGE_OIDC_ISSUER)"
                    )
                for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                    if not isinstance(doc.get(key), str):
                        raise ProviderError(f"the discovery document has no {key}")
                self._metadata = doc
            return self._metadata

    def keys(self, *, refresh: bool = False) -> KeySet:
        jwks_uri = str(self.metadata()["jwks_uri"])
        with self._lock:
            if self._keys is None or refresh:
                try:
                    self._keys = KeySet.import_key_set(self._get_json(jwks_uri))  # type: ignore[arg-type]
                except (JoseError, ValueError, TypeError) as exc:
                    raise ProviderError(f"the provider's keys cannot be read: {exc}") from None
            return self._keys

    def exchange(self, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
            "client_id": self.settings.client_id,
        }
        secret = self.settings.client_secret
        auth: httpx.Auth | None = (
            httpx.BasicAuth(self.settings.client_id, secret) if secret else None
        )
        try:
            with self._client() as client:
                answer = client.post(
                    str(self.metadata()["token_endpoint"]),
                    data=form,
                    auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
                    headers={"Accept": "application/json"},
                )
            doc = answer.json()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise ProviderError(f"token endpoint: {exc}") from None
        if answer.status_code != 200 or not isinstance(doc, dict):
            error = doc.get("error") if isinstance(doc, dict) else None
            raise ProviderError(f"token endpoint answered {answer.status_code} {error or ''}")
        return doc

    def userinfo(self, access_token: str) -> dict[str, Any]:
        url = self.metadata().get("userinfo_endpoint")
        if not isinstance(url, str):
            return {}
        try:
            with self._client() as client:
                answer = client.get(url, headers={"Authorization": f"Bearer {access_token}"})
            answer.raise_for_status()
            doc = answer.json()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise ProviderError(f"userinfo endpoint: {exc}") from None
        return doc if isinstance(doc, dict) else {}


def begin(
    db: Database,
    provider: Provider,
    redirect_uri: str,
    *,
    return_to: str = "/",
    now: datetime | None = None,
) -> tuple[str, str]:
    """Start a sign-in: (the provider's authorization URL, the state for the browser's
    cookie). Raises :class:`ProviderError` when the provider cannot be reached."""
    now = now or datetime.now(UTC)
    meta = provider.metadata()
    state = secrets.token_urlsafe(32)
    nonce = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43-128
    with db.session() as s:
        s.execute(delete(OidcLoginRow).where(OidcLoginRow.created_at < now - PENDING_FOR))
        s.add(
            OidcLoginRow(
                state_sha256=_digest(state),
                nonce=nonce,
                code_verifier=verifier,
                return_to=_safe_return(return_to),
                created_at=now,
            )
        )
    query = urlencode(
        {
            "response_type": "code",
            "client_id": provider.settings.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(provider.settings.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": _s256(verifier),
            "code_challenge_method": "S256",
        }
    )
    endpoint = str(meta["authorization_endpoint"])
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", state


@dataclass(frozen=True)
class _Pending:
    nonce: str
    code_verifier: str
    return_to: str


def _take_pending(db: Database, state: str, now: datetime) -> _Pending | None:
    """The sign-in this state started, removed (a state works once), or None."""
    with db.session() as s:
        row = s.scalars(
            select(OidcLoginRow).where(OidcLoginRow.state_sha256 == _digest(state))
        ).first()
        if row is None:
            return None
        pending = _Pending(row.nonce, row.code_verifier, row.return_to)
        created = _aware(row.created_at) or now
        # Removed by its id, and only once: of two concurrent callbacks one gets the row.
        gone = s.execute(delete(OidcLoginRow).where(OidcLoginRow.id == row.id))
        if not getattr(gone, "rowcount", 0):
            return None
    return pending if now - created <= PENDING_FOR else None


def _id_claims(provider: Provider, id_token: str, nonce: str, now: datetime) -> dict[str, Any]:
    """The checked claims of an ID token; raises :class:`JoseError` or ValueError."""
    keys = provider.keys()
    try:
        token = jwt.decode(id_token, keys, algorithms=list(ALGORITHMS))
    except JoseError:
        # An unknown key id: the provider may have rotated its keys.
        token = jwt.decode(id_token, provider.keys(refresh=True), algorithms=list(ALGORITHMS))
    registry = jwt.JWTClaimsRegistry(
        now=int(now.timestamp()),
        leeway=LEEWAY_SECONDS,
        iss={"essential": True, "value": provider.settings.issuer},
        aud={"essential": True, "value": provider.settings.client_id},
        exp={"essential": True},
        nonce={"essential": True, "value": nonce},
        sub={"essential": True},
    )
    registry.validate(token.claims)
    return dict(token.claims)


def _groups(value: object) -> list[str]:
    if isinstance(value, str):
        return [g.strip() for g in value.replace(";", ",").split(",") if g.strip()]
    if isinstance(value, list):
        return [str(g) for g in value]
    return []


def finish(
    db: Database,
    provider: Provider,
    *,
    state: str,
    browser_state: str | None,
    code: str | None,
    error: str | None,
    redirect_uri: str,
    now: datetime | None = None,
) -> OidcSignIn:
    """Finish a sign-in from the provider's answer at the redirect URI."""
    now = now or datetime.now(UTC)
    if not browser_state or not secrets.compare_digest(state.encode(), browser_state.encode()):
        return OidcSignIn(OidcOutcome.bad_state, detail="the sign-in was not started here")
    pending = _take_pending(db, state, now)
    if pending is None:
        return OidcSignIn(OidcOutcome.bad_state, detail="unknown, used or expired sign-in")
    back = pending.return_to
    if error or not code:
        return OidcSignIn(
            OidcOutcome.provider_error, return_to=back, detail=(error or "no code")[:64]
        )
    try:
        tokens = provider.exchange(code, pending.code_verifier, redirect_uri)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            return OidcSignIn(OidcOutcome.bad_token, return_to=back, detail="no ID token")
        try:
            claims = _id_claims(provider, id_token, pending.nonce, now)
        except (JoseError, ValueError) as exc:
            return OidcSignIn(OidcOutcome.bad_token, return_to=back, detail=str(exc)[:200])
        settings = provider.settings
        if (settings.username_claim not in claims or settings.groups_claim not in claims) and (
            isinstance(tokens.get("access_token"), str)
        ):
            extra = provider.userinfo(str(tokens["access_token"]))
            if extra.get("sub") == claims.get("sub"):  # OIDC Core 5.3.2
                claims = {**extra, **claims}
    except ProviderError as exc:
        log.warning("OpenID Connect sign-in failed: %s", exc)
        return OidcSignIn(OidcOutcome.provider_unavailable, return_to=back, detail=str(exc)[:200])
    username = claims.get(settings.username_claim)
    if not isinstance(username, str) or not username:
        return OidcSignIn(OidcOutcome.no_username, return_to=back, detail=settings.username_claim)
    groups = _groups(claims.get(settings.groups_claim))
    role = highest_role(settings.group_roles[g] for g in groups if g in settings.group_roles)
    if role is None:
        return OidcSignIn(OidcOutcome.no_role, return_to=back, username=username)
    name = claims.get("name")
    try:
        account = upsert_directory_account(
            db,
            username,
            role,
            display_name=name if isinstance(name, str) else None,
            source=AccountSource.oidc,
            now=now,
        )
    except AccountError as exc:
        return OidcSignIn(OidcOutcome.taken, return_to=back, username=username, detail=str(exc))
    if account.disabled:
        return OidcSignIn(OidcOutcome.disabled, account, back, username)
    return OidcSignIn(OidcOutcome.ok, account, back, username)
