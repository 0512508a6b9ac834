"""HTTP hardening of the app: the Host check, security headers, quiet client disconnects.

- **Host check** (against DNS rebinding: a web page on another site whose name is made to
  resolve to this server could otherwise read the worklist, patient names included):
  requests whose ``Host`` header is not an allowed name get 400 (Starlette's
  ``TrustedHostMiddleware``). See :func:`allowed_hosts` for the default list.
- **Security headers** on every response: the page and the API cannot be framed
  (``X-Frame-Options: DENY``, CSP ``frame-ancestors 'none'``: no clickjacking of the
  Mark-read button), no MIME sniffing, no referrer. HTML gets a Content-Security-Policy that
  runs only the page's own inline scripts (by their sha256, computed from the file) and
  talks only to this server; everything else gets ``default-src 'none'``.
- **Client disconnects**: a client that goes away in the middle of a request body
  (``ClientDisconnect``) is logged in one line instead of a traceback per connection.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triage.serve.connections import RateLimitedLog

log = logging.getLogger(__name__)

LOCAL_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::", "[::]"})

# Responses that are not HTML (JSON, images, event streams, scripts): nothing may run from
# them and nothing may frame them.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

COMMON_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)

_INLINE_SCRIPT = re.compile(r"<script(?P<attrs>[^>]*)>(?P<body>.*?)</script\s*>", re.S | re.I)

DISCONNECT_LOG = RateLimitedLog(log)


def allowed_hosts(configured: Sequence[str], http_host: str) -> list[str]:
    """The host names the web server answers to.

    Args:
        configured: ``TRIAGE_HTTP_ALLOWED_HOSTS``; when not empty it is the whole list
            (``"*"`` allows any host, ``"*.example.org"`` any subdomain).
        http_host: ``TRIAGE_HTTP_HOST``; added to the default list unless it is a wildcard
            address (0.0.0.0, ::), which names no host.

    Returns:
        Lower-case names; IPv6 literals in both spellings (``::1`` and ``[::1]``), since the
        ``Host`` header brackets them.
    """
    names = [h.strip() for h in configured if h.strip()] or [
        *LOCAL_HOSTS,
        *([] if http_host.strip() in WILDCARD_ADDRESSES else [http_host.strip()]),
    ]
    out: list[str] = []
    for name in names:
        bare = name.lower().removeprefix("[").removesuffix("]")
        try:
            spellings = [bare, f"[{bare}]"] if ip_address(bare).version == 6 else [bare]
        except ValueError:
            spellings = [name.lower()]
        out.extend(s for s in spellings if s not in out)
    return out


def inline_script_hashes(html: str) -> list[str]:
    """CSP source expressions (``'sha256-…'``) of the inline ``<script>`` elements."""
    hashes = []
    for m in _INLINE_SCRIPT.finditer(html):
        if re.search(r"\bsrc\s*=", m.group("attrs"), re.I):
            continue
        digest = hashlib.sha256(m.group("body").encode()).digest()
        hashes.append(f"'sha256-{base64.b64encode(digest).decode()}'")
    return hashes


def html_csp(html: str) -> str:
    """The Content-Security-Policy of an HTML page of this server: its own inline scripts
    (by hash) and same-origin scripts; inline styles (the page builds some with
    ``innerHTML``); requests, images and event streams only to this server; not framable."""
    scripts = " ".join(["'self'", *inline_script_hashes(html)])
    return (
        "default-src 'self'; "
        f"script-src {scripts}; "
        "style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; "
        "connect-src 'self'; "
        "object-src 'none'; "
        "base-uri 'none'; "
        "form-action 'self'; "
        "frame-ancestors 'none'"
    )


class PageCsp:
    """The CSP of the web page, recomputed when its file changes."""

    def __init__(self, page: Path) -> None:
        self.page = page
        self._key: tuple[int, int] | None = None
        self._csp = html_csp("")

    def __call__(self) -> str:
        try:
            st = self.page.stat()
            key = (st.st_mtime_ns, st.st_size)
            if key != self._key:
                self._csp = html_csp(self.page.read_text(encoding="utf-8"))
                self._key = key
        except OSError:
            pass
        return self._csp


class SecurityHeadersMiddleware:
    """Pure ASGI middleware (streams such as ``/api/events`` pass through unbuffered) that
    adds :data:`COMMON_HEADERS` and a Content-Security-Policy to responses that have none,
    and ends requests whose client went away without a traceback.

    Args:
        app: the wrapped application.
        page_csp: the CSP for HTML responses.
    """

    def __init__(self, app: ASGIApp, page_csp: PageCsp) -> None:
        self.app = app
        self.page_csp = page_csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in COMMON_HEADERS:
                    if name not in headers:
                        headers[name] = value
                if "content-security-policy" not in headers:
                    is_html = headers.get("content-type", "").startswith("text/html")
                    headers["Content-Security-Policy"] = self.page_csp() if is_html else API_CSP
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:
            client = scope.get("client")
            DISCONNECT_LOG.occurred(
                logging.INFO,
                "HTTP client %s went away during %s %s",
                client[0] if client else "?",
                scope.get("method", "?"),
                scope.get("path", "?"),
            )


def install(app: FastAPI, *, hosts: Sequence[str] | None, page: Path) -> None:
    """Add the Host check (when ``hosts`` is not None) and the security headers to ``app``.

    Args:
        app: the application.
        hosts: allowed host names (see :func:`allowed_hosts`); None: no Host check (an app
            built for tests or embedded behind something that checks).
        page: the web page's HTML file, whose inline scripts the page CSP allows.
    """
    if hosts is not None and "*" not in hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts), www_redirect=False)
    # Added last, so outermost: the Host check's 400 carries the headers too.
    app.add_middleware(SecurityHeadersMiddleware, page_csp=PageCsp(page))
