"""The policy for a different instance arriving under a SOPInstanceUID already stored.

The same bytes again are always success without a second copy (a harmless resend); that
case never reaches :func:`resolve_conflict`.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from datetime import datetime
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from triage.db import Database
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
    db: Database,
    store_dir: Path,
    tmp_dir: Path,
    keep: Keep,
    source: str,
    now: datetime,
    warning: tuple[StoreStatus, str] | None = None,
) -> IngestOutcome:
    """A different instance under a known SOPInstanceUID, handled by ``policy``.

    Args:
        data: the new copy as received; ``ds`` its parsed header.
        existing_path: the stored copy's file.
        warning: a warning status and note the new copy carries (when it is stored).
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
        repoint_instance(
            db, sop_uid=sop_uid, path=dest, digest=digest, size=len(data), source=source, now=now
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
        f"different content under a stored SOPInstanceUID (policy {policy.value}): "
        "the first copy is kept, this one is in quarantine"
    )
    qid = keep(data, source=source, reason=reason, status=status, now=now)
    log.warning("instance from %s conflicts with a stored copy (quarantine #%s)", source, qid)
    return IngestOutcome(status, reason, sop_uid, study_uid, sop_class, True, qid)
