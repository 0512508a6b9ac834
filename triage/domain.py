"""Plain domain types shared by every layer.

This module imports nothing from the rest of ``triage`` (see docs/ARCHITECTURE.md).
Fields that mirror DICOM attributes keep DICOM keyword spelling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class AIStatus(enum.StrEnum):
    """Where a study stands with the AI."""

    pending = "pending"
    ok = "ok"
    no_applicable_model = "no_applicable_model"
    incomplete_series = "incomplete_series"
    partial = "partial"  # some models gave findings, at least one failed
    failed = "failed"


class SeriesState(enum.StrEnum):
    """Where a series stands in assembly: instances still arriving, or quiet long enough."""

    receiving = "receiving"
    complete = "complete"


class ReadState(enum.StrEnum):
    """Where a study stands with the readers (multi-reader claims)."""

    unread = "unread"
    claimed = "claimed"
    completed = "completed"


class JobState(enum.StrEnum):
    """An analysis job in the database queue."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class WebhookState(enum.StrEnum):
    """Delivery of one event to the webhook (None in the table: not for the webhook)."""

    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class FeedbackVerdict(enum.StrEnum):
    """A reader's judgement of an AI finding."""

    agree = "agree"
    disagree = "disagree"
    missed = "missed"
    """A finding the AI did not flag, with the slice where the reader sees it."""


class ExportState(enum.StrEnum):
    """Sending one DICOM result to one destination (a PACS): waiting (first try or a retry),
    stored there, or given up after the last attempt."""

    pending = "pending"
    sent = "sent"
    failed = "failed"


class DicomResultKind(enum.StrEnum):
    """What a DICOM result object is: a Segmentation, a TID 1500 measurement report, or a
    Secondary Capture of a radiograph with the model's saliency map on it."""

    seg = "seg"
    sr = "sr"
    sc = "sc"


class Severity(enum.StrEnum):
    """How severe a flagged finding is, where its model can tell (orders critical studies)."""

    high = "high"
    standard = "standard"


SEVERITY_RANK: dict[str | None, int] = {Severity.high.value: 0, Severity.standard.value: 1}
"""Sort rank of a severity (lower first); a finding without one ranks with ``standard``."""


@dataclass(frozen=True)
class ModelRef:
    """Which model, version and weight files produced a finding.

    Attributes:
        name: the model's name.
        version: its version.
        weights_sha256: SHA-256 of each weight file used (ensemble members in run order).
    """

    name: str
    version: str
    weights_sha256: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "weights_sha256": list(self.weights_sha256),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRef:
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            weights_sha256=tuple(str(h) for h in data.get("weights_sha256") or ()),
        )


@dataclass(frozen=True)
class Finding:
    """A study-level AI finding.

    Attributes:
        finding: the finding code.
        flag: True when the finding is considered present (raises priority).
        score: confidence in [0, 1].
        volumes_ml: lesion volume per class in millilitres (segmentation models).
        model: the model that produced it.
        max_probability: highest voxel probability per class, in [0, 1].
        details: extra model-specific facts (threshold used, members, timing).
        severity: ``high`` or ``standard`` where the model grades it (see
            :class:`Severity`), None otherwise.
    """

    finding: str
    flag: bool
    score: float
    volumes_ml: dict[str, float]
    model: ModelRef
    max_probability: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    severity: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "flag": self.flag,
            "score": self.score,
            "volumes_ml": dict(self.volumes_ml),
            "max_probability": dict(self.max_probability),
            "model": self.model.to_json(),
            "details": dict(self.details),
            "severity": self.severity,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Finding:
        return cls(
            finding=data["finding"],
            flag=bool(data["flag"]),
            score=float(data["score"]),
            volumes_ml={k: float(v) for k, v in data["volumes_ml"].items()},
            model=ModelRef.from_json(data["model"]),
            max_probability={k: float(v) for k, v in data.get("max_probability", {}).items()},
            details=dict(data.get("details", {})),
            severity=data.get("severity"),
        )


# Words in CurrentPatientLocation / department / requesting service naming an emergency
# department or an inpatient stay, in the spellings senders use.
_EMERGENCY_WORDS = ("ED", "ER", "EMERG", "A&E", "AE", "NOTAUFNAHME", "URGENCE", "URGENCIAS")
_INPATIENT_WORDS = ("ICU", "ITU", "WARD", "INPATIENT", "STATION", "IPS", "HDU", "CCU")


def location_class(text: str | None) -> str | None:
    """``emergency``, ``inpatient`` or None (outpatient or not said) from free text."""
    if not text:
        return None
    tokens = {
        t for t in "".join(c if c.isalnum() or c == "&" else " " for c in text.upper()).split()
    }
    if any(t.startswith(w) if len(w) > 3 else t == w for t in tokens for w in _EMERGENCY_WORDS):
        return "emergency"
    if any(t.startswith(w) if len(w) > 3 else t == w for t in tokens for w in _INPATIENT_WORDS):
        return "inpatient"
    return None
