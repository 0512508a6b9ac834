"""Routing: which model reads which series of a study, and why.

Each model declares what it accepts (:class:`Acceptance`: modalities, body regions,
views and a :class:`~triage.preprocess.series.SeriesRule`). :func:`route_study` tells each
series' body region from its DICOM attributes, in this order of trust:

1. AnatomicRegionSequence codes (SNOMED CT),
2. BodyPartExamined (PS3.16 Annex L defined terms, then as free text),
3. free text of SeriesDescription, ProtocolName, StudyDescription and
   RequestedProcedureDescription, in the spellings and languages senders use ("CT HEAD W/O",
   "CT KOPF NATIV", "CCT", "SCHÄDEL", "CRÂNE", "CRÁNEO", "HOOFD", ...),
4. for CT with nothing said: a reconstruction field of view of at most 260 mm fits only a
   head (a body CT uses 350-500 mm),

and then, per model, picks the series with the model's rule. A model with no eligible series
is skipped with the reason; a study no model takes gets ``no_applicable_model``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from triage.preprocess.series import SeriesInfo, SeriesRule, SeriesSelection, select_series

__all__ = [
    "HEAD_MAX_FOV_MM",
    "Acceptance",
    "ModelRoute",
    "RoutingDecision",
    "body_regions",
    "regions_from_text",
    "route_study",
]

HEAD_MAX_FOV_MM = 260.0

# SNOMED CT codes of AnatomicRegionSequence (CID 4031 and common neighbours).
_SNOMED_REGIONS: dict[str, str] = {
    "69536005": "HEAD",  # head
    "12738006": "HEAD",  # brain
    "89546000": "HEAD",  # skull
    "774007": "HEAD",  # head and neck
    "51185008": "CHEST",  # thorax
    "43799004": "CHEST",  # chest
    "39607008": "CHEST",  # lung
    "818983003": "ABDOMEN",
    "113345001": "ABDOMEN",
    "12921003": "PELVIS",
    "816092008": "PELVIS",
    "45048000": "NECK",
    "421060004": "SPINE",
    "122494005": "SPINE",  # cervical spine
    "122495006": "SPINE",  # thoracic spine
    "122496007": "SPINE",  # lumbar spine
}

# BodyPartExamined defined terms (PS3.16 Annex L) and the regions they name.
_BODY_PART_TERMS: dict[str, tuple[str, ...]] = {
    "HEAD": ("HEAD",),
    "BRAIN": ("HEAD",),
    "SKULL": ("HEAD",),
    "HEADNECK": ("HEAD", "NECK"),
    "IAC": ("HEAD",),
    "SELLA": ("HEAD",),
    "ORBIT": ("HEAD",),
    "CHEST": ("CHEST",),
    "THORAX": ("CHEST",),
    "LUNG": ("CHEST",),
    "CHESTABDOMEN": ("CHEST", "ABDOMEN"),
    "CHESTABDPELVIS": ("CHEST", "ABDOMEN", "PELVIS"),
    "ABDOMEN": ("ABDOMEN",),
    "ABDOMENPELVIS": ("ABDOMEN", "PELVIS"),
    "PELVIS": ("PELVIS",),
    "NECK": ("NECK",),
    "CSPINE": ("SPINE",),
    "TSPINE": ("SPINE",),
    "LSPINE": ("SPINE",),
    "SPINE": ("SPINE",),
    "WHOLEBODY": ("HEAD", "CHEST", "ABDOMEN", "PELVIS"),
    "EXTREMITY": ("EXTREMITY",),
    "HAND": ("EXTREMITY",),
    "FOOT": ("EXTREMITY",),
    "KNEE": ("EXTREMITY",),
    "SHOULDER": ("EXTREMITY",),
    "ELBOW": ("EXTREMITY",),
    "WRIST": ("EXTREMITY",),
    "ANKLE": ("EXTREMITY",),
    "HIP": ("EXTREMITY",),
    "BREAST": ("BREAST",),
    "HEART": ("CHEST",),
}

# Free-text words, accents removed, upper case. "X*" matches words starting with X.
_REGION_WORDS: dict[str, tuple[str, ...]] = {
    "HEAD": (
        "HEAD",
        "BRAIN",
        "SKULL",
        "CRANI*",  # cranial, cranium, craniale, cranio (it)
        "CEREB*",  # cerebral, cerebrum, cerebro (es)
        "CCT",  # German "craniale CT"
        "NCCT",
        "KOPF*",
        "SCHADEL*",  # Schädel
        "SCHAEDEL*",
        "HIRN*",
        "GEHIRN",
        "CRANE",  # fr crâne
        "TETE",  # fr tête
        "CERVEAU",
        "ENCEPHAL*",
        "ENCEFAL*",
        "CRANEO",  # es cráneo
        "CABEZA",
        "CRANIO",  # it, pt crânio
        "TESTA",
        "CABECA",  # pt cabeça
        "HOOFD",  # nl
        "SCHEDEL",
        "HERSENEN",
        "HJARNA",  # sv hjärna
        "SKALLE",
        "HOVED",  # da/no
        "NEURO",
        "STROKE",
    ),
    "CHEST": (
        "CHEST",
        "THORAX",
        "THORACIC",
        "TORAX",
        "TORACE",
        "LUNG*",
        "PULMO*",
        "POUMON*",
        "POITRINE",
        "BRUST*",
        "CXR",
        "PECHO",
        "BORST",
        "THORAKS",
    ),
    "ABDOMEN": ("ABD*", "ABDOMEN", "BAUCH", "LIVER", "LEBER", "ADDOME", "VENTRE"),
    "PELVIS": ("PELVI*", "BECKEN", "BASSIN", "PELVIC"),
    "NECK": ("NECK", "HALS", "CERVICAL", "COU", "CUELLO", "COLLO"),
    "SPINE": ("SPINE", "SPINAL", "WIRBELSAULE", "RACHIS", "COLUMNA", "LWS", "BWS", "HWS"),
    "EXTREMITY": (
        "KNEE",
        "HAND",
        "FOOT",
        "ANKLE",
        "WRIST",
        "ELBOW",
        "SHOULDER",
        "HIP",
        "FEMUR",
        "KNIE",
        "FUSS",
    ),
}
_TEXT_KEYWORDS = (
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    "RequestedProcedureDescription",
)


def _normalise(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_text = "".join(c for c in decomposed if not unicodedata.combining(c))
    return ascii_text.replace("ß", "SS").upper()


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^A-Z0-9]+", _normalise(text)) if t]


def _word_regions(text: str) -> list[str]:
    found: list[str] = []
    tokens = _tokens(text)
    for region, words in _REGION_WORDS.items():
        for word in words:
            if word.endswith("*"):
                hit = any(t.startswith(word[:-1]) for t in tokens)
            else:
                hit = word in tokens
            if hit:
                found.append(region)
                break
    return found


def regions_from_text(body_part: str, *texts: str) -> tuple[str, ...]:
    """Body regions named by a BodyPartExamined value and free texts (no FOV fallback)."""
    term = _normalise(body_part).replace(" ", "")
    if term in _BODY_PART_TERMS:
        return _BODY_PART_TERMS[term]
    for text in (body_part, *texts):
        regions = _word_regions(text)
        if regions:
            return tuple(regions)
    return ()


def body_regions(info: SeriesInfo) -> tuple[tuple[str, ...], str]:
    """The body regions a series shows, and how that was told (no patient data)."""
    codes = [c.split(":", 1)[-1] for c in info.attr("AnatomicRegionCodes").split()]
    coded = sorted({_SNOMED_REGIONS[c] for c in codes if c in _SNOMED_REGIONS})
    if coded:
        return tuple(coded), "anatomic region code"
    body_part = _normalise(info.attr("BodyPartExamined")).replace(" ", "")
    if body_part in _BODY_PART_TERMS:
        return _BODY_PART_TERMS[body_part], f"BodyPartExamined {body_part}"
    if body_part:
        regions = _word_regions(info.attr("BodyPartExamined"))
        if regions:
            return tuple(regions), "BodyPartExamined (free text)"
    for keyword in _TEXT_KEYWORDS:
        regions = _word_regions(info.attr(keyword))
        if regions:
            return tuple(regions), f"{keyword} (free text)"
    if (
        info.Modality == "CT"
        and info.field_of_view_mm is not None
        and info.field_of_view_mm <= HEAD_MAX_FOV_MM
    ):
        fov = f"{info.field_of_view_mm:.0f}"
        return ("HEAD",), f"nothing names the body part; a {fov} mm field of view fits only a head"
    return (), "nothing names the body part"


class Acceptance(Protocol):
    """What a model reads, as the router needs it (a model spec's ``accepts`` provides it:
    ``triage.models.spec.ModelAcceptance``; this package does not import the models)."""

    @property
    def modalities(self) -> tuple[str, ...]: ...

    @property
    def body_regions(self) -> tuple[str, ...]: ...

    @property
    def views(self) -> tuple[str, ...]: ...

    @property
    def series_rule(self) -> SeriesRule: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class ModelRoute:
    """One model's decision for a study: the series it runs on (or None) and why."""

    model: str
    series: SeriesInfo | None
    reason: str
    selection: SeriesSelection | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "run": self.series is not None,
            "SeriesInstanceUID": None if self.series is None else self.series.SeriesInstanceUID,
            "reason": self.reason,
            "incomplete": bool(self.selection and self.selection.incomplete),
            "series": [] if self.selection is None else self.selection.to_json()["series"],
        }


