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
    failed = "failed"


class FindingCode(enum.StrEnum):
    """Study-level findings the models can raise."""

    intracranial_haemorrhage = "intracranial_haemorrhage"


class ReasonCode(enum.StrEnum):
    """Why a worklist item sits where it is."""

    arrival = "arrival"
    priority_stat = "order:stat"
    priority_urgent = "order:urgent"
    ai_intracranial_haemorrhage = "ai:intracranial_haemorrhage"


# Lesion classes of the haemorrhage model, in output-index order after background.
HAEMORRHAGE_CLASSES: tuple[str, ...] = ("IPH", "EAH", "oedema", "IVH")
# The classes that count as blood for the study-level flag (oedema does not).
BLOOD_CLASSES: tuple[str, ...] = ("IPH", "EAH", "IVH")


@dataclass(frozen=True)
class ModelRef:
    """Which model (and version) produced a finding."""

    name: str
    version: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class Finding:
    """A study-level AI finding.

    Attributes:
        finding: the finding code.
        flag: True when the finding is considered present (raises priority).
        score: confidence in [0, 1].
        volumes_ml: lesion volume per class in millilitres.
        max_probability: highest voxel probability per class, in [0, 1].
        model: the model that produced it.
        details: extra model-specific facts (threshold used, members, timing).
    """

    finding: str
    flag: bool
    score: float
    volumes_ml: dict[str, float]
    model: ModelRef
    max_probability: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "flag": self.flag,
            "score": self.score,
            "volumes_ml": dict(self.volumes_ml),
            "max_probability": dict(self.max_probability),
            "model": self.model.to_json(),
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Finding:
        return cls(
            finding=data["finding"],
            flag=bool(data["flag"]),
            score=float(data["score"]),
            volumes_ml={k: float(v) for k, v in data["volumes_ml"].items()},
            model=ModelRef(**data["model"]),
            max_probability={k: float(v) for k, v in data.get("max_probability", {}).items()},
            details=dict(data.get("details", {})),
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
