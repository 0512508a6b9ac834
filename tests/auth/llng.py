"""A real OpenID Connect provider (Debian's LemonLDAP::NG portal) on a free loopback port.

``LlngPortal`` writes, in a temporary folder, a private ``lemonldap-ng.ini`` (the portal finds
it through ``LLNG_DEFAULTCONFFILE``; nothing under /etc or /var/lib is read or written) and a
configuration ``conf/lmConf-1.json``:

- the "Demo" authentication, user and password backends: users dwho/dwho, rtyler/rtyler,
  msmith/msmith, with the Demo backend's groups (timelords, earthlings, users) and two of ours
  (``radiologists``: dwho; ``admins``: rtyler);
- sessions (Apache::Session::File) and caches (Cache::FileCache) in the temporary folder;
- the OpenID Connect issuer, its issuer identifier ``http://127.0.0.1:<port>`` (no trailing
  slash: the discovery document says exactly that), an RSA key made for the run (RS256,
  ``kid`` ``KEY_ID``);
- one relying party ``triage``: a confidential client (client_secret_basic or _post), the
  redirect URIs the test gives, consent skipped, PKCE with S256 *required* (LL::NG 2.16 checks
  a ``code_verifier`` only for a client that requires PKCE), ID tokens signed RS256 and
  carrying the user's claims (email, name, preferred_username and ``groups``, a list); the
  ``groups`` claim is released for the scope ``groups`` (``GROUPS_SCOPE``).

It then starts ``plackup`` on the portal's ``index.psgi`` (Starman with two workers where the
``starman`` package is installed, otherwise HTTP::Server::PSGI: one process, one request at a
time), in a process group of its own, its output in ``portal.log``, and polls the discovery
document (with a deadline) until it answers 200. Static files (CSS, JS) are not served.

The portal always loads its captcha module at start, which needs GD::SecurityImage and
Image::Magick (only recommended by the Debian package); the configuration names instead a
no-op stand-in written to ``perl/`` in the temporary folder (no form here shows a captcha).

Debian packages: liblemonldap-ng-portal-perl (it brings liblemonldap-ng-common-perl,
liblemonldap-ng-handler-perl, libplack-perl with plackup) and two modules the OpenID Connect
issuer needs that Debian only recommends: libstring-random-perl, libio-string-perl; starman
is optional (better for browsers, which may hold an idle connection open: that stalls a
one-request-at-a-time server).
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

PLACKUP = Path("/usr/bin/plackup")
PERL = Path("/usr/bin/perl")
PORTAL_PSGI = Path("/usr/share/lemonldap-ng/portal/htdocs/index.psgi")
TEMPLATE_DIR = Path("/usr/share/lemonldap-ng/portal/templates")

CLIENT_ID = "triage"
KEY_ID = "triage-tests-rs256"
GROUPS_SCOPE = "groups"
SCOPES = ("openid", "profile", "email", GROUPS_SCOPE)

# Perl modules the portal needs at start or for the OpenID Connect issuer, and the Debian
# package of each (the first two are only "Recommends" of the LemonLDAP::NG packages).
PERL_MODULES = {
    "String::Random": "libstring-random-perl",
    "IO::String": "libio-string-perl",
    "Crypt::OpenSSL::Bignum": "libcrypt-openssl-bignum-perl",
    "Crypt::OpenSSL::RSA": "libcrypt-openssl-rsa-perl",
    "Apache::Session::File": "libapache-session-perl",
    "Cache::FileCache": "libcache-cache-perl",
    "HTTP::Server::PSGI": "libplack-perl",
    "Lemonldap::NG::Portal::Main": "liblemonldap-ng-portal-perl",
    "Lemonldap::NG::Portal::Issuer::OpenIDConnect": "liblemonldap-ng-portal-perl",
}
APT_PACKAGES = "liblemonldap-ng-portal-perl libstring-random-perl libio-string-perl"

# Stands in for Lemonldap::NG::Portal::Captcha::SecurityImage (see the module docstring).
NO_CAPTCHA_MODULE = "TriageTests::NoCaptcha"
NO_CAPTCHA_SOURCE = """\
package TriageTests::NoCaptcha;

# A captcha module that shows none: the portal loads one at start even when no form uses it.
use strict;
use Mouse;
extends 'Lemonldap::NG::Portal::Main::Plugin';

sub init          { return 1 }
sub init_captcha  { return 1 }
sub check_captcha { return 0 }

1;
"""


@dataclass(frozen=True)
class LlngUser:
    """One of the Demo backend's accounts, as the provider releases it."""

    username: str
    password: str
    name: str
    email: str
    groups: frozenset[str]