@dataclass(frozen=True)
class RoutingDecision:
    """Every model's decision for one study, and each series' body regions."""

    routes: tuple[ModelRoute, ...]
    regions: dict[str, dict[str, Any]]
    modalities: tuple[str, ...]

    @property
    def runs(self) -> tuple[ModelRoute, ...]:
        return tuple(r for r in self.routes if r.series is not None)

    @property
    def incomplete(self) -> tuple[ModelRoute, ...]:
        """Models that would read this study but for a series that is too short."""
        return tuple(
            r for r in self.routes if r.series is None and r.selection and r.selection.incomplete
        )

    @property
    def reason(self) -> str:
        if self.runs:
            return "; ".join(f"{r.model}: {r.reason}" for r in self.runs)
        return "; ".join(f"{r.model}: {r.reason}" for r in self.routes) or "no model installed"

    def to_json(self) -> dict[str, Any]:
        """The document kept on the study and shown by the API (``routing``)."""
        first = self.runs[0] if self.runs else None
        return {
            "model": None if first is None else first.model,
            "SeriesInstanceUID": None
            if first is None or first.series is None
            else first.series.SeriesInstanceUID,
            "reason": self.reason,
            "modalities": list(self.modalities),
            "models": [r.to_json() for r in self.routes],
            "series_regions": self.regions,
        }


