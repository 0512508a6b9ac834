"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for the page tests.

``chromium --dump-dom`` cannot sign in; this client can. It starts Debian's ``chromium``
headless with a fresh profile and ``--remote-debugging-port=0``, reads the port Chromium
chose from ``<profile>/DevToolsActivePort``, attaches to the page and drives it: cookies,
navigation, script, clicks and typing, the DOM, screenshots, console messages.

The page is synchronised in *virtual time*, as ``--virtual-time-budget`` did: a budget of
virtual milliseconds runs out only while no network fetch is pending, and the page's
timers run as fast as the budget lets them (``Emulation.setVirtualTimePolicy``, ending
with ``Emulation.virtualTimeBudgetExpired``). Nothing waits on the wall clock except the
limits that fail a test which hangs.

    with Browser(tmp_path / "chrome") as browser:
        browser.set_cookie("triage_session", value, server.http_url)
        browser.navigate(f"{server.http_url}/?live=0")
        html = browser.dom()
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

BUDGET_MS = 8000
"""Virtual time a page gets to settle (what ``--virtual-time-budget=8000`` gave)."""
MAX_ROUNDS = 10
"""Budgets spent at most waiting for a navigation to bring in its new document."""
LIMIT_S = 120.0
"""Wall-clock limit of one wait: a page that does not settle by then fails the test."""

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--window-size=1280,900",
    # A page kept in the back/forward cache keeps its unfinished fetches (the sign-in
    # form's, whose body it never reads) and with them virtual time paused for good.
    "--disable-back-forward-cache",
)


class BrowserError(RuntimeError):
    """Chromium did not start, answered a command with an error, or a page did not settle."""


