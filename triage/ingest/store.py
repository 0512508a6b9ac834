"""Validate, store durably and index one received DICOM instance.

Every entry point (the C-STORE SCP, STOW-RS and ``triage import``) calls
:meth:`Ingestor.ingest`. Nothing here decodes pixel data or runs a model: checks read the
header and the raw pixel data element only.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from triage.config import Settings
from triage.db import Database
from triage.db.tables import InstanceRow, QuarantineRow, SeriesRow, StudyRow
from triage.domain import location_class

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreStatus(enum.IntEnum):
    """DICOM C-STORE status codes (PS3.4 Annex B.2.3, PS3.7 Annex C) used by ingest.

    Senders retry on 0xA7xx (ours: the disk is full or failing) and give up on 0xA9xx and
    0xCxxx; warnings (0xBxxx) mean the instance was stored.
    """

    success = 0x0000
    duplicate_sop_instance = 0x0111
    out_of_resources = 0xA700
    dataset_does_not_match_sop_class = 0xA900
    coercion_of_elements = 0xB000
    dataset_does_not_match_sop_class_warning = 0xB007
    cannot_understand = 0xC000

    @property
    def stored(self) -> bool:
        """True for success and warnings: the instance is kept in the store."""
        return self == StoreStatus.success or 0xB000 <= self < 0xC000


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one instance; ``reason`` never carries patient data."""

    status: StoreStatus
    reason: str
    SOPInstanceUID: str | None = None
    StudyInstanceUID: str | None = None
    SOPClassUID: str | None = None
    duplicate: bool = False
    quarantine_id: int | None = None

    @property
    def ok(self) -> bool:
        """Stored (success or a warning)."""
        return self.status.stored


def _uid_problem(name: str, value: object) -> str | None:
    if value is None or str(value) == "":
        return f"missing required attribute {name}"
    text = str(value)
    if len(text) > 64:
        return f"{name} is {len(text)} characters long (at most 64 allowed)"
    if not _UID_RE.match(text):
        return f"{name} contains characters other than digits and dots"
    return None


def validate_header(ds: Dataset) -> str | None:
    """Return a reason the header is unacceptable, or None when it is fine."""
    for name in REQUIRED_UIDS:
        problem = _uid_problem(name, ds.get(name))
        if problem:
            return problem
    if not ds.get("Modality"):
        return "missing required attribute Modality"
    return None


# Executable formats a Part 10 preamble must not hold (PS3.10 7.5 allows TIFF and zeros).
_EXECUTABLE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"MZ", "Windows PE/DOS"),
    (b"\x7fELF", "ELF"),
    (b"#!", "script"),
    (b"\xfe\xed\xfa\xce", "Mach-O"),
    (b"\xfe\xed\xfa\xcf", "Mach-O"),
    (b"\xce\xfa\xed\xfe", "Mach-O"),
    (b"\xcf\xfa\xed\xfe", "Mach-O"),
    (b"\xca\xfe\xba\xbe", "Mach-O universal/Java class"),
)


def executable_preamble(data: bytes) -> str | None:
    """The kind of executable held in a Part 10 preamble, or None."""
    if data[128:132] != b"DICM":
        return None
    preamble = data[:128]
    for magic, kind in _EXECUTABLE_MAGIC:
        if preamble.startswith(magic):
            return kind
    return None


