"""Start ``triage serve`` as a child process on free ports (used by tests and bench scripts)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_child(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """Stop a child process: SIGTERM, then SIGKILL after ``grace_s`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class ServerProcess:
    """A ``triage serve`` subprocess with its own data directory and free ports.

    Once it answers, an admin account (``username``/``password``) and an API token of it
    are made in its database, unless ``sign_in=False``: ``headers`` carries the token for
    API calls, :meth:`client` is an ``httpx.Client`` using it, and :meth:`session_cookie`
    signs in as the page does.

    Args:
        data_dir: TRIAGE_DATA_DIR for the child.
        env: extra TRIAGE_* settings for the child.
        ae_title: the called AE title.
        sign_in: make the admin account and token after start.
    """

    username = "test-admin"

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        ae_title: str = "TRIAGE",
        *,
        sign_in: bool = True,
    ):
        self.data_dir = data_dir
        self.sign_in = sign_in
        self.password = "pw-" + secrets.token_urlsafe(16)
        self.token: str | None = None
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.ae_title = ae_title
        https = bool((env or {}).get("TRIAGE_HTTPS_CERT"))
        self.http_url = f"{'https' if https else 'http'}://127.0.0.1:{self.http_port}"
        self.log_path = data_dir / "serve.log"
        self._env = {
            **os.environ,
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_HTTP_HOST": "127.0.0.1",
            "TRIAGE_HTTP_PORT": str(self.http_port),
            "TRIAGE_DICOM_HOST": "127.0.0.1",
            "TRIAGE_DICOM_PORT": str(self.dicom_port),
            "TRIAGE_AE_TITLE": ae_title,
            **(env or {}),
        }
        if "TRIAGE_DATABASE_URL" not in (env or {}):
            self._env.pop("TRIAGE_DATABASE_URL", None)  # the child's own SQLite file
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 60.0, *, require_healthy: bool = True) -> ServerProcess:
        """Start the child and wait until ``/api/health`` answers 200 (with
        ``require_healthy=False``: until it answers at all, 503 included)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "triage.cli", "serve"], env=self._env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"triage serve exited early:\n{self.log()}")
            try:
                # Only liveness is checked here; callers verify the certificate themselves.
                health = httpx.get(f"{self.http_url}/api/health", timeout=5, verify=False)
                if health.status_code == 200 or (health.status_code == 503 and not require_healthy):
                    if self.sign_in:
                        self._make_admin()
                    return self
                last = f"/api/health answered {health.status_code}: {health.text}\n"
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"triage serve did not come up:\n{last}{self.log()}")
            time.sleep(0.2)

    @property
    def database_url(self) -> str:
        return self._env.get("TRIAGE_DATABASE_URL") or (
            f"sqlite:///{(self.data_dir / 'triage.db').resolve()}"
        )

    def _make_admin(self) -> None:
        """The admin account (made once per database) and a new token of it."""
        from triage.auth.accounts import create_account, get_account, set_password
        from triage.auth.roles import Role
        from triage.auth.tokens import create_token
        from triage.db import Database

        db = Database(self.database_url)
        try:
            if get_account(db, self.username) is None:
                create_account(db, self.username, Role.admin, password=self.password)
            else:
                set_password(db, self.username, self.password)
            self.token, _info = create_token(db, self.username, "tests")
        finally:
            db.engine.dispose()

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization`` for API calls as the admin (empty with ``sign_in=False``)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kwargs: object) -> httpx.Client:
        """An HTTP client on this server, signed in with the admin's token."""
        options: dict[str, object] = {
            "base_url": self.http_url,
            "headers": self.headers,
            "verify": False,
            "timeout": 30,
        }
        options.update(kwargs)
        return httpx.Client(**options)  # type: ignore[arg-type]

    def session_cookie(self, username: str | None = None, password: str | None = None) -> str:
        """Sign in through ``POST /api/auth/login`` (as the admin by default); the session
        cookie's value."""
        from triage.serve.auth import SESSION_COOKIE

        answer = httpx.post(
            f"{self.http_url}/api/auth/login",
            json={"username": username or self.username, "password": password or self.password},
            verify=False,
            timeout=30,
        )
        answer.raise_for_status()
        return answer.cookies[SESSION_COOKIE]

    def peak_rss_mb(self) -> float | None:
        """Peak resident memory of the child (Linux VmHWM), in MiB."""
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc, grace_s=15)
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
