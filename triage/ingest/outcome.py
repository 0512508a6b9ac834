"""What a sender is told about one instance: the DICOM status and a reason."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