class _PydicomNotes(logging.Handler):
    """Collects pydicom's reading warnings for the current thread while it parses a file.

    pydicom reads a truncated file without raising and only warns; these notes are the
    evidence. They are never written out: pydicom's messages can quote attribute values
    (patient data), so its logger does not propagate to the application's log.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        notes: list[str] | None = getattr(self.local, "notes", None)
        if notes is not None:
            notes.append(record.getMessage())

    @contextmanager
    def collect(self) -> Iterator[list[str]]:
        notes: list[str] = []
        self.local.notes = notes
        try:
            yield notes
        finally:
            self.local.notes = None


_NOTES = _PydicomNotes()
_pydicom_log = logging.getLogger("pydicom")
_pydicom_log.addHandler(_NOTES)
_pydicom_log.propagate = False


def _parse(data: bytes) -> tuple[Dataset, str | None] | str:
    """The data set (pixel data read as bytes, never decoded) and a coercion note, or the
    reason it cannot be read."""
    has_meta = data[128:132] == b"DICM"
    try:
        with _NOTES.collect() as notes:
            # Element values stay raw until used; the checks below read the ones they need.
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_meta)
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        OSError,
        KeyError,
        TypeError,
        NotImplementedError,
        AttributeError,
        IndexError,
        struct.error,
    ) as exc:
        return f"unreadable DICOM: {type(exc).__name__}"
    if any("End of file reached" in n or "truncat" in n.lower() for n in notes):
        return "truncated DICOM: the file ends before its data set is complete"
    if has_meta and len(ds) == 0:
        return "unreadable DICOM: no data set after the file meta (truncated or malformed)"
    if has_meta:
        if not ds.file_meta.get("TransferSyntaxUID"):
            return "unreadable DICOM: file meta has no TransferSyntaxUID"
        return ds, None
    if len(ds) == 0 or "SOPInstanceUID" not in ds:
        return "not DICOM: no Part 10 header ('DICM' at byte 128) and no readable data set"
    return ds, "no Part 10 file meta: a file meta header was added"


def _as_part10(ds: Dataset) -> bytes:
    """A bare data set written as a Part 10 file (file meta added, encoding kept)."""
    ds.ensure_file_meta()
    ts = (
        pydicom.uid.ImplicitVRLittleEndian
        if ds.is_implicit_VR
        else (
            pydicom.uid.ExplicitVRBigEndian
            if not ds.is_little_endian
            else pydicom.uid.ExplicitVRLittleEndian
        )
    )
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _is_image_storage(sop_class: str) -> bool:
    return "Image Storage" in pydicom.uid.UID(sop_class).name


def check_image_size(ds: Dataset, max_pixel_bytes: int) -> str | None:
    """A reason when the header announces more pixel data than the ceiling, else None."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    bits = _int(ds, "BitsAllocated", 0)
    if None in (rows, cols, frames, samples, bits):
        return "Rows, Columns, NumberOfFrames, SamplesPerPixel or BitsAllocated is not a number"
    assert rows is not None and cols is not None and frames is not None
    assert samples is not None and bits is not None
    if min(rows, cols, frames, samples, bits) < 0:
        return "a negative image dimension"
    size = rows * cols * frames * samples * bits // 8
    if size > max_pixel_bytes:
        return (
            f"image too large: Rows {rows} x Columns {cols} x frames {frames} x samples"
            f" {samples} x {bits} bits = {size} bytes, over the {max_pixel_bytes}-byte ceiling"
        )
    return None


def check_sop_class_content(ds: Dataset) -> str | None:
    """A reason when an image SOP class lacks the image pixel module, else None (0xA900)."""
    sop_class = str(ds.SOPClassUID)
    if not _is_image_storage(sop_class):
        return None
    name = pydicom.uid.UID(sop_class).name
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            return f"data set does not match {name}: missing {keyword}"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return f"data set does not match {name}: no pixel data"
    if not (_int(ds, "Rows") and _int(ds, "Columns")):
        return f"data set does not match {name}: Rows or Columns is 0"
    return None


def check_pixel_data(data: bytes, ds: Dataset) -> str | None:
    """A reason when the pixel data element is truncated or its fragments are malformed."""
    if "PixelData" not in ds:
        return None
    elem = ds["PixelData"]
    value = elem.value
    if not isinstance(value, bytes):
        return "PixelData could not be read"
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    encapsulated = bool(ts) and pydicom.uid.UID(str(ts)).is_encapsulated
    if encapsulated:
        return _check_fragments(value, frames=_int(ds, "NumberOfFrames", 1) or 1)
    rows, cols = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    frames = _int(ds, "NumberOfFrames", 1) or 1
    samples, bits = _int(ds, "SamplesPerPixel", 1) or 1, _int(ds, "BitsAllocated", 0) or 0
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" and samples == 3:
        samples = 2  # native YBR_FULL_422 keeps 2 values per pixel (PS3.3 C.7.6.3.1.2)
    pixels = rows * cols * frames * samples
    needed = (pixels + 7) // 8 if bits == 1 else pixels * bits // 8
    if len(value) < needed:
        return (
            f"truncated PixelData: {len(value)} bytes where Rows x Columns x frames x samples"
            f" x BitsAllocated needs {needed}"
        )
    return None