def chromium_path() -> str:
    """Debian's ``chromium``; skips the test when it is not installed."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    return path


class Browser:
    """One headless Chromium with a fresh profile, attached to its page over CDP.

    Args:
        profile: the ``--user-data-dir`` (made; must not be in use).
        flags: extra command-line flags (e.g. ``--ignore-certificate-errors``).
    """

    def __init__(self, profile: Path, *flags: str) -> None:
        self.profile = profile
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        self._session: str | None = None
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.console: list[dict[str, Any]] = []
        """Console calls, log entries and uncaught exceptions of the page, in order: each
        ``{"source", "level", "text", "url"}`` (CSP violations among them)."""

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> Browser:
        path = chromium_path()
        self.profile.mkdir(parents=True, exist_ok=True)
        log = (self.profile.parent / f"{self.profile.name}.log").open("wb")
        try:
            self.proc = subprocess.Popen(
                [
                    path,
                    *CHROMIUM_FLAGS,
                    *self.flags,
                    f"--user-data-dir={self.profile}",
                    "--remote-debugging-port=0",
                    "--remote-allow-origins=*",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its helpers in its own process group: see close()
            )
        finally:
            log.close()
        try:
            self._attach()
        except BaseException:
            self.close()
            raise
        return self

    def _devtools_address(self) -> tuple[int, str]:
        """Port and browser path from ``DevToolsActivePort`` (written once Chromium listens)."""
        assert self.proc is not None
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + LIMIT_S
        while True:
            if active.is_file():
                lines = active.read_text().split()
                if len(lines) >= 2:
                    return int(lines[0]), lines[1]
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium did not open its DevTools port:\n{self.log()}")
            time.sleep(0.05)  # Chromium starting up, not the page

    def _attach(self) -> None:
        port, path = self._devtools_address()
        self._ws = self._stack.enter_context(
            connect(
                f"ws://127.0.0.1:{port}{path}",
                max_size=None,
                proxy=None,
                ping_interval=None,
                open_timeout=30,
            )
        )
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        pages = [t for t in targets if t["type"] == "page"]
        if not pages:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
            target_id = target["targetId"]
        else:
            target_id = pages[0]["targetId"]
        attached = self.send(
            "Target.attachToTarget", {"targetId": target_id, "flatten": True}, session=False
        )
        self._session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")

    def log(self) -> str:
        """Chromium's own stdout and stderr."""
        path = self.profile.parent / f"{self.profile.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Disconnect and end Chromium with its helper processes (killed: the profile is
        thrown away)."""
        try:
            self._stack.close()
        except Exception:  # noqa: BLE001 - the browser may be gone already
            pass
        self._ws = None
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this Popen started
            self.proc.wait(30)
            self.proc = None

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the protocol ---------------------------------------------------------------------

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = True
    ) -> dict[str, Any]:
        """Send one CDP command (to the page, or with ``session=False`` to the browser) and
        return its result; events that arrive meanwhile are kept for :meth:`wait_for`."""
        if self._ws is None:
            raise BrowserError("the browser is not started")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session is not None:
            message["sessionId"] = self._session
        self._ws.send(json.dumps(message))
        answer = self._receive_until(lambda m: m.get("id") == message["id"], method)
        if "error" in answer:
            raise BrowserError(f"{method} failed: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def wait_for(
        self,
        method: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda _params: True,
        timeout_s: float = LIMIT_S,
    ) -> dict[str, Any]:
        """The params of the first event ``method`` (already received, or yet to come)
        that satisfies ``predicate``; it is taken off the queue."""
        for i, event in enumerate(self._events):
            if event["method"] == method and predicate(event.get("params", {})):
                del self._events[i]
                return dict(event.get("params", {}))
        event = self._receive_until(
            lambda m: m.get("method") == method and predicate(m.get("params", {})),
            method,
            timeout_s,
        )
        return dict(event.get("params", {}))

    def _receive_until(
        self,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        timeout_s: float = LIMIT_S,
    ) -> dict[str, Any]:
        assert self._ws is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer to {what} within {timeout_s:.0f} s")
            try:
                raw = self._ws.recv(timeout=left)
            except TimeoutError:
                raise BrowserError(f"no answer to {what} within {timeout_s:.0f} s") from None
            message = json.loads(raw)
            if "method" in message:
                self._note(message)
            if done(message):
                return dict(message)
            if "method" in message:
                self._events.append(message)
                if len(self._events) > 1000:  # only recent events are of interest, but a
                    # navigation is kept however many network events follow it (a page
                    # fetching hundreds of images would push it out)
                    old = self._events[:-1000]
                    del self._events[:-1000]
                    self._events[:0] = [e for e in old if e["method"] == "Page.frameNavigated"]

    def _note(self, message: dict[str, Any]) -> None:
        """Keep what the page wrote to its console or log."""
        method, params = message["method"], message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])
            )
            self.console.append(
                {"source": "console", "level": params.get("type"), "text": text, "url": ""}
            )
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append(
                {
                    "source": entry.get("source"),
                    "level": entry.get("level"),
                    "text": entry.get("text", ""),
                    "url": entry.get("url", ""),
                }
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(
                {"source": "exception", "level": "error", "text": text, "url": details.get("url")}
            )

    def console_text(self) -> str:
        """The console and log, one line each (what ``--enable-logging=stderr`` showed)."""
        return "\n".join(
            f"[{m['source']}:{m['level']}] {m['text']} {m['url']}" for m in self.console
        )

    def block(self, *patterns: str) -> None:
        """Refuse requests whose URL matches one of ``patterns`` (``*`` wildcards), e.g. an
        event stream: a fetch that never ends stops virtual time for good."""
        self.send("Network.setBlockedURLs", {"urls": list(patterns)})

    # -- cookies --------------------------------------------------------------------------

    def set_cookie(
        self,
        name: str,
        value: str,
        url: str,
        *,
        http_only: bool = True,
        same_site: str = "Lax",
        secure: bool | None = None,
    ) -> None:
        """Store a cookie for ``url`` (as the server's ``Set-Cookie`` would have)."""
        params: dict[str, Any] = {
            "name": name,
            "value": value,
            "url": url,
            "path": "/",
            "httpOnly": http_only,
            "sameSite": same_site,
            "secure": url.startswith("https://") if secure is None else secure,
        }
        if not self.send("Network.setCookie", params).get("success", True):
            raise BrowserError(f"Network.setCookie refused {name} for {url}")

    def cookies(self, url: str | None = None) -> list[dict[str, Any]]:
        """The browser's cookies (for ``url`` only, when given), with their flags:
        ``name``, ``value``, ``domain``, ``path``, ``httpOnly``, ``secure``, ``sameSite``…"""
        params = {"urls": [url]} if url else {}
        found: list[dict[str, Any]] = self.send(
            "Network.getCookies" if url else "Network.getAllCookies", params
        )["cookies"]
        return found

    def cookie(self, name: str, url: str | None = None) -> dict[str, Any] | None:
        """The cookie called ``name`` (for ``url``), or None."""
        return next((c for c in self.cookies(url) if c["name"] == name), None)

    # -- navigation and virtual time ------------------------------------------------------

    def _forget(self, *methods: str) -> None:
        self._events = [e for e in self._events if e["method"] not in methods]

    def pause(self) -> None:
        """Stop the page's virtual clock: its timers wait, and Chromium holds back loading
        (a new document stays unparsed) until the next budget."""
        self.send("Emulation.setVirtualTimePolicy", {"policy": "pause"})

    def settle(self, budget_ms: int = BUDGET_MS) -> None:
        """Let the page run ``budget_ms`` of virtual time, then stop its clock. The budget
        is spent only while no network fetch is pending, so whatever the page fetched
        meanwhile has arrived and been handled."""
        self._forget("Emulation.virtualTimeBudgetExpired")
        self.send(
            "Emulation.setVirtualTimePolicy",
            {"policy": "pauseIfNetworkFetchesPending", "budget": budget_ms},
        )
        self.wait_for("Emulation.virtualTimeBudgetExpired")

    def _settle_into_new_page(self, budget_ms: int) -> None:
        """Settle until the main frame has navigated and the new document is parsed (a
        navigation is not a fetch of the old document: its budget may run out first, and a
        paused clock holds the new document's loading until the next budget), then once
        more, so that the new page gets a whole budget. (Parsed, not ``complete``: a frame
        that is refused, e.g. by ``frame-ancestors``, never finishes loading.)"""
        for _ in range(MAX_ROUNDS):
            self.settle(budget_ms)
            navigated = any(
                e["method"] == "Page.frameNavigated"
                and not e.get("params", {}).get("frame", {}).get("parentId")
                for e in self._events
            )
            if navigated and self.evaluate("document.readyState") != "loading":
                self._forget("Page.frameNavigated")
                self.settle(budget_ms)
                return
        raise BrowserError(f"the page did not load another document; it is at {self.url()}")

    def navigate(self, url: str, budget_ms: int = BUDGET_MS) -> None:
        """Open ``url`` and let the new page settle (:meth:`settle`)."""
        self._forget("Page.frameNavigated")
        self.pause()
        answer = self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"navigating to {url} failed: {answer['errorText']}")
        self._settle_into_new_page(budget_ms)

    def act(self, script: str, budget_ms: int = BUDGET_MS, *, navigates: bool = False) -> Any:
        """Run ``script`` (a click, a submit…) with the clock stopped, so that what it
        fetches is pending before any virtual time passes; then let the page settle. With
        ``navigates``, the action leads to another page, which is awaited and settled in
        turn. Returns the script's value."""
        self._forget("Page.frameNavigated")
        self.pause()
        value = self.evaluate(script)
        if navigates:
            self._settle_into_new_page(budget_ms)
        else:
            self.settle(budget_ms)
        return value

    # -- the page -------------------------------------------------------------------------

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); an
        exception in the page raises :class:`BrowserError`."""
        answer = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]!r} threw: {text}")
        return answer.get("result", {}).get("value")

    def dom(self) -> str:
        """The page's DOM as HTML (what ``--dump-dom`` printed)."""
        html: str = self.evaluate("document.documentElement.outerHTML")
        return html

    def url(self) -> str:
        """The page's address now."""
        location: str = self.evaluate("location.href")
        return location

    def text(self, selector: str) -> str | None:
        """The text of the first element matching ``selector``, or None."""
        found: str | None = self.evaluate(
            f"(e => e ? e.textContent : null)(document.querySelector({json.dumps(selector)}))"
        )
        return found

    def click(self, selector: str, budget_ms: int = BUDGET_MS, *, navigates: bool = False) -> None:
        """Click the first element matching ``selector`` and let the page settle (see
        :meth:`act`)."""
        query = f"document.querySelector({json.dumps(selector)})"
        if not self.evaluate(f"{query} !== null"):
            raise BrowserError(f"nothing on {self.url()} matches {selector!r}")
        self.act(f"{query}.click()", budget_ms, navigates=navigates)

    def type(self, selector: str, text: str) -> None:
        """Put ``text`` in the input matching ``selector``, as typing does (focus, value,
        ``input`` and ``change`` events)."""
        found = self.evaluate(
            f"(e => {{ if (!e) return false; e.focus(); e.value = {json.dumps(text)};"
            " e.dispatchEvent(new Event('input', {bubbles: true}));"
            " e.dispatchEvent(new Event('change', {bubbles: true})); return true; })"
            f"(document.querySelector({json.dumps(selector)}))"
        )
        if not found:
            raise BrowserError(f"nothing on {self.url()} matches {selector!r}")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport, written to ``path``."""
        shot = self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
