"""The policy for a different instance arriving under a SOPInstanceUID already stored.

"Different" means a different data set, not different file bytes: the same instance comes
back with another file meta header (pynetdicom writes its own for C-STORE, a STOW-RS client
its own), in another VR encoding, or with group lengths added or dropped. Those are the same
instance, and :func:`data_set_differences` finds none; they, and the same bytes again, are
success without a second copy and never reach :func:`resolve_conflict`.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from datetime import datetime
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from sqlalchemy.engine import Connection

from triage.ingest.files import instance_path, write_durably
from triage.ingest.index import repoint_instance
from triage.ingest.outcome import IngestOutcome, StoreStatus

log = logging.getLogger(__name__)


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


_IGNORED_ELEMENTS = frozenset({0xFFFCFFFC})  # Data Set Trailing Padding


def _canonical(ds: Dataset) -> dict[int, object]:
    """Each element's value by tag, without what an encoding or a file adds: the file meta
    group (0002), group lengths, trailing padding. VRs are left out too (an implicit VR
    file has the dictionary's, an explicit one its own: OB or OW pixel data, US or SS)."""
    out: dict[int, object] = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0 or tag in _IGNORED_ELEMENTS:
            continue
        if elem.VR == "SQ":
            out[tag] = [_canonical(item) for item in elem.value or []]
        else:
            value = elem.value
            out[tag] = list(value) if isinstance(value, pydicom.multival.MultiValue) else value
    return out


def _name(tag: int) -> str:
    keyword = keyword_for_tag(tag) if not (tag >> 16) & 1 else ""
    return keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def data_set_differences(ds: Dataset, stored_path: Path) -> list[str]:
    """The attributes (keywords or tags, never values) in which ``ds`` differs from the
    stored copy at ``stored_path``; empty when the data sets are the same instance.

    A stored copy that cannot be read, or a value that cannot be decoded, counts as a
    difference (named ``"unreadable"``): only a positive match makes a resend harmless.
    """
    try:
        stored = _canonical(pydicom.dcmread(stored_path))
        received = _canonical(ds)
    except MemoryError:
        raise
    except Exception:
        return ["unreadable"]
    return [
        _name(tag)
        for tag in sorted(stored.keys() | received.keys())
        if stored.get(tag, _MISSING) != received.get(tag, _MISSING)
    ]


_MISSING = object()


class Keep(Protocol):
    """Keeps input in quarantine (``Ingestor.keep``); returns the record id or None."""

    def __call__(
        self, data: bytes, *, source: str, reason: str, status: StoreStatus, now: datetime
    ) -> int | None: ...


def resolve_conflict(
    data: bytes,
    ds: Dataset,
    existing_path: Path,
    *,
    policy: DuplicatePolicy,
    conn: Connection,
    store_dir: Path,
    tmp_dir: Path,
    keep: Keep,
    source: str,
    now: datetime,
    warning: tuple[StoreStatus, str] | None = None,
    differences: list[str] | None = None,
) -> IngestOutcome:
    """A different instance under a known SOPInstanceUID, handled by ``policy``.

    The caller holds the instance's lock (``Ingestor._instance_lock``): no other copy of it
    is being stored meanwhile, in this process or another, so the replaced copy's file can
    be removed.

    Args:
        data: the new copy as received; ``ds`` its parsed header.
        existing_path: the stored copy's file.
        conn: the connection the index is changed through (the one holding the lock).
        warning: a warning status and note the new copy carries (when it is stored).
        differences: the attributes in which the data sets differ (named in the reason).
    """
    sop_uid = str(ds.SOPInstanceUID)
    study_uid = str(ds.StudyInstanceUID)
    sop_class = str(ds.SOPClassUID)
    if policy == DuplicatePolicy.REPLACE:
        digest = hashlib.sha256(data).hexdigest()
        dest = instance_path(store_dir, study_uid, str(ds.SeriesInstanceUID), sop_uid, digest)
        try:
            write_durably(data, dest, tmp_dir)
        except OSError as exc:
            return IngestOutcome(
                StoreStatus.out_of_resources, f"storage failed: {exc.strerror}", sop_uid
            )
        moved = repoint_instance(
            conn,
            sop_uid=sop_uid,
            expected_path=existing_path,
            path=dest,
            digest=digest,
            size=len(data),
            source=source,
            now=now,
        )
        if not moved:  # the stored copy changed meanwhile (a process without the lock)
            return IngestOutcome(
                StoreStatus.out_of_resources,
                "the stored copy changed while this one replaced it; retry later",
                sop_uid,
            )
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
        f"a different instance under a stored SOPInstanceUID (policy {policy.value}):"
        f" {_differing(differences)}; the first copy is kept, this one is in quarantine"
    )
    qid = keep(data, source=source, reason=reason, status=status, now=now)
    log.warning("instance from %s conflicts with a stored copy (quarantine #%s)", source, qid)
    return IngestOutcome(status, reason, sop_uid, study_uid, sop_class, True, qid)


def _differing(differences: list[str] | None, shown: int = 8) -> str:
    if not differences:
        return "its data set differs"
    more = len(differences) - shown
    listed = ", ".join(differences[:shown]) + (f" and {more} more" if more > 0 else "")
    return f"differs in {listed}"