def _check_fragments(value: bytes, *, frames: int) -> str | None:
    """Walk the items of encapsulated pixel data (PS3.5 A.4): each item must fit in the
    value, and there must be a fragment per frame at least (the first item is the offset
    table)."""
    offset, items = 0, 0
    while offset + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHL", value, offset)
        tag = group << 16 | element
        if tag == 0xFFFEE0DD:
            break
        if tag != 0xFFFEE000 or length == 0xFFFFFFFF:
            return "malformed encapsulated PixelData: unexpected item tag or length"
        if offset + 8 + length > len(value):
            return (
                f"truncated encapsulated PixelData: item {items} declares {length} bytes,"
                f" {len(value) - offset - 8} present"
            )
        offset += 8 + length
        items += 1
    fragments = items - 1
    if fragments < 1:
        return "encapsulated PixelData holds no fragments"
    if fragments < frames:
        return f"truncated encapsulated PixelData: {fragments} fragment(s) for {frames} frames"
    return None


# SOP classes whose IOD fixes the Modality value.
_MODALITY_OF_CLASS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.5.1.4.1.1.2": ("CT",),
    "1.2.840.10008.5.1.4.1.1.2.1": ("CT",),
    "1.2.840.10008.5.1.4.1.1.1": ("CR",),
    "1.2.840.10008.5.1.4.1.1.1.1": ("DX",),
    "1.2.840.10008.5.1.4.1.1.1.1.1": ("DX",),
    "1.2.840.10008.5.1.4.1.1.4": ("MR",),
}


def modality_mismatch(ds: Dataset) -> str | None:
    """A note when Modality contradicts the SOP class (stored with warning 0xB007)."""
    allowed = _MODALITY_OF_CLASS.get(str(ds.SOPClassUID))
    modality = str(ds.get("Modality", "")).strip().upper()
    if allowed and modality not in allowed:
        return (
            f"Modality {modality[:16]!r} does not match {pydicom.uid.UID(str(ds.SOPClassUID)).name}"
        )
    return None


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _hashed_name(uid: str) -> str:
    """Storage names derive from a hash of the UID, never from raw attribute text."""
    return hashlib.sha256(uid.encode("ascii")).hexdigest()[:24]


