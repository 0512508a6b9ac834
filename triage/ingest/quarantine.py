"""Quarantine: input that is not stored is kept, under a name made from its sha256, with a
database record (reason, DICOM status, source, time, size, hash) for an administrator."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from triage.db import Database
from triage.db.tables import QuarantineRow
from triage.ingest.files import write_durably
from triage.ingest.outcome import StoreStatus

log = logging.getLogger(__name__)


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
