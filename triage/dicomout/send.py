"""Sends the DICOM results to the configured destinations (PACS) by C-STORE, from a
background thread of ``triage serve``.

Each result has one export row per destination (``result_exports``, queued in the
transaction that indexed the result, :mod:`triage.dicomout.index`), so the delivery state
survives restarts. Every round (``poll_seconds``) the sender takes the due exports (``pending``,
next attempt due), groups them by destination and opens one association per destination
(our AE title as calling AE; Segmentation Storage, Comprehensive 3D SR Storage and Secondary
Capture Image Storage, each with Explicit VR Little Endian, the files' encoding), stores each
file and records the outcome:

* Success or Warning status: ``sent`` (with the time); audited as ``export`` (actor
  ``triage-export``, the study as target, the destination and SOPInstanceUID as detail).
* anything else (no association: refused, unreachable, rejected; a Failure status; no answer
  in time; the presentation context not accepted): the attempt counts, with how it failed
  (``last_error``, no patient data), and the next is due after ``base * 2**(attempts - 1)``
  seconds (at most ``max_backoff``); after ``max_attempts`` it is ``failed`` (audited as a
  failed export). A result whose file is gone fails at once.

Before an association, each export is leased with a conditional UPDATE (still pending, the
same attempt count, still due), which moves its next attempt past the association's time
limit: two senders never send the same attempt, and a sender that dies mid-way leaves its
exports due again once the lease ends. A destination that does not answer costs its own
round's timeout on this thread only: the worker and the HTTP API never wait for it. Exports
to a destination removed from the settings stay pending (sent if it is configured again).

A C-STORE whose answer was lost is sent again on the next attempt; a PACS keeps one copy per
SOPInstanceUID, so the result is stored once.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import code_to_category
from sqlalchemy import or_, select, update

from triage.audit.chain import AuditEvent, Outcome, append
from triage.config import ResultDestination
from triage.db import Database
from triage.db.tables import DicomResultRow, ResultExportRow, StudyRow
from triage.domain import ExportState

__all__ = ["ExportConfig", "ResultSender", "SOP_CLASSES", "backoff", "tls_context"]

log = logging.getLogger(__name__)

SOP_CLASSES: tuple[str, ...] = (
    str(SegmentationStorage),
    str(Comprehensive3DSRStorage),
    str(SecondaryCaptureImageStorage),
)
"""The storage classes proposed: what :mod:`triage.dicomout.results` makes."""

AUDIT_ACTOR = "triage-export"
"""The actor of the audit records of sends (the process, not a person)."""


def backoff(attempts: int, base: float, cap: float) -> timedelta:
    """The wait after the ``attempts``-th failed attempt (exponential, capped)."""
    return timedelta(seconds=min(cap, base * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class ExportConfig:
    """How results are sent.

    Attributes:
        calling_ae_title: our AE title (``TRIAGE_AE_TITLE``).
        max_attempts: attempts before an export is ``failed``.
        backoff_seconds: the wait after the first failed attempt, doubled per attempt.
        max_backoff_seconds: the longest wait.
        timeout_seconds: TCP connect, association and each C-STORE answer time out after this.
        poll_seconds: how often due exports are looked for.
        batch: the most exports sent to one destination in one round (one association).
    """

    calling_ae_title: str = "TRIAGE"
    max_attempts: int = 10
    backoff_seconds: float = 30.0
    max_backoff_seconds: float = 3600.0
    timeout_seconds: float = 30.0
    poll_seconds: float = 2.0
    batch: int = 20


@dataclass(frozen=True)
class _Leased:
    export_id: int
    attempts: int
    path: Path
    sop_instance_uid: str
    kind: str
    study_uid: str


def tls_context(destination: ResultDestination) -> ssl.SSLContext:
    """The client TLS context of a destination: its certificate checked against ``ca_file``
    (or the system's CAs) and its host name; our certificate when ``cert_file`` is set."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(destination.ca_file) if destination.ca_file else None
    )
    if destination.cert_file is not None:
        context.load_cert_chain(
            str(destination.cert_file),
            str(destination.key_file) if destination.key_file else None,
        )
    return context


