"""The LemonLDAP::NG OpenID Connect provider of tests/auth/llng.py works, end to end, with plain
httpx (no triage code): discovery, the authorization-code flow with PKCE (S256) and a nonce,
the code exchanged for an ID token whose RS256 signature checks against the JWKS, the claims a
relying party needs (preferred_username, email, name, groups), and refusals (a wrong password,
a wrong code verifier, no code challenge, a code used twice).

The provider is started once for the module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.auth.llng import KEY_ID, OidcProvider, free_port, login_form, running_llng

REDIRECT_PORT = free_port()  # nothing listens there: the redirect is read, not followed
REDIRECT_URI = f"http://127.0.0.1:{REDIRECT_PORT}/api/auth/oidc/callback"


@pytest.fixture(scope="module")
def llng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    yield from running_llng(tmp_path_factory.mktemp("llng"), [REDIRECT_URI])


@pytest.fixture(scope="module")
def discovery(llng: OidcProvider) -> dict[str, Any]:
    response = httpx.get(llng.discovery_url, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


# -- a minimal relying party ----------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Authorization:
    """One authorization request: its secrets, and where the provider sent the browser."""

    state: str
    nonce: str
    verifier: str
    location: str | None  # the redirect to redirect_uri, when there is one
    last_page: httpx.Response

    @property
    def query(self) -> dict[str, str]:
        assert self.location is not None
        return {k: v[0] for k, v in parse_qs(urlsplit(self.location).query).items()}


def authorize(
    llng: OidcProvider,
    discovery: dict[str, Any],
    username: str,
    password: str,
    *,
    pkce: bool = True,
    scopes: tuple[str, ...] | None = None,
) -> Authorization:
    """A browser's part: the authorization request, the login form filled and posted; stops
    at the redirect to the relying party."""
    state, nonce, verifier = (secrets.token_urlsafe(16) for _ in range(3))
    params = {
        "response_type": "code",
        "client_id": llng.client_id,
        "redirect_uri": llng.redirect_uri,
        "scope": " ".join(llng.scopes if scopes is None else scopes),
        "state": state,
        "nonce": nonce,
    }
    if pkce:
        params["code_challenge"] = b64url(hashlib.sha256(verifier.encode()).digest())
        params["code_challenge_method"] = "S256"
    with httpx.Client(follow_redirects=False, timeout=20) as browser:
        page = browser.get(discovery["authorization_endpoint"], params=params)
        if page.is_redirect:  # refused before the login form
            return Authorization(state, nonce, verifier, page.headers["location"], page)
        assert page.status_code == 200, page.text[:3000]
        form = login_form(page)
        form.fields.update(user=username, password=password)
        response = browser.post(form.action, data=form.fields)
        location = None
        if response.is_redirect:
            location = response.headers["location"]
            assert location.startswith(llng.redirect_uri + "?"), location
        return Authorization(state, nonce, verifier, location, response)


def redeem(
    llng: OidcProvider, discovery: dict[str, Any], code: str, verifier: str
) -> httpx.Response:
    """The relying party's part: the code for tokens (client_secret_basic)."""
    return httpx.post(
        discovery["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": llng.redirect_uri,
            "code_verifier": verifier,
        },
        auth=(llng.client_id, llng.client_secret),
        timeout=20,
    )


def verified_claims(id_token: str, jwks: Any) -> dict[str, Any]:
    """The ID token's claims once its signature is checked against the provider's JWKS
    (joserfc: the JOSE library Authlib is built on)."""
    joserfc_jwt = pytest.importorskip(
        "joserfc.jwt", reason="pip install authlib (it brings joserfc) to check signatures"
    )
    from joserfc.jwk import KeySet

    token = joserfc_jwt.decode(id_token, KeySet.import_key_set(jwks), algorithms=["RS256"])
    return dict(token.claims)


# -- the tests ------------------------------------------------------------------------------


def test_discovery_document(llng: OidcProvider, discovery: dict[str, Any]) -> None:
    assert discovery["issuer"] == llng.issuer
    assert llng.discovery_url == llng.issuer + "/.well-known/openid-configuration"
    for endpoint in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
        assert discovery[endpoint].startswith(llng.issuer + "/"), endpoint
    assert "code" in discovery["response_types_supported"]
    assert "S256" in discovery["code_challenge_methods_supported"]
    assert "RS256" in discovery["id_token_signing_alg_values_supported"]
    assert "client_secret_basic" in discovery["token_endpoint_auth_methods_supported"]
    jwks = httpx.get(discovery["jwks_uri"], timeout=10).json()
    [key] = jwks["keys"]
    assert (key["kty"], key["kid"], key["use"]) == ("RSA", KEY_ID, "sig")