# The Demo backend's accounts (Lemonldap::NG::Portal::UserDB::Demo) with its groups, plus the
# groups this configuration adds (``EXTRA_GROUPS``).
EXTRA_GROUPS = {"radiologists": '$uid eq "dwho"', "admins": '$uid eq "rtyler"'}
USERS = {
    "dwho": LlngUser(
        "dwho",
        "dwho",
        "Doctor Who",
        "dwho@badwolf.org",
        frozenset({"timelords", "users", "radiologists"}),
    ),
    "rtyler": LlngUser(
        "rtyler",
        "rtyler",
        "Rose Tyler",
        "rtyler@badwolf.org",
        frozenset({"earthlings", "users", "admins"}),
    ),
    "msmith": LlngUser(
        "msmith", "msmith", "Mickey Smith", "msmith@badwolf.org", frozenset({"earthlings", "users"})
    ),
}


@dataclass(frozen=True)
class OidcProvider:
    """What a relying party needs to know about the running provider."""

    issuer: str  # http://127.0.0.1:<port>, exactly the discovery document's "issuer"
    discovery_url: str  # <issuer>/.well-known/openid-configuration
    client_id: str
    client_secret: str
    redirect_uri: str  # the first of redirect_uris
    redirect_uris: tuple[str, ...]
    scopes: tuple[str, ...]  # request these to get every claim, groups included
    groups_scope: str
    users: dict[str, LlngUser]
    log_path: Path
    port: int

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@functools.cache
def llng_problem() -> str | None:
    """Why no LemonLDAP::NG portal can run here, or None."""
    for path in (PLACKUP, PORTAL_PSGI, PERL):
        if not path.is_file():
            return f"{path} is absent (apt-get install {APT_PACKAGES})"
    # One perl for every module: each that does not load prints its name and the error.
    script = (
        'for my $m (@ARGV) { eval "require $m; 1" or print "$m\\t", (split /\\n/, $@)[0], "\\n" }'
    )
    probe = subprocess.run(
        [str(PERL), "-e", script, *PERL_MODULES],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    missing = []
    for line in probe.stdout.splitlines():
        module, _, error = line.partition("\t")
        found = re.search(r"Can't locate (\S+)\.pm", error)
        what = found.group(1).replace("/", "::") if found else module
        missing.append(f"{what} ({PERL_MODULES.get(what, PERL_MODULES.get(module, '?'))})")
    if probe.returncode != 0 and not missing:
        missing.append(f"perl failed: {probe.stderr.strip()[:200]}")
    if missing:
        return "Perl modules missing: " + ", ".join(dict.fromkeys(missing))
    return None


@functools.cache
def starman_installed() -> bool:
    probe = subprocess.run(
        [str(PERL), "-e", "require Starman"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    return probe.returncode == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rsa_key_pair() -> tuple[str, str]:
    """A new 2048-bit RSA key pair, PEM (PKCS#1 private key, SubjectPublicKeyInfo public key),
    made by the Perl module the portal signs with."""
    script = (
        "use Crypt::OpenSSL::RSA; my $k = Crypt::OpenSSL::RSA->generate_key(2048);"
        " print $k->get_private_key_string(), $k->get_public_key_x509_string();"
    )
    out = subprocess.run(
        [str(PERL), "-e", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    end = "-----END RSA PRIVATE KEY-----\n"
    private, public = out.split(end, 1)
    return private + end, public


class LlngPortal:
    """One LemonLDAP::NG portal process acting as an OpenID Connect provider."""

    def __init__(
        self,
        workdir: Path,
        redirect_uris: Sequence[str],
        *,
        client_secret: str | None = None,
        require_pkce: bool = True,
        log_level: str = "notice",
        server: str | None = None,
    ) -> None:
        if not redirect_uris:
            raise ValueError("the relying party needs at least one redirect URI")
        self.workdir = workdir
        self.redirect_uris = tuple(redirect_uris)
        self.client_secret = client_secret or secrets.token_urlsafe(24)
        self.require_pkce = require_pkce
        self.log_level = log_level
        if server is None:
            server = "Starman" if starman_installed() else "HTTP::Server::PSGI"
        self.server = server
        self.log_path = workdir / "portal.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._keys: tuple[str, str] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def provider(self) -> OidcProvider:
        return OidcProvider(
            issuer=self.issuer,
            discovery_url=self.discovery_url,
            client_id=CLIENT_ID,
            client_secret=self.client_secret,
            redirect_uri=self.redirect_uris[0],
            redirect_uris=self.redirect_uris,
            scopes=SCOPES,
            groups_scope=GROUPS_SCOPE,
            users=dict(USERS),
            log_path=self.log_path,
            port=self.port,
        )

    # -- configuration -------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _write_ini(self) -> Path:
        cache = self._dir("cache")
        ini = f"""\
[all]
logLevel = {self.log_level}
checkTime = 600

[configuration]
type = File
dirName = {self._dir("conf")}
localStorage = Cache::FileCache
localStorageOptions = {{ 'namespace' => 'lemonldap-ng-config', \
'default_expires_in' => 600, 'directory_umask' => '007', \
'cache_root' => '{cache}', 'cache_depth' => 3 }}

[portal]
staticPrefix = /static
templateDir = {TEMPLATE_DIR}
languages = en

[handler]
status = 0
"""
        path = self.workdir / "lemonldap-ng.ini"
        path.write_text(ini)
        return path

    def _config(self) -> dict[str, object]:
        if self._keys is None:
            self._keys = rsa_key_pair()
        private_key, public_key = self._keys
        portal = f"{self.issuer}/"

        def storage(name: str) -> dict[str, str]:
            return {
                "Directory": str(self._dir(name)),
                "LockDirectory": str(self._dir(f"{name}/lock")),
                "generateModule": "Lemonldap::NG::Common::Apache::Session::Generate::SHA256",
            }

        rp_options: dict[str, object] = {
            "oidcRPMetaDataOptionsDisplayName": "Triage",
            "oidcRPMetaDataOptionsClientID": CLIENT_ID,
            "oidcRPMetaDataOptionsClientSecret": self.client_secret,
            "oidcRPMetaDataOptionsRedirectUris": " ".join(self.redirect_uris),
            "oidcRPMetaDataOptionsPublic": 0,
            "oidcRPMetaDataOptionsRequirePKCE": 1 if self.require_pkce else 0,
            "oidcRPMetaDataOptionsBypassConsent": 1,
            "oidcRPMetaDataOptionsIDTokenSignAlg": "RS256",
            "oidcRPMetaDataOptionsIDTokenForceClaims": 1,
            "oidcRPMetaDataOptionsUserIDAttr": "uid",
            "oidcRPMetaDataOptionsIDTokenExpiration": 3600,
            "oidcRPMetaDataOptionsAccessTokenExpiration": 3600,
        }
        return {
            "cfgNum": 1,
            "cfgVersion": "2.16.1",
            "cfgAuthor": "triage tests",
            "cfgDate": str(int(time.time())),
            "authentication": "Demo",
            "userDB": "Same",
            "passwordDB": "Demo",
            "demoExportedVars": {"uid": "uid", "cn": "cn", "mail": "mail"},
            "exportedVars": {},
            "groups": EXTRA_GROUPS,
            "macros": {},
            "whatToTrace": "uid",
            "portal": portal,
            "domain": "127.0.0.1",  # the portal sends Domain=.127.0.0.1
            "cookieName": "lemonldap",
            "securedCookie": 0,
            "captcha": NO_CAPTCHA_MODULE,
            "locationRules": {"127.0.0.1": {"default": "accept"}},
            "globalStorage": "Apache::Session::File",
            "globalStorageOptions": storage("sessions"),
            "persistentStorage": "Apache::Session::File",
            "persistentStorageOptions": storage("psessions"),
            "localSessionStorage": "Cache::FileCache",
            "localSessionStorageOptions": {
                "namespace": "lemonldap-ng-sessions",
                "default_expires_in": 600,
                "directory_umask": "007",
                "cache_root": str(self._dir("cache")),
                "cache_depth": 3,
            },
            "notification": 0,
            "loginHistoryEnabled": 0,
            "issuerDBOpenIDConnectActivation": 1,
            "oidcServiceMetaDataIssuer": self.issuer,
            "oidcServicePrivateKeySig": private_key,
            "oidcServicePublicKeySig": public_key,
            "oidcServiceKeyIdSig": KEY_ID,
            "oidcServiceAllowAuthorizationCodeFlow": 1,
            "oidcServiceAllowImplicitFlow": 0,
            "oidcServiceAllowHybridFlow": 0,
            "oidcRPMetaDataOptions": {CLIENT_ID: rp_options},
            # claim -> "session attribute;type;array": groups always a JSON list
            "oidcRPMetaDataExportedVars": {
                CLIENT_ID: {
                    "email": "mail",
                    "name": "cn",
                    "preferred_username": "uid",
                    "groups": "groups;string;always",
                }
            },
            # the scope "groups" releases the claim "groups"
            "oidcRPMetaDataOptionsExtraClaims": {CLIENT_ID: {GROUPS_SCOPE: "groups"}},
        }

    def _write_files(self) -> Path:
        perl_dir = self._dir("perl/TriageTests")
        (perl_dir / "NoCaptcha.pm").write_text(NO_CAPTCHA_SOURCE)
        shutil.rmtree(self.workdir / "cache", ignore_errors=True)  # no cached configuration
        conf = self._dir("conf") / "lmConf-1.json"
        conf.write_text(json.dumps(self._config(), indent=1))
        return self._write_ini()

    # -- process -------------------------------------------------------------------------

    def start(self, *, deadline_s: float = 30.0) -> None:
        for _attempt in range(3):  # a port taken between choosing and binding: choose again
            self.port = free_port()
            ini = self._write_files()
            env = dict(os.environ)
            env["LLNG_DEFAULTCONFFILE"] = str(ini)
            env["PERL5LIB"] = os.pathsep.join(
                p for p in (str(self.workdir / "perl"), os.environ.get("PERL5LIB", "")) if p
            )
            env.pop("LLNG_DEFAULTLOGGER", None)
            command = [str(PLACKUP), "-s", self.server, "--host", "127.0.0.1"]
            command += ["--port", str(self.port)]
            if self.server == "Starman":
                command += ["--workers", "2"]
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [*command, str(PORTAL_PSGI)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=self.workdir,
                    start_new_session=True,  # its own process group: stop() ends the workers too
                )
            if self._wait_ready(time.monotonic() + deadline_s):
                return
        raise RuntimeError(f"the LemonLDAP::NG portal did not start; its log:\n{self.log_text()}")

    def _wait_ready(self, deadline: float) -> bool:
        """Poll the discovery document until it answers 200 (True) or the process exits
        (False). A 500 (the portal's initialisation failed: it will not recover) or the
        deadline stops the process and raises."""
        assert self.proc is not None
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    response = client.get(self.discovery_url)
                except httpx.TransportError:
                    time.sleep(0.05)  # polling interval, not synchronisation
                    continue
                if response.status_code == 200:
                    return True
                if response.status_code >= 500:
                    self.stop()
                    raise RuntimeError(
                        f"the LemonLDAP::NG portal answers {response.status_code} (its "
                        f"initialisation failed); its log:\n{self.log_text()}"
                    )
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"the LemonLDAP::NG portal did not answer within the deadline; its log:\n"
            f"{self.log_text()}"
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the server's process group (Starman's workers with it), SIGKILL after 10
        seconds."""
        if self.proc is None:
            return
        group = self.proc.pid  # start_new_session: the group's id is the server's pid
        self._signal_group(group, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._signal_group(group, signal.SIGKILL)
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self._group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval: workers finishing after their master
        self._signal_group(group, signal.SIGKILL)
        self.proc = None

    @staticmethod
    def _signal_group(group: int, sig: signal.Signals) -> None:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _group_alive(group: int) -> bool:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def running_llng(
    workdir: Path,
    redirect_uris: Sequence[str],
    *,
    client_secret: str | None = None,
    require_pkce: bool = True,
    log_level: str = "notice",
    server: str | None = None,
) -> Iterator[OidcProvider]:
    """A started provider for a ``with``-less fixture: skips (pytest.skip) when the portal
    cannot run here, yields its ``OidcProvider``, stops it after."""
    problem = llng_problem()
    if problem:
        pytest.skip(f"no LemonLDAP::NG OpenID Connect provider to test against: {problem}")
    portal = LlngPortal(
        workdir,
        redirect_uris,
        client_secret=client_secret,
        require_pkce=require_pkce,
        log_level=log_level,
        server=server,
    )
    portal.start()
    try:
        yield portal.provider()
    finally:
        portal.stop()
        for name in ("sessions", "psessions", "cache"):
            shutil.rmtree(workdir / name, ignore_errors=True)


# -- the portal's login form, as a browser fills it ----------------------------------------


@dataclass
class LoginForm:
    action: str
    fields: dict[str, str] = field(default_factory=dict)


class _FormParser(HTMLParser):
    """The portal's login form: its action and its inputs (hidden ones with their values)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[LoginForm] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(LoginForm(action=values.get("action", "")))
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("name"):
            if values.get("type") != "checkbox":
                self.forms[-1].fields[values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def login_form(page: httpx.Response) -> LoginForm:
    parser = _FormParser()
    parser.feed(page.text)
    forms = [f for f in parser.forms if "user" in f.fields and "password" in f.fields]
    assert len(forms) == 1, f"no single login form in the page:\n{page.text[:3000]}"
    form = forms[0]
    # action="#" (or none): the form posts back to the page's own URL, query string included
    page_url = str(page.url).split("#", 1)[0]
    form.action = page_url if form.action in ("", "#") else urljoin(page_url, form.action)
    return form
