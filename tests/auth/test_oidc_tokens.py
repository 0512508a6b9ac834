"""The ID token checks of ``triage.auth.oidc`` (signature, algorithm, issuer, audience,
expiry, nonce, key rotation) on tokens signed here with keys the provider publishes."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey, RSAKey

from triage.auth.oidc import OidcSettings, Provider, _id_claims
from triage.auth.roles import Role

ISSUER = "https://sso.example.org"
CLIENT = "triage"
NONCE = "n-0123456789"


class StaticProvider(Provider):
    """A provider whose discovery and keys are given (no network); counts key fetches."""

    def __init__(self, published: list[RSAKey]) -> None:
        super().__init__(
            OidcSettings(
                issuer=ISSUER,
                client_id=CLIENT,
                client_secret="s",
                group_roles={"r": Role.radiologist},
            )
        )
        self.published = published
        self.fetches = 0

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": ISSUER,
            "jwks_uri": "unused",
            "authorization_endpoint": "a",
            "token_endpoint": "t",
        }

    def keys(self, *, refresh: bool = False) -> KeySet:
        if self._keys is None or refresh:
            self.fetches += 1
            self._keys = KeySet([k for k in self.published])
        return self._keys


def key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid})


def token(signer: Any, alg: str = "RS256", **changes: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": CLIENT,
        "sub": "u1",
        "exp": now + 300,
        "iat": now,
        "nonce": NONCE,
    }
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    kid = signer.kid if hasattr(signer, "kid") else None
    header = {"alg": alg, **({"kid": kid} if kid else {})}
    return jwt.encode(header, claims, signer, algorithms=[alg])


@pytest.fixture(scope="module")
def signing_key() -> RSAKey:
    return key("k1")


def check(provider: Provider, id_token: str) -> dict[str, Any]:
    return _id_claims(provider, id_token, NONCE, datetime.now(UTC))


def test_a_good_token_passes(signing_key: RSAKey) -> None:
    claims = check(StaticProvider([signing_key]), token(signing_key))
    assert claims["sub"] == "u1"


@pytest.mark.parametrize(
    "changes",
    [
        {"iss": "https://evil.example.org"},
        {"aud": "another-client"},
        {"nonce": "replayed"},
        {"nonce": None},
        {"exp": int(time.time()) - 3600},
        {"sub": None},
    ],
    ids=["issuer", "audience", "nonce", "no-nonce", "expired", "no-subject"],
)
def test_a_token_failing_a_claim_check_is_refused(
    signing_key: RSAKey, changes: dict[str, Any]
) -> None:
    with pytest.raises(JoseError):
        check(StaticProvider([signing_key]), token(signing_key, **changes))


def test_a_token_signed_by_another_key_is_refused(signing_key: RSAKey) -> None:
    with pytest.raises(JoseError):
        check(StaticProvider([signing_key]), token(key("k1")))


def test_a_shared_secret_signature_is_refused(signing_key: RSAKey) -> None:
    """HS256 with any secret (e.g. the public key's bytes, the classic confusion) is not an
    accepted algorithm."""
    secret = OctKey.import_key("a shared secret of enough length for hs256!!")
    with pytest.raises(JoseError):
        check(StaticProvider([signing_key]), token(secret, alg="HS256"))


def test_a_rotated_key_is_fetched_once(signing_key: RSAKey) -> None:
    provider = StaticProvider([signing_key])
    assert check(provider, token(signing_key))
    new = key("k2")
    provider.published = [signing_key, new]
    assert check(provider, token(new))["sub"] == "u1"
    assert provider.fetches == 2  # the first fetch, and once again for the unknown kid