def _view(info: SeriesInfo) -> str:
    return _normalise(info.attr("ViewPosition")).strip()


def route_study(
    series: Sequence[SeriesInfo], models: Sequence[tuple[str, Acceptance]]
) -> RoutingDecision:
    """Decide, for each model, the series it runs on.

    Args:
        series: the study's series.
        models: (model name, what it accepts) for every installed model.
    """
    regions = {info.SeriesInstanceUID: body_regions(info) for info in series}
    modalities = tuple(sorted({info.Modality for info in series} - {""}))
    routes: list[ModelRoute] = []
    for name, accepts in models:
        candidates: list[SeriesInfo] = []
        outside: list[str] = []
        for info in series:
            found, _how = regions[info.SeriesInstanceUID]
            if info.Modality not in accepts.modalities:
                continue
            if not set(found) & set(accepts.body_regions):
                outside.append("/".join(found) or "unknown")
                continue
            if accepts.views and _view(info) not in accepts.views:
                outside.append(f"view {_view(info) or 'unknown'}")
                continue
            candidates.append(info)
        if not candidates:
            if outside:
                reason = (
                    f"reads {accepts.describe()}; this study's "
                    f"{'/'.join(accepts.modalities)} series show {', '.join(sorted(set(outside)))}"
                )
            else:
                reason = (
                    f"reads {accepts.describe()}; the study has "
                    f"{'/'.join(modalities) or 'no'} images"
                )
            routes.append(ModelRoute(name, None, reason))
            continue
        selection = select_series(accepts.series_rule, candidates)
        if selection.chosen is None:
            routes.append(ModelRoute(name, None, selection.reason, selection))
            continue
        region_how = regions[selection.chosen.SeriesInstanceUID][1]
        reason = f"{selection.reason} (region from {region_how})"
        routes.append(ModelRoute(name, selection.chosen, reason, selection))
    region_doc = {
        uid: {"regions": list(found), "from": how} for uid, (found, how) in regions.items()
    }
    return RoutingDecision(tuple(routes), region_doc, modalities)