def instance_path(
    store_dir: Path, study_uid: str, series_uid: str, sop_uid: str, digest: str
) -> Path:
    """Where an instance is kept: hashes of its UIDs and the start of its content hash, so
    two different copies of one SOPInstanceUID never overwrite each other's file."""
    return (
        store_dir
        / _hashed_name(study_uid)
        / _hashed_name(series_uid)
        / f"{_hashed_name(sop_uid)}-{digest[:16]}.dcm"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(directory: Path) -> None:
    """Create ``directory`` and missing parents; fsync the parent of each one created, so
    that a new study or series folder survives power loss like the file put in it."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # another thread made it (and fsyncs its parent)
        _fsync_dir(d.parent)


def write_durably(data: bytes, dest: Path, tmp_dir: Path) -> None:
    """Write to a temporary file, fsync it, rename it into place and fsync the directory."""
    _make_dirs_durably(dest.parent)
    tmp_name = tmp_dir / f"{uuid.uuid4().hex}.part"
    try:
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def remove_stale_parts(tmp_dir: Path, *, older_than_seconds: float = 60.0) -> int:
    """Delete temporary files left by a crash in the middle of a write (run at start).

    Only files older than ``older_than_seconds`` go, so a ``triage import`` writing into the
    same data directory at that moment keeps its own.
    """
    cutoff = time.time() - older_than_seconds
    removed = 0
    for part in tmp_dir.glob("*.part"):
        try:
            if part.stat().st_mtime < cutoff:
                part.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def order_priority_of(ds: Dataset) -> str | None:
    """The order's priority where the study carries one (STAT, HIGH, MEDIUM, ROUTINE, LOW)."""
    for keyword in ("RequestedProcedurePriority", "StudyPriorityID"):
        value = ds.get(keyword)
        if value:
            return str(value).strip().upper()[:16]
    for item in ds.get("RequestAttributesSequence", []) or []:
        value = item.get("RequestedProcedurePriority")
        if value:
            return str(value).strip().upper()[:16]
    return None


class DuplicatePolicy(enum.StrEnum):
    """What to do when a *different* instance arrives under a known SOPInstanceUID.

    The same bytes again are always success without a copy (a harmless resend).
    """

    KEEP_FIRST = "keep_first"
    """Answer success, keep the first copy, keep the new one in quarantine for review."""
    REPLACE = "replace"
    """Replace the stored copy (a corrected resend) and analyse the study again."""
    REJECT = "reject"
    """Refuse the new copy (status 0x0111) and keep it in quarantine."""


@dataclass(frozen=True)
class Ingestor:
    """The one ingest path: C-STORE, STOW-RS and ``triage import`` all call :meth:`ingest`.

    Args:
        db: the database holding the index.
        store_dir: root of the DICOM file store.
        tmp_dir: directory on the same file system for temporary files.
        quarantine_dir: where rejected input is kept, with a record in the database.
        max_pixel_bytes: ceiling on Rows x Columns x frames x samples x bits, checked from
            the header before any pixel data is looked at.
        min_free_bytes: below this much free disk space, input is refused with 0xA700 so
            that senders retry later.
        duplicate_policy: see :class:`DuplicatePolicy`.
    """

    db: Database
    store_dir: Path
    tmp_dir: Path
    quarantine_dir: Path
    max_pixel_bytes: int = 4 * 1024**3
    min_free_bytes: int = 256 * 1024**2
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
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

        See :meth:`_ingest`. An unexpected error (the database is unreachable, a bug) is
        logged by type only and answered 0xA700, so that the sender keeps the instance and
        retries; nothing is acknowledged that is not stored and indexed.
        """
        try:
            return self._ingest(
                data,
                source=source,
                now=now,
                expected_sop_class=expected_sop_class,
                expected_sop_instance=expected_sop_instance,
                expected_study=expected_study,
            )
        except Exception as exc:
            log.error("ingest of an instance from %s failed: %s", source, type(exc).__name__)
            return IngestOutcome(
                StoreStatus.out_of_resources,
                f"internal error while storing ({type(exc).__name__}); retry later",
            )

    def _ingest(
        self,
        data: bytes,
        *,
        source: str,
        now: datetime | None = None,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
        expected_study: str | None = None,
    ) -> IngestOutcome:
        """Validate, store and index one DICOM file given as bytes.

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
            the file is fsync'ed in place and its index row is committed. Rejected input is
            kept in quarantine (see :func:`quarantine`).
        """
        now = now or datetime.now(UTC)
        ids: dict[str, str | None] = {"SOPClassUID": None, "SOPInstanceUID": None}

        def reject(status: StoreStatus, reason: str) -> IngestOutcome:
            qid = self.keep(data, source=source, reason=reason, status=status, now=now)
            log.warning("rejected instance from %s (quarantine #%s): %s", source, qid, reason)
            return IngestOutcome(
                status,
                reason,
                SOPInstanceUID=ids["SOPInstanceUID"],
                SOPClassUID=ids["SOPClassUID"],
                quarantine_id=qid,
            )

        free = _free_bytes(self.tmp_dir)
        if free is not None and free < self.min_free_bytes:
            log.error("refusing input from %s: only %d MiB free", source, free // 2**20)
            return IngestOutcome(
                StoreStatus.out_of_resources,
                f"out of resources: less than {self.min_free_bytes // 2**20} MiB of disk free",
            )

        executable = executable_preamble(data)
        if executable:
            return reject(
                StoreStatus.cannot_understand,
                f"the 128-byte preamble holds an executable ({executable}); refused",
            )
        parsed = _parse(data)
        if isinstance(parsed, str):
            return reject(StoreStatus.cannot_understand, parsed)
        ds, coerced = parsed
        for name in ("SOPClassUID", "SOPInstanceUID"):
            value = ds.get(name)
            if value is not None and _uid_problem(name, value) is None:
                ids[name] = str(value)
        media_class = str(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", ""))
        if media_class == MEDIA_STORAGE_DIRECTORY:
            return reject(
                StoreStatus.cannot_understand,
                "a DICOMDIR (media storage directory), not an instance: import its folder",
            )
        problem = validate_header(ds)
        if problem:
            return reject(StoreStatus.cannot_understand, problem)
        sop_class = str(ds.SOPClassUID)
        if expected_sop_class and sop_class != expected_sop_class:
            return reject(
                StoreStatus.dataset_does_not_match_sop_class,
                "SOPClassUID in the data set differs from the C-STORE request's",
            )
        if expected_sop_instance and str(ds.SOPInstanceUID) != expected_sop_instance:
            return reject(
                StoreStatus.dataset_does_not_match_sop_class,
                "SOPInstanceUID in the data set differs from the C-STORE request's",
            )
        if expected_study and str(ds.StudyInstanceUID) != expected_study:
            return reject(
                StoreStatus.dataset_does_not_match_sop_class,
                "StudyInstanceUID differs from the study in the request URL",
            )
        problem = check_image_size(ds, self.max_pixel_bytes)
        if problem:
            return reject(StoreStatus.cannot_understand, problem)
        problem = check_sop_class_content(ds)
        if problem:
            return reject(StoreStatus.dataset_does_not_match_sop_class, problem)
        problem = check_pixel_data(data, ds)
        if problem:
            return reject(StoreStatus.cannot_understand, problem)

        warning: tuple[StoreStatus, str] | None = None
        if coerced:
            warning = (StoreStatus.coercion_of_elements, coerced)
            data = _as_part10(ds)
        mismatch = modality_mismatch(ds)
        if mismatch and warning is None:
            warning = (StoreStatus.dataset_does_not_match_sop_class_warning, mismatch)
        return self._store(data, ds, source=source, now=now, warning=warning)

    def _store(
        self,
        data: bytes,
        ds: Dataset,
        *,
        source: str,
        now: datetime,
        warning: tuple[StoreStatus, str] | None,
    ) -> IngestOutcome:
        sop_uid = str(ds.SOPInstanceUID)
        # Copies of one SOPInstanceUID arriving at once (two associations, STOW and C-STORE)
        # are handled one after the other.
        with self._locks[int(_hashed_name(sop_uid)[:8], 16) % len(self._locks)]:
            return self._store_locked(data, ds, source=source, now=now, warning=warning)

    def _store_locked(
        self,
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

        existing = self._existing(sop_uid)
        if existing is not None:
            if existing[0] == digest:
                return outcome(StoreStatus.success, "duplicate of a stored instance", True)
            return self._conflict(data, ds, existing[1], source=source, now=now, warning=warning)

        dest = instance_path(self.store_dir, study_uid, series_uid, sop_uid, digest)
        try:
            write_durably(data, dest, self.tmp_dir)
        except OSError as exc:
            log.error("could not store instance from %s: %s", source, type(exc).__name__)
            return outcome(StoreStatus.out_of_resources, f"storage failed: {exc.strerror}")

        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        for attempt in range(3):
            try:
                with self.db.engine.begin() as conn:
                    _index(
                        conn,
                        ds,
                        now=now,
                        path=dest,
                        size=len(data),
                        digest=digest,
                        ts=ts,
                        source=source,
                    )
                break
            except IntegrityError:
                existing = self._existing(sop_uid)
                if existing is None:
                    if attempt < 2:
                        continue  # a first instance of the same new study or series won
                    dest.unlink(missing_ok=True)
                    raise
                # Another process indexed the same SOPInstanceUID at the same moment.
                if Path(existing[1]) != dest:
                    dest.unlink(missing_ok=True)
                if existing[0] == digest:
                    return outcome(StoreStatus.success, "duplicate of a stored instance", True)
                return self._conflict(
                    data, ds, existing[1], source=source, now=now, warning=warning
                )
            except SQLAlchemyError:
                dest.unlink(missing_ok=True)  # not indexed: nothing refers to it
                raise
        if warning is not None:
            return outcome(warning[0], f"stored with a warning: {warning[1]}")
        return outcome(StoreStatus.success, "stored")

    def _existing(self, sop_uid: str) -> tuple[str, Path] | None:
        """(sha256, path) of the stored copy of an instance, or None."""
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(InstanceRow.sha256, InstanceRow.path).where(
                    InstanceRow.SOPInstanceUID == sop_uid
                )
            ).first()
        return None if row is None else (str(row[0]), Path(row[1]))

    def _conflict(
        self,
        data: bytes,
        ds: Dataset,
        existing_path: Path,
        *,
        source: str,
        now: datetime,
        warning: tuple[StoreStatus, str] | None = None,
    ) -> IngestOutcome:
        """A different instance under a known SOPInstanceUID, handled by the policy."""
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        sop_class = str(ds.SOPClassUID)
        policy = self.duplicate_policy
        if policy == DuplicatePolicy.REPLACE:
            digest = hashlib.sha256(data).hexdigest()
            dest = instance_path(
                self.store_dir, study_uid, str(ds.SeriesInstanceUID), sop_uid, digest
            )
            try:
                write_durably(data, dest, self.tmp_dir)
            except OSError as exc:
                return IngestOutcome(
                    StoreStatus.out_of_resources, f"storage failed: {exc.strerror}", sop_uid
                )
            with self.db.session() as s:
                row = s.scalar(select(InstanceRow).where(InstanceRow.SOPInstanceUID == sop_uid))
                if row is not None:
                    row.path = str(dest)
                    row.sha256 = digest
                    row.size_bytes = len(data)
                    row.received_at = now
                    row.source = source[:128]
                    row.series.state = "receiving"
                    row.series.last_received_at = now
                    row.series.study.last_received_at = now
                    row.series.study.ai_status = "pending"
            if existing_path != dest:
                existing_path.unlink(missing_ok=True)  # after the index points at the new copy
            log.info("instance from %s replaced a stored copy (policy replace)", source)
            return IngestOutcome(
                warning[0] if warning else StoreStatus.success,
                "replaced the stored copy (policy replace)"
                + (f", with a warning: {warning[1]}" if warning else ""),
                sop_uid,
                study_uid,
                sop_class,
            )
        status = (
            StoreStatus.success
            if policy == DuplicatePolicy.KEEP_FIRST
            else StoreStatus.duplicate_sop_instance
        )
        reason = (
            f"different content under a stored SOPInstanceUID (policy {policy.value}): "
            "the first copy is kept, this one is in quarantine"
        )
        qid = self.keep(data, source=source, reason=reason, status=status, now=now)
        log.warning("instance from %s conflicts with a stored copy (quarantine #%s)", source, qid)
        return IngestOutcome(status, reason, sop_uid, study_uid, sop_class, True, qid)


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


def quarantine(
    data: bytes,
    *,
    db: Database,
    quarantine_dir: Path,
    tmp_dir: Path,
    source: str,
    reason: str,
    status: StoreStatus,
    now: datetime,
) -> int | None:
    """Keep rejected bytes under a name made from their sha256, with a database record.

    Returns:
        The quarantine record's id, or None when even keeping it failed (logged).
    """
    digest = hashlib.sha256(data).hexdigest()
    dest = quarantine_dir / digest[:2] / f"{digest}.bin"
    try:
        if not dest.exists():
            write_durably(data, dest, tmp_dir)
        with db.session() as s:
            row = QuarantineRow(
                received_at=now,
                source=source[:128],
                reason=reason,
                status_code=int(status),
                sha256=digest,
                size_bytes=len(data),
                path=str(dest),
            )
            s.add(row)
            s.flush()
            return int(row.id)
    except Exception:
        log.exception("could not keep rejected input from %s in quarantine", source)
        return None


def quarantine_listing(db: Database, *, limit: int = 500) -> dict[str, list[dict[str, object]]]:
    """The newest quarantine records: ``{"items": [...]}`` (no patient data in them)."""
    with db.session() as s:
        rows = s.scalars(select(QuarantineRow).order_by(QuarantineRow.id.desc()).limit(limit)).all()
        items: list[dict[str, object]] = [
            {
                "id": r.id,
                "received_at": (
                    r.received_at if r.received_at.tzinfo else r.received_at.replace(tzinfo=UTC)
                ).isoformat(),
                "source": r.source,
                "reason": r.reason,
                "status": f"0x{r.status_code:04X}",
                "sha256": r.sha256,
                "size_bytes": r.size_bytes,
            }
            for r in rows
        ]
    return {"items": items}


def _index(
    s: Connection,
    ds: Dataset,
    *,
    now: datetime,
    path: Path,
    size: int,
    digest: str,
    ts: str,
    source: str,
) -> None:
    """Index one stored instance: get or create its study and series, count it, add it.

    SQL statements on a connection rather than ORM objects in a session: this runs once per
    received instance, and the ORM's bookkeeping cost more than the statements.
    Two first instances of one new study arriving at once make one of the inserts fail
    with IntegrityError; the caller retries (see ``Ingestor._store_locked``).
    """
    study_uid = str(ds.StudyInstanceUID)
    series_uid = str(ds.SeriesInstanceUID)
    priority = order_priority_of(ds)
    study_id = s.scalar(select(StudyRow.id).where(StudyRow.StudyInstanceUID == study_uid))
    if study_id is None:
        study_id = s.scalar(
            insert(StudyRow)
            .returning(StudyRow.id)
            .values(
                StudyInstanceUID=study_uid,
                PatientID=_text(ds, "PatientID", 64),
                PatientName=_text(ds, "PatientName", 324),
                AccessionNumber=_text(ds, "AccessionNumber", 64),
                StudyDescription=_text(ds, "StudyDescription", 256),
                StudyDate=_text(ds, "StudyDate", 16),
                order_priority=priority,
                location_class=location_class(
                    " ".join(
                        str(ds.get(k, "") or "")
                        for k in (
                            "CurrentPatientLocation",
                            "InstitutionalDepartmentName",
                            "RequestingService",
                        )
                    )
                ),
                first_received_at=now,
                last_received_at=now,
                ai_status="pending",
            )
        )
    else:
        values: dict[str, Any] = {"last_received_at": now, "ai_status": "pending"}
        if priority:
            values["order_priority"] = func.coalesce(StudyRow.order_priority, priority)
        s.execute(update(StudyRow).where(StudyRow.id == study_id).values(**values))
    series_id = s.scalar(select(SeriesRow.id).where(SeriesRow.SeriesInstanceUID == series_uid))
    if series_id is None:
        series_id = s.scalar(
            insert(SeriesRow)
            .returning(SeriesRow.id)
            .values(
                study_id=study_id,
                SeriesInstanceUID=series_uid,
                Modality=_text(ds, "Modality", 16),
                SeriesDescription=_text(ds, "SeriesDescription", 256),
                BodyPartExamined=_text(ds, "BodyPartExamined", 64),
                n_instances=1,
                last_received_at=now,
                state="receiving",
            )
        )
    else:
        s.execute(
            update(SeriesRow)
            .where(SeriesRow.id == series_id)
            .values(n_instances=SeriesRow.n_instances + 1, last_received_at=now, state="receiving")
        )
    s.execute(
        insert(InstanceRow).values(
            series_id=series_id,
            SOPInstanceUID=str(ds.SOPInstanceUID),
            SOPClassUID=str(ds.SOPClassUID),
            TransferSyntaxUID=ts[:64],
            path=str(path),
            size_bytes=size,
            sha256=digest,
            received_at=now,
            source=source[:128],
        )
    )
