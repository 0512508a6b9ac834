"""``/api/health``: whether each part of ``triage serve`` works, not only the web server.

Components: the database (a query), the DICOM listener (its thread, its socket, descriptors
below 1024 for associations, and a C-ECHO to itself), the worker threads (or, with the
analysis in ``triage worker`` processes, the job queue: "external"), and the free disk
space (input is refused below ``TRIAGE_MIN_FREE_BYTES``). The route answers 200 when all are
healthy and 503 naming those that are not.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import text

from triage.db import Database
from triage.ingest.scp import ScpOptions
from triage.jobs.claims import queue_summary
from triage.serve.descriptors import SELECT_LIMIT, DicomDescriptorGuard, free_select_descriptors

# Fewer free descriptors below 1024 than this and DICOM associations are about to fail.
MIN_FREE_SELECT_DESCRIPTORS = 8
ECHO_AE_TITLE = "TRIAGE-HEALTH"


@dataclass(frozen=True)
class ComponentStatus:
    """One component: healthy or not, and a sentence saying why."""

    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class HealthReport:
    """The state of every component, in check order."""

    components: dict[str, ComponentStatus]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.components.values())

    @property
    def failing(self) -> list[str]:
        return [name for name, c in self.components.items() if not c.ok]

    def to_json(self, version: str) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unhealthy",
            "version": version,
            "failing": self.failing,
            "components": {name: c.to_json() for name, c in self.components.items()},
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def check_database(db: Database) -> ComponentStatus:
    """A ``SELECT 1`` on a pooled connection."""
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means the database cannot be used
        return ComponentStatus(False, f"query failed: {type(exc).__name__}: {exc}"[:300])
    return ComponentStatus(True, f"{db.engine.dialect.name} answers")


def check_disk(paths: Iterable[Path], min_free_bytes: int) -> ComponentStatus:
    """Free space (for unprivileged writers) on the file systems of ``paths``.

    Args:
        paths: the folders written to (incoming, store, results).
        min_free_bytes: below this, input is refused (``TRIAGE_MIN_FREE_BYTES``).
    """
    worst: tuple[int, Path] | None = None
    for path in paths:
        try:
            free = shutil.disk_usage(path).free
        except OSError as exc:
            return ComponentStatus(False, f"{path} cannot be read: {exc.strerror}")
        if worst is None or free < worst[0]:
            worst = (free, path)
    if worst is None:
        return ComponentStatus(True, "no folder to check")
    free, path = worst
    if free < min_free_bytes:
        return ComponentStatus(
            False,
            f"{_mib(free)} free under {path}, below TRIAGE_MIN_FREE_BYTES"
            f" ({_mib(min_free_bytes)}): DICOM and STOW-RS input is refused",
        )
    return ComponentStatus(True, f"{_mib(free)} free under {path}")


def check_threads(threads: Sequence[threading.Thread], what: str) -> ComponentStatus:
    """All of ``threads`` are running."""
    if not threads:
        return ComponentStatus(False, f"{what} not started")
    stopped = [t.name for t in threads if not t.is_alive()]
    if stopped:
        return ComponentStatus(False, f"{what} thread(s) stopped: {', '.join(stopped)}")
    return ComponentStatus(True, f"{what} thread(s) running: {', '.join(t.name for t in threads)}")


def echo_address(options: ScpOptions) -> tuple[str, str]:
    """Where this process can C-ECHO its own listener, and why not when it cannot.

    Returns:
        (host, "") to probe; or ("", reason) when a probe would be refused or cannot be
        made: TLS (no client certificate), a calling-AE allow-list, or a peer allow-list
        without the loopback address.
    """
    host = options.host.strip()
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    if options.tls_cert is not None:
        return "", "not probed: DICOM over TLS"
    if options.allowed_calling_aets and ECHO_AE_TITLE not in options.allowed_calling_aets:
        return "", f"not probed: calling AE {ECHO_AE_TITLE} is not in the allowed list"
    if options.allowed_peer_addresses:
        try:
            address = ip_address(host)
            allowed = any(
                address in ip_network(n.strip(), strict=False)
                for n in options.allowed_peer_addresses
            )
        except ValueError:
            allowed = False
        if not allowed:
            return "", f"not probed: {host} is not in the allowed peer addresses"
    return host, ""


def c_echo(host: str, port: int, called_ae: str, timeout: float) -> tuple[bool, str]:
    """C-ECHO ``called_ae`` at ``host:port``.

    Returns:
        (whether the listener answered, what it answered). An association it rejected
        (all association slots busy, say) counts as an answer: the listener is serving.
    """
    ae = AE(ae_title=ECHO_AE_TITLE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_ae)
    try:
        if assoc.is_rejected:
            return True, "answers (it rejected the C-ECHO's association: busy or not allowed)"
        if not assoc.is_established:
            return False, f"no answer to an association request within {timeout:g} s"
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        if code is None:
            return False, f"no answer to a C-ECHO within {timeout:g} s"
        if code != 0x0000:
            return False, f"C-ECHO answered status 0x{code:04X}"
        return True, "answers C-ECHO"
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


@dataclass
class DicomProbe:
    """The DICOM listener of this process and how to check it.

    Args:
        server: the association server.
        thread: the thread running its accept loop.
        options: its settings (address, AE title, allow-lists, TLS).
        guard: counts associations that could not be served for lack of descriptors.
        echo_timeout: seconds for each step of the C-ECHO to itself.
        echo_cache_seconds: a C-ECHO result is reused this long (health polled often).
    """

    server: ThreadedAssociationServer
    thread: threading.Thread | None
    options: ScpOptions
    guard: DicomDescriptorGuard | None = None
    echo_timeout: float = 3.0
    echo_cache_seconds: float = 1.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _echo: tuple[float, tuple[bool, str]] | None = field(default=None, repr=False)

    def _echo_result(self, host: str) -> tuple[bool, str]:
        with self._lock:
            now = time.monotonic()
            if self._echo is not None and now - self._echo[0] < self.echo_cache_seconds:
                return self._echo[1]
            port = int(self.server.server_address[1])
            try:
                result = c_echo(host, port, self.options.ae_title, self.echo_timeout)
            except Exception as exc:  # pynetdicom raising is a failed probe, not a crash
                result = (False, f"C-ECHO failed: {type(exc).__name__}")
            self._echo = (time.monotonic(), result)
            return result

    def __call__(self) -> ComponentStatus:
        if self.thread is None or not self.thread.is_alive():
            return ComponentStatus(False, "the DICOM listener thread is not running")
        if self.server.socket is None or self.server.socket.fileno() < 0:
            return ComponentStatus(False, "the DICOM listening socket is closed")
        free = free_select_descriptors()
        if free is not None and free < MIN_FREE_SELECT_DESCRIPTORS:
            return ComponentStatus(
                False,
                f"only {free} descriptors below {SELECT_LIMIT} are free: new associations"
                " cannot be served (too many open HTTP connections or files)",
            )
        where = f"{self.options.ae_title} on port {self.server.server_address[1]}"
        if self.guard is not None and self.guard.unserved:
            where += (
                f" ({self.guard.unserved} association(s) not served for lack of descriptors"
                " since start)"
            )
        host, why_not = echo_address(self.options)
        if not host:
            return ComponentStatus(True, f"{where} listening ({why_not})")
        ok, answer = self._echo_result(host)
        return ComponentStatus(ok, f"{where}: {answer}")


def external_workers(db: Database) -> ComponentStatus:
    """The analysis done by ``triage worker`` processes (``TRIAGE_EMBEDDED_WORKER=false``):
    healthy as far as this process goes (its health does not depend on theirs), with the
    queue as the database shows it. Only workers analysing hold a lease; idle ones are not
    seen here."""
    try:
        q = queue_summary(db)
    except Exception as exc:  # the database check names the failure
        return ComponentStatus(True, f"external (triage worker); queue not read: {exc}"[:300])
    waited = (
        f", the oldest for {q.oldest_queued_seconds:.0f} s"
        if q.oldest_queued_seconds is not None
        else ""
    )
    return ComponentStatus(
        True,
        f"external (triage worker processes): {q.running} job(s) running, {q.live_leases} under"
        f" a live lease by {q.workers} worker(s); {q.queued} queued{waited}",
    )


@dataclass
class HealthChecks:
    """Every component check of ``triage serve``; call it for a :class:`HealthReport`.

    Args:
        db: the database.
        disk_paths: the folders written to.
        min_free_bytes: ``TRIAGE_MIN_FREE_BYTES``.
        worker_threads: the worker's threads (assembly and analysis), read at each check.
        dicom: the DICOM listener check; None when the listener is not started.
        models: which version of each model is served (and from where); None: not shown.
        worker: the worker check when the analysis runs in other processes (replaces the
            thread check; see :func:`external_workers`).
    """

    db: Database
    disk_paths: Sequence[Path]
    min_free_bytes: int
    worker_threads: Callable[[], Sequence[threading.Thread]]
    dicom: Callable[[], ComponentStatus] | None = None
    models: Callable[[], ComponentStatus] | None = None
    worker: Callable[[], ComponentStatus] | None = None

    def __call__(self) -> HealthReport:
        dicom = (
            self.dicom()
            if self.dicom is not None
            else ComponentStatus(False, "the DICOM listener is not started")
        )
        components = {
            "database": check_database(self.db),
            "dicom": dicom,
            "worker": self.worker()
            if self.worker is not None
            else check_threads(self.worker_threads(), "worker"),
            "disk": check_disk(self.disk_paths, self.min_free_bytes),
        }
        if self.models is not None:
            components["models"] = self.models()
        return HealthReport(components)
