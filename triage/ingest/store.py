"""Validate, store durably and index one received DICOM instance.

Every entry point (the C-STORE SCP, STOW-RS and ``triage import``) calls
:meth:`Ingestor.ingest`. Nothing here decodes pixel data or runs a model: checks read the
header and the raw pixel data element only. The steps live in modules of one job each:

* :mod:`triage.ingest.parse` (with :mod:`triage.ingest.structure`): bytes to a data set,
  or the reason the input cannot be read;
* :mod:`triage.ingest.validate`: the rules a parsed instance must meet;
* :mod:`triage.ingest.files`: content-addressed paths and durable writes;
* :mod:`triage.ingest.index`: the SQL index;
* :mod:`triage.ingest.duplicates`: a different instance under a stored SOPInstanceUID;
* :mod:`triage.ingest.quarantine`: refused input kept with its reason.

This module orders them and decides the status a sender is told.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from triage.config import Settings
from triage.db import Database
from triage.ingest import validate
from triage.ingest.duplicates import DuplicatePolicy, data_set_differences, resolve_conflict
from triage.ingest.files import (
    free_bytes,
    hashed_name,
    instance_path,
    remove_stale_parts,
    write_durably,
)
from triage.ingest.index import index_instance, order_priority_of, stored_copy
from triage.ingest.outcome import IngestOutcome, StoreStatus
from triage.ingest.parse import as_part10, parse
from triage.ingest.quarantine import quarantine, quarantine_listing
from triage.ingest.structure import Limits

__all__ = [
    "DuplicatePolicy",
    "IngestOutcome",
    "Ingestor",
    "StoreStatus",
    "ingest_instance",
    "instance_path",
    "order_priority_of",
    "quarantine",
    "quarantine_listing",
    "remove_stale_parts",
    "write_durably",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ingestor:
    """The one ingest path: C-STORE, STOW-RS and ``triage import`` all call :meth:`ingest`.

    Args:
        db: the database holding the index.
        store_dir: root of the DICOM file store.
        tmp_dir: directory on the same file system for temporary files.
        quarantine_dir: where rejected input is kept, with a record in the database.
        max_pixel_bytes: ceiling on Rows x Columns x frames x samples x bits, checked from
            the header before any pixel data is looked at, and on the pixel data element.
        min_free_bytes: below this much free disk space, input is refused with 0xA700 so
            that senders retry later.
        duplicate_policy: see :class:`DuplicatePolicy`.
        max_element_bytes: ceiling on the value of any one element other than pixel data.
        max_inflated_bytes: ceiling on the inflated data set of a Deflate transfer syntax.
    """

    db: Database
    store_dir: Path
    tmp_dir: Path
    quarantine_dir: Path
    max_pixel_bytes: int = 4 * 1024**3
    min_free_bytes: int = 256 * 1024**2
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    max_element_bytes: int = Limits.max_element_bytes
    max_inflated_bytes: int = Limits.max_inflated_bytes
    _locks: tuple[threading.Lock, ...] = field(
        default_factory=lambda: tuple(threading.Lock() for _ in range(64)),
        repr=False,
        compare=False,
    )

    @classmethod
    def from_settings(cls, settings: Settings, db: Database) -> Ingestor:
        settings.ensure_dirs()
        return cls(
            db=db,
            store_dir=settings.store_dir,
            tmp_dir=settings.incoming_dir,
            quarantine_dir=settings.quarantine_dir,
            max_pixel_bytes=settings.max_pixel_bytes,
            min_free_bytes=settings.min_free_bytes,
            duplicate_policy=DuplicatePolicy(settings.duplicate_policy),
            max_element_bytes=settings.max_element_bytes,
            max_inflated_bytes=settings.max_inflated_bytes,
        )

    @property
    def limits(self) -> Limits:
        """The ceilings applied while input is read."""
        return Limits(
            max_pixel_bytes=self.max_pixel_bytes,
            max_element_bytes=self.max_element_bytes,
            max_inflated_bytes=self.max_inflated_bytes,
        )

    def keep(
        self, data: bytes, *, source: str, reason: str, status: StoreStatus, now: datetime
    ) -> int | None:
        """Keep input that is not stored in quarantine (see :func:`quarantine`)."""
        return quarantine(
            data,
            db=self.db,
            quarantine_dir=self.quarantine_dir,
            tmp_dir=self.tmp_dir,
            source=source,
            reason=reason,
            status=status,
            now=now,
        )

    def refuse(
        self, data: bytes, *, source: str, reason: str, status: StoreStatus
    ) -> IngestOutcome:
        """Refuse input that is not even offered to :meth:`ingest` (a STOW-RS part that is
        not ``application/dicom``): kept in quarantine under the same free-disk reserve, or
        0xA700 (retry later) when the disk is below it or keeping fails."""
        full = self._disk_reserve_problem(source)
        if full is not None:
            return full
        now = datetime.now(UTC)
        return self._refuse(data, _Refusal(status, reason), source=source, now=now)

    def _disk_reserve_problem(self, source: str) -> IngestOutcome | None:
        free = free_bytes(self.tmp_dir)
        if free is not None and free < self.min_free_bytes:
            log.error("refusing input from %s: only %d MiB free", source, free // 2**20)
            return IngestOutcome(
                StoreStatus.out_of_resources,
                f"out of resources: less than {self.min_free_bytes // 2**20} MiB of disk free",
            )
        return None

    def ingest(
        self,
        data: bytes,
        *,
        source: str,
        now: datetime | None = None,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
        expected_study: str | None = None,
    ) -> IngestOutcome:
        """Validate, store and index one DICOM file given as bytes; never raises.

        Args:
            data: a Part 10 file (preamble, file meta, data set) as received; a bare data
                set without file meta is accepted with a coercion warning (0xB000).
            source: where it came from (``dicom:<calling AE>``, ``stow:<peer>``, ``import``);
                logged and recorded, no patient data.
            now: arrival time (defaults to now, UTC).
            expected_study: the study a STOW-RS request names in its URL; an instance of
                another study is refused with 0xA900.
            expected_sop_class / expected_sop_instance: the C-STORE request's affected SOP
                class and instance; a data set that disagrees is refused with 0xA900.

        Returns:
            The outcome with its DICOM status. Success (or a warning) is returned only once
            the file is fsync'ed in place and its index row is committed. Input that cannot
            be read or breaks a rule is refused (0xC000, 0xA900) and kept in quarantine.
            0xA700 (the sender keeps the instance and retries) is only for what a retry can
            cure: too little free disk, a failed write, the database unreachable, or
            refused input that could not be kept in quarantine.
        """
        now = now or datetime.now(UTC)
        full = self._disk_reserve_problem(source)
        if full is not None:
            return full
        try:
            checked = self._check(
                data,
                expected_sop_class=expected_sop_class,
                expected_sop_instance=expected_sop_instance,
                expected_study=expected_study,
            )
        except MemoryError:
            log.error("ingest of an instance from %s ran out of memory", source)
            return IngestOutcome(
                StoreStatus.out_of_resources, "out of resources: out of memory; retry later"
            )
        except Exception as exc:  # a fault in a check (a bug): refuse, keep the bytes
            log.error("checking an instance from %s failed: %s", source, type(exc).__name__)
            checked = _Refusal(
                StoreStatus.cannot_understand,
                f"the instance could not be checked (internal error {type(exc).__name__})",
            )
        if isinstance(checked, _Refusal):
            return self._refuse(data, checked, source=source, now=now)
        ds, warning, data = checked
        try:
            return self._store(data, ds, source=source, now=now, warning=warning)
        except Exception as exc:
            log.error("ingest of an instance from %s failed: %s", source, type(exc).__name__)
            return IngestOutcome(
                StoreStatus.out_of_resources,
                f"internal error while storing ({type(exc).__name__}); retry later",
            )

    def _refuse(
        self, data: bytes, refusal: _Refusal, *, source: str, now: datetime
    ) -> IngestOutcome:
        """Keep refused input in quarantine. When even that fails (the disk or the database
        is failing), answer 0xA700 so that the sender keeps the instance and retries."""
        qid = self.keep(data, source=source, reason=refusal.reason, status=refusal.status, now=now)
        if qid is None:
            log.error(
                "refused an instance from %s but could not keep it: %s", source, refusal.reason
            )
            return IngestOutcome(
                StoreStatus.out_of_resources,
                f"{refusal.reason}; it could not be kept in quarantine, retry later",
                SOPInstanceUID=refusal.sop_instance,
                SOPClassUID=refusal.sop_class,
            )
        log.warning("rejected instance from %s (quarantine #%s): %s", source, qid, refusal.reason)
        return IngestOutcome(
            refusal.status,
            refusal.reason,
            SOPInstanceUID=refusal.sop_instance,
            SOPClassUID=refusal.sop_class,
            quarantine_id=qid,
        )

    def _check(
        self,
        data: bytes,
        *,
        expected_sop_class: str | None,
        expected_sop_instance: str | None,
        expected_study: str | None,
    ) -> _Refusal | tuple[Dataset, tuple[StoreStatus, str] | None, bytes]:
        """Parse and validate: a refusal, or (data set, warning, bytes to store)."""
        executable = validate.executable_preamble(data)
        if executable:
            return _Refusal(
                StoreStatus.cannot_understand,
                f"the 128-byte preamble holds an executable ({executable}); refused",
            )
        parsed = parse(data, self.limits)
        if isinstance(parsed, str):
            return _Refusal(StoreStatus.cannot_understand, parsed)
        ds = parsed.ds
        ids = {
            name: str(ds.get(name))
            for name in ("SOPClassUID", "SOPInstanceUID")
            if ds.get(name) is not None and validate.uid_problem(name, ds.get(name)) is None
        }

        def refuse(status: StoreStatus, reason: str) -> _Refusal:
            return _Refusal(status, reason, ids.get("SOPInstanceUID"), ids.get("SOPClassUID"))

        media_class = str(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", ""))
        if media_class == validate.MEDIA_STORAGE_DIRECTORY:
            return refuse(
                StoreStatus.cannot_understand,
                "a DICOMDIR (media storage directory), not an instance: import its folder",
            )
        problem = validate.validate_header(ds)
        if problem:
            return refuse(StoreStatus.cannot_understand, problem)
        if expected_sop_class and str(ds.SOPClassUID) != expected_sop_class:
            return refuse(
                StoreStatus.dataset_does_not_match_sop_class,
                "SOPClassUID in the data set differs from the C-STORE request's",
            )
        if expected_sop_instance and str(ds.SOPInstanceUID) != expected_sop_instance:
            return refuse(
                StoreStatus.dataset_does_not_match_sop_class,
                "SOPInstanceUID in the data set differs from the C-STORE request's",
            )
        if expected_study and str(ds.StudyInstanceUID) != expected_study:
            return refuse(
                StoreStatus.dataset_does_not_match_sop_class,
                "StudyInstanceUID differs from the study in the request URL",
            )
        problem = validate.check_image_size(ds, self.max_pixel_bytes)
        if problem:
            return refuse(StoreStatus.cannot_understand, problem)
        problem = validate.check_sop_class_content(ds)
        if problem:
            return refuse(StoreStatus.dataset_does_not_match_sop_class, problem)
        problem = validate.check_pixel_data(data, ds)
        if problem:
            return refuse(StoreStatus.cannot_understand, problem)

        warning: tuple[StoreStatus, str] | None = None
        if parsed.coerced:
            warning = (StoreStatus.coercion_of_elements, parsed.coerced)
            try:
                data = as_part10(ds)
            except MemoryError:
                raise
            except Exception as exc:  # pydicom cannot write back what it read
                return refuse(
                    StoreStatus.cannot_understand,
                    "unreadable DICOM: the bare data set cannot be written as a Part 10 file"
                    f" ({type(exc).__name__})",
                )
        mismatch = validate.modality_mismatch(ds)
        if mismatch and warning is None:
            warning = (StoreStatus.dataset_does_not_match_sop_class_warning, mismatch)
        return ds, warning, data

    def _store(
        self,
        data: bytes,
        ds: Dataset,
        *,
        source: str,
        now: datetime,
        warning: tuple[StoreStatus, str] | None,
    ) -> IngestOutcome:
        with self._instance_lock(str(ds.SOPInstanceUID)) as conn:
            return self._store_locked(conn, data, ds, source=source, now=now, warning=warning)

    @contextmanager
    def _instance_lock(self, sop_uid: str) -> Iterator[Connection]:
        """Copies of one SOPInstanceUID are handled one after the other, from the look-up
        of a stored copy to the last file removed: in this process (a thread lock), and on
        PostgreSQL in every process of the database (a session-level advisory lock, held
        by the connection yielded, which the index is written through). Instances of one
        new study or series need no lock (see :func:`index_instance`).

        The lock is what makes the content-addressed paths safe to share: two processes
        writing the same copy write the same file, so none may remove a file (a copy that
        lost, a replaced copy) while another could be pointing the index at it.
        """
        bucket = int(hashed_name(sop_uid)[:8], 16)
        with self._locks[bucket % len(self._locks)], self.db.engine.connect() as conn:
            if conn.dialect.name != "postgresql":
                yield conn  # SQLite: the thread lock (one serving process) only
                return
            key = {"space": _LOCK_SPACE, "key": bucket - 2**31}
            with conn.begin():
                conn.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_WAIT_SECONDS}s'"))
                conn.execute(text("SELECT pg_advisory_lock(:space, :key)"), key)
            try:
                yield conn
            finally:
                try:
                    if conn.in_transaction():
                        conn.rollback()
                    conn.execute(text("SELECT pg_advisory_unlock(:space, :key)"), key)
                    conn.commit()
                except SQLAlchemyError:
                    conn.invalidate()  # the session ends, and its lock with it

    def _store_locked(
        self,
        conn: Connection,
        data: bytes,
        ds: Dataset,
        *,
        source: str,
        now: datetime,
        warning: tuple[StoreStatus, str] | None,
    ) -> IngestOutcome:
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        sop_class = str(ds.SOPClassUID)
        digest = hashlib.sha256(data).hexdigest()

        def outcome(status: StoreStatus, reason: str, duplicate: bool = False) -> IngestOutcome:
            return IngestOutcome(status, reason, sop_uid, study_uid, sop_class, duplicate)

        existing = stored_copy(conn, sop_uid)
        if existing is not None:
            return self._resend(
                conn, data, ds, digest, existing, source=source, now=now, warning=warning
            )

        dest = instance_path(self.store_dir, study_uid, series_uid, sop_uid, digest)
        try:
            write_durably(data, dest, self.tmp_dir)
        except OSError as exc:
            log.error("could not store instance from %s: %s", source, type(exc).__name__)
            return outcome(StoreStatus.out_of_resources, f"storage failed: {exc.strerror}")

        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        for _attempt in range(3):
            try:
                with conn.begin() as trans:
                    indexed = index_instance(
                        conn,
                        ds,
                        now=now,
                        path=dest,
                        size=len(data),
                        digest=digest,
                        ts=ts,
                        source=source,
                    )
                    if not indexed:
                        trans.rollback()
                existing = None if indexed else stored_copy(conn, sop_uid)
            except SQLAlchemyError:
                self._discard_unindexed(conn, dest, sop_uid)
                raise
            if indexed:
                break
            if existing is not None:
                # Indexed at the same moment by a process that does not share the lock
                # (on SQLite: ``triage import`` beside ``triage serve``).
                if existing[1] != dest:
                    self._discard_unindexed(conn, dest, sop_uid)
                return self._resend(
                    conn, data, ds, digest, existing, source=source, now=now, warning=warning
                )
            # That copy's row is gone again: index this one.
        else:
            self._discard_unindexed(conn, dest, sop_uid)
            raise RuntimeError("the instance could not be indexed")
        if warning is not None:
            return outcome(warning[0], f"stored with a warning: {warning[1]}")
        return outcome(StoreStatus.success, "stored")

    def _discard_unindexed(self, conn: Connection, dest: Path, sop_uid: str) -> None:
        """Remove a file written for an index row that did not commit, unless the index
        points at it after all (a commit whose answer was lost) or cannot be asked (then
        the file stays: the sender's retry writes the same path and indexes it)."""
        try:
            if conn.in_transaction():
                conn.rollback()
            existing = stored_copy(conn, sop_uid)
        except SQLAlchemyError:
            return
        if existing is None or existing[1] != dest:
            dest.unlink(missing_ok=True)

    def _resend(
        self,
        conn: Connection,
        data: bytes,
        ds: Dataset,
        digest: str,
        existing: tuple[str, Path],
        *,
        source: str,
        now: datetime,
        warning: tuple[StoreStatus, str] | None,
    ) -> IngestOutcome:
        """An instance under a SOPInstanceUID already stored: the same instance again
        (the same bytes, or the same data set with another file meta header or encoding)
        is success without a second copy; a different one goes to the duplicate policy."""
        ids = (str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPClassUID))
        stored_digest, stored_path = existing
        if stored_digest == digest:
            return IngestOutcome(
                StoreStatus.success, "duplicate of a stored instance", *ids, duplicate=True
            )
        differences = data_set_differences(ds, Path(stored_path))
        if not differences:
            return IngestOutcome(
                StoreStatus.success,
                "duplicate of a stored instance (the same data set; file meta or encoding differ)",
                *ids,
                duplicate=True,
            )
        return resolve_conflict(
            data,
            ds,
            Path(stored_path),
            policy=self.duplicate_policy,
            conn=conn,
            store_dir=self.store_dir,
            tmp_dir=self.tmp_dir,
            keep=self.keep,
            source=source,
            now=now,
            warning=warning,
            differences=differences,
        )


_LOCK_SPACE = 0x7472_6961
"""The key space ("tria") of the PostgreSQL advisory locks on one SOPInstanceUID's copies."""
_LOCK_WAIT_SECONDS = 60
"""How long a copy waits for another copy of the same instance (then 0xA700, retry)."""


@dataclass(frozen=True)
class _Refusal:
    """Why an instance is refused, and the UIDs worth reporting (valid ones only)."""

    status: StoreStatus
    reason: str
    sop_instance: str | None = None
    sop_class: str | None = None


def ingest_instance(
    data: bytes,
    *,
    db: Database,
    store_dir: Path,
    tmp_dir: Path,
    quarantine_dir: Path,
    source: str,
    now: datetime | None = None,
) -> IngestOutcome:
    """:meth:`Ingestor.ingest` with default limits and policy (tests and scripts)."""
    return Ingestor(db, store_dir, tmp_dir, quarantine_dir).ingest(data, source=source, now=now)