def test_code_flow_with_pkce_and_nonce(llng: OidcProvider, discovery: dict[str, Any]) -> None:
    dwho = llng.users["dwho"]
    auth = authorize(llng, discovery, dwho.username, dwho.password)
    assert auth.location is not None, f"no redirect after login:\n{auth.last_page.text[:3000]}"
    assert auth.query["state"] == auth.state
    assert auth.query["code"]

    response = redeem(llng, discovery, auth.query["code"], auth.verifier)
    assert response.status_code == 200, f"{response.text}\n{llng.log_text()[-3000:]}"
    tokens = response.json()
    assert tokens["token_type"].lower() == "bearer"

    header = json.loads(b64url_decode(tokens["id_token"].split(".")[0]))
    assert (header["alg"], header["kid"]) == ("RS256", KEY_ID)
    jwks = httpx.get(discovery["jwks_uri"], timeout=10).json()
    claims = verified_claims(tokens["id_token"], jwks)
    assert claims["iss"] == llng.issuer == discovery["issuer"]
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    assert llng.client_id in audiences
    assert claims["nonce"] == auth.nonce
    assert claims["sub"] == "dwho"
    assert claims["preferred_username"] == "dwho"
    assert claims["email"] == dwho.email
    assert claims["name"] == dwho.name
    assert isinstance(claims["groups"], list)
    assert set(claims["groups"]) == dwho.groups
    assert "radiologists" in claims["groups"]

    # a signature that does not match is refused (the check above is a real one)
    head, payload, signature = tokens["id_token"].split(".")
    forged = json.loads(b64url_decode(payload)) | {"preferred_username": "rtyler"}
    with pytest.raises(Exception, match="(?i)signature"):
        verified_claims(f"{head}.{b64url(json.dumps(forged).encode())}.{signature}", jwks)

    # the same claims at the userinfo endpoint
    userinfo = httpx.get(
        discovery["userinfo_endpoint"],
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=10,
    ).json()
    assert userinfo["preferred_username"] == "dwho"
    assert set(userinfo["groups"]) == dwho.groups

    # a code serves once
    again = redeem(llng, discovery, auth.query["code"], auth.verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_other_users_groups(llng: OidcProvider, discovery: dict[str, Any]) -> None:
    rtyler = llng.users["rtyler"]
    auth = authorize(llng, discovery, rtyler.username, rtyler.password)
    assert auth.location is not None
    tokens = redeem(llng, discovery, auth.query["code"], auth.verifier).json()
    claims = json.loads(b64url_decode(tokens["id_token"].split(".")[1]))
    assert claims["preferred_username"] == "rtyler"
    assert set(claims["groups"]) == rtyler.groups
    assert "admins" in claims["groups"] and "radiologists" not in claims["groups"]


def test_groups_need_the_groups_scope(llng: OidcProvider, discovery: dict[str, Any]) -> None:
    scopes = tuple(s for s in llng.scopes if s != llng.groups_scope)
    auth = authorize(llng, discovery, "dwho", "dwho", scopes=scopes)
    assert auth.location is not None
    tokens = redeem(llng, discovery, auth.query["code"], auth.verifier).json()
    claims = json.loads(b64url_decode(tokens["id_token"].split(".")[1]))
    assert claims["preferred_username"] == "dwho"
    assert "groups" not in claims


def test_wrong_password_gets_no_code(llng: OidcProvider, discovery: dict[str, Any]) -> None:
    auth = authorize(llng, discovery, "dwho", "not dwho's password")
    assert auth.location is None
    assert auth.last_page.status_code in (200, 401)
    assert 'trmsg="5"' in auth.last_page.text  # PE_BADCREDENTIALS, shown above the form
    login_form(auth.last_page)  # the login form again


def test_wrong_code_verifier_is_refused(llng: OidcProvider, discovery: dict[str, Any]) -> None:
    auth = authorize(llng, discovery, "msmith", "msmith")
    assert auth.location is not None
    response = redeem(llng, discovery, auth.query["code"], secrets.token_urlsafe(32))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_pkce_is_required(llng: OidcProvider, discovery: dict[str, Any]) -> None:
    auth = authorize(llng, discovery, "dwho", "dwho", pkce=False)
    assert auth.location is not None
    assert "code" not in auth.query
    assert auth.query["error"] == "invalid_request"
    assert auth.query["state"] == auth.state