class ResultSender:
    """Sends due exports, oldest first, one association per destination per round, from a
    background thread.

    Args:
        db: the database holding the results and their exports.
        destinations: the configured destinations (those of the export rows, by name).
        config: AE title, retries and timeouts.
    """

    def __init__(
        self,
        db: Database,
        destinations: Sequence[ResultDestination],
        config: ExportConfig | None = None,
    ) -> None:
        self.db = db
        self.destinations = {d.name: d for d in destinations}
        self.config = config or ExportConfig()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="triage-results", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stops the thread: an association under way ends after its current C-STORE, and the
        exports it had not sent yet are due again at once (for the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def thread(self) -> threading.Thread | None:
        return self._thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_due()
            except Exception:
                log.exception("result export round failed")
            self._stop.wait(self.config.poll_seconds)

    # --- the queue ----------------------------------------------------------------------

    def _due(self, now: datetime) -> dict[str, list[tuple[int, int]]]:
        """Due exports to configured destinations: destination -> [(id, attempts)], oldest
        first, at most ``batch`` each."""
        due: dict[str, list[tuple[int, int]]] = {}
        with self.db.session() as s:
            for name in self.destinations:
                rows = s.execute(
                    select(ResultExportRow.id, ResultExportRow.attempts)
                    .where(
                        ResultExportRow.destination == name,
                        ResultExportRow.state == ExportState.pending,
                        or_(ResultExportRow.next_at.is_(None), ResultExportRow.next_at <= now),
                    )
                    .order_by(ResultExportRow.id)
                    .limit(self.config.batch)
                ).all()
                if rows:
                    due[name] = [(int(i), int(a)) for i, a in rows]
        return due

    def _lease(
        self, export_id: int, attempts: int, now: datetime, until: datetime
    ) -> _Leased | None:
        """Take the attempt (conditional UPDATE); what to send, or None when another sender
        took it (or the result was replaced meanwhile)."""
        with self.db.session() as s:
            result = s.execute(
                update(ResultExportRow)
                .where(
                    ResultExportRow.id == export_id,
                    ResultExportRow.state == ExportState.pending,
                    ResultExportRow.attempts == attempts,
                    or_(ResultExportRow.next_at.is_(None), ResultExportRow.next_at <= now),
                )
                .values(next_at=until)
            )
            if int(getattr(result, "rowcount", 0) or 0) != 1:
                return None
            row = s.execute(
                select(
                    DicomResultRow.path,
                    DicomResultRow.SOPInstanceUID,
                    DicomResultRow.kind,
                    StudyRow.StudyInstanceUID,
                )
                .join(ResultExportRow, ResultExportRow.result_id == DicomResultRow.id)
                .join(StudyRow, StudyRow.id == DicomResultRow.study_id)
                .where(ResultExportRow.id == export_id)
            ).first()
        if row is None:
            return None
        return _Leased(export_id, attempts, Path(row[0]), str(row[1]), str(row[2]), str(row[3]))

    def _unlease(self, leased: _Leased) -> None:
        """Give an attempt back untried (the sender is stopping): due again at once."""
        with self.db.session() as s:
            s.execute(
                update(ResultExportRow)
                .where(
                    ResultExportRow.id == leased.export_id,
                    ResultExportRow.state == ExportState.pending,
                    ResultExportRow.attempts == leased.attempts,
                )
                .values(next_at=None)
            )

    def _record(
        self, leased: _Leased, destination: str, error: str | None, *, final: bool = False
    ) -> bool:
        """Record one attempt's outcome (``final``: a failure no retry can mend); True when
        the export was sent."""
        now = datetime.now(UTC)
        done = leased.attempts + 1
        values: dict[str, object]
        audited: Outcome | None = None
        if error is None:
            values = {
                "state": ExportState.sent,
                "next_at": None,
                "sent_at": now,
                "last_error": None,
            }
            audited = Outcome.success
        elif final or done >= self.config.max_attempts:
            values = {"state": ExportState.failed, "next_at": None, "last_error": error}
            audited = Outcome.failure
            log.error(
                "result export %d to %s failed after %d attempts: %s",
                leased.export_id,
                destination,
                done,
                error,
            )
        else:
            c = self.config
            wait = backoff(done, c.backoff_seconds, c.max_backoff_seconds)
            values = {"next_at": now + wait, "last_error": error}
            log.warning(
                "result export %d to %s: attempt %d failed (%s); retry in %.0f s",
                leased.export_id,
                destination,
                done,
                error,
                wait.total_seconds(),
            )
        with self.db.session() as s:
            result = s.execute(
                update(ResultExportRow)
                .where(
                    ResultExportRow.id == leased.export_id,
                    ResultExportRow.attempts == leased.attempts,
                )
                .values(attempts=done, **values)
            )
            recorded = int(getattr(result, "rowcount", 0) or 0) == 1
        if recorded and audited is not None:
            append(
                self.db,
                AuditEvent(
                    action="export",
                    outcome=audited,
                    actor=AUDIT_ACTOR,
                    target_kind="study",
                    target=leased.study_uid,
                    source_address="local",
                    detail={
                        "destination": destination,
                        "SOPInstanceUID": leased.sop_instance_uid,
                        "kind": leased.kind,
                        **({"error": error} if error else {}),
                    },
                ),
            )
        return recorded and error is None

    # --- sending ------------------------------------------------------------------------

    def send_due(self, now: datetime | None = None) -> int:
        """One round: every due export, one association per destination. Returns how many
        were sent."""
        sent = 0
        for name, batch in self._due(now or datetime.now(UTC)).items():
            if self._stop.is_set():
                break
            sent += self._send_batch(self.destinations[name], batch, now)
        return sent

    def _association_limit(self, n: int) -> timedelta:
        """How long an association sending ``n`` objects may take at most (the lease)."""
        return timedelta(seconds=self.config.timeout_seconds * (3 + n) + 30)

    def _send_batch(
        self, destination: ResultDestination, batch: Sequence[tuple[int, int]], now: datetime | None
    ) -> int:
        start = datetime.now(UTC)
        until = start + self._association_limit(len(batch))
        leased = [
            lease
            for export_id, attempts in batch
            if (lease := self._lease(export_id, attempts, now or start, until)) is not None
        ]
        if not leased:
            return 0
        name = destination.name
        missing = [x for x in leased if not x.path.is_file()]
        for x in missing:  # nothing to send, ever: failed at once
            self._record(x, name, "the result's file is missing from the data folder", final=True)
        leased = [x for x in leased if x not in missing]
        if not leased:
            return 0
        assoc, error = self._associate(destination)
        if assoc is None:
            for x in leased:
                self._record(x, name, error)
            return 0
        sent = 0
        try:
            for message_id, x in enumerate(leased, start=1):
                if self._stop.is_set():
                    self._unlease(x)
                    continue
                if not assoc.is_established:
                    self._record(x, name, "association ended before the C-STORE")
                    continue
                sent += self._record(x, name, self._store(assoc, x, message_id))
        finally:
            if assoc.is_established:
                assoc.release()
        return sent

    def _associate(self, destination: ResultDestination) -> tuple[Association | None, str]:
        """An association with the destination, or None and why not (no patient data)."""
        timeout = self.config.timeout_seconds
        ae = AE(ae_title=self.config.calling_ae_title)
        for sop_class in SOP_CLASSES:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.connection_timeout = timeout
        tls_args = None
        try:
            if destination.tls:
                tls_args = (tls_context(destination), destination.host)
            assoc = ae.associate(
                destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
            )
        except (OSError, ValueError, RuntimeError) as exc:
            return None, f"no association ({type(exc).__name__})"
        if assoc.is_established:
            return assoc, ""
        if assoc.is_rejected:
            return None, "association rejected by the destination (check the AE titles)"
        # pynetdicom reports a refused or timed-out connection as an abort too.
        return None, "no association (connection refused, unreachable, timed out or aborted)"

    def _store(self, assoc: Association, leased: _Leased, message_id: int) -> str | None:
        """One C-STORE; None on Success or Warning, else how it failed."""
        try:
            answer = assoc.send_c_store(leased.path, msg_id=message_id)
        except ValueError:
            # pynetdicom: no accepted presentation context for the file's class and syntax.
            return f"the destination accepted no presentation context for the {leased.kind}"
        except Exception as exc:  # a file that no longer reads, a network error: retried
            return f"C-STORE not sent ({type(exc).__name__})"
        status = answer.get("Status") if answer is not None else None
        if status is None:
            return "no C-STORE answer (timed out or association lost)"
        category = code_to_category(int(status))
        if category in ("Success", "Warning"):
            if category == "Warning":
                log.info("export %d: stored with warning 0x%04X", leased.export_id, int(status))
            return None
        return f"C-STORE status 0x{int(status):04X} ({category})"
