"""The viewer's document of a study (``GET /api/studies/{uid}/viewer``): the study, its
findings, each analysed series laid out for display with its window, presets and the
overlays on it; and what cannot be shown, with the reason.

The shape is the viewer API the page (``triage/serve/static/viewer.js``) is written against;
it is built here from the index (:mod:`triage.viewer.series`) and the overlays laid on the
source images (:mod:`triage.viewer.overlays`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from triage.viewer.overlays import MappedOverlay
from triage.viewer.series import FindingRecord, SeriesLayout, StudyIndex

__all__ = [
    "CLASS_COLOURS",
    "CT_PRESETS",
    "FALLBACK_COLOURS",
    "SeriesEntry",
    "build_manifest",
    "class_colour",
]

CT_PRESETS: Final[tuple[tuple[str, float, float], ...]] = (
    ("brain", 40.0, 80.0),
    ("subdural", 75.0, 215.0),
    ("stroke", 40.0, 40.0),
    ("bone", 600.0, 2800.0),
)
"""Head-CT windows (name, center, width) in HU."""

CLASS_COLOURS: Final[dict[str, str]] = {
    "iph": "#ff3b3b",  # intraparenchymal haemorrhage: red
    "eah": "#ffa41b",  # extra-axial haemorrhage: orange
    "oedema": "#2de0b0",  # perilesional oedema: green-cyan
    "edema": "#2de0b0",
    "ivh": "#e04dff",  # intraventricular haemorrhage: magenta
}
"""Colours of known classes, by lower-case name: saturated and bright, apart in hue, so that
each reads on any grey of a window."""

FALLBACK_COLOURS: Final[tuple[str, ...]] = (
    "#ffe61a",  # yellow
    "#3d8bff",  # blue
    "#9cff3d",  # lime
    "#ff7ab6",  # pink
    "#1ae5ff",  # cyan
    "#a67cff",  # violet
)
"""Colours of other classes, by label value (1 → the first)."""


def class_colour(name: str, value: int) -> str:
    """The class's colour: its own (``CLASS_COLOURS``), else one by its label value."""
    known = CLASS_COLOURS.get(name.strip().lower())
    return known or FALLBACK_COLOURS[(value - 1) % len(FALLBACK_COLOURS)]


def _number(value: float) -> int | float:
    """A whole number as an int (40, not 40.0), others as they are."""
    return int(value) if float(value).is_integer() else float(value)


@dataclass(frozen=True)
class SeriesEntry:
    """A displayed series and the overlays shown on it (finding, overlay), in the findings'
    order."""

    layout: SeriesLayout
    overlays: Sequence[tuple[FindingRecord, MappedOverlay]] = field(default=())


def _overlay_json(finding: FindingRecord, mapped: MappedOverlay) -> dict[str, Any]:
    return {
        "finding": finding.finding,
        "kind": mapped.kind,
        "model": {"name": finding.model_name, "version": finding.model_version},
        "classes": [
            {
                "value": c.value,
                "name": c.name,
                "color": class_colour(c.name, c.value),
                "voxels": c.voxels,
                "best_index": c.best_index,
            }
            for c in mapped.classes
        ],
        "best_index": mapped.best_index,
    }


def _series_json(entry: SeriesEntry) -> dict[str, Any]:
    layout = entry.layout
    center, width = layout.window
    return {
        "SeriesInstanceUID": layout.SeriesInstanceUID,
        "Modality": layout.Modality,
        "SeriesDescription": layout.SeriesDescription,
        "kind": layout.kind,
        "rows": layout.rows,
        "columns": layout.columns,
        "pixel_spacing": None if layout.pixel_spacing is None else list(layout.pixel_spacing),
        "photometric": layout.photometric,
        "pixel_type": layout.pixel_type,
        "window": {"center": _number(center), "width": _number(width)},
        "presets": (
            [{"name": name, "center": _number(c), "width": _number(w)} for name, c, w in CT_PRESETS]
            if layout.kind == "volume"
            else []
        ),
        "slices": [
            {
                "index": s.index,
                "SOPInstanceUID": s.SOPInstanceUID,
                "InstanceNumber": s.InstanceNumber,
                "frame": s.frame or 0,
                "position": None if s.position is None else list(s.position),
            }
            for s in layout.slices
        ],
        "overlays": [_overlay_json(f, m) for f, m in entry.overlays],
    }


def build_manifest(
    study: StudyIndex,
    series: Sequence[SeriesEntry],
    *,
    series_unavailable: Sequence[tuple[str, str]] = (),
    overlays_unavailable: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The viewer document.

    Args:
        study: the study's index rows.
        series: the analysed series that can be shown, in order, with their overlays.
        series_unavailable: (SeriesInstanceUID, reason) of analysed series that cannot.
        overlays_unavailable: (finding, reason) of overlays that cannot be shown.
    """
    return {
        "StudyInstanceUID": study.StudyInstanceUID,
        "StudyDescription": study.StudyDescription,
        "PatientName": study.PatientName,
        "PatientID": study.PatientID,
        "AccessionNumber": study.AccessionNumber,
        "read_state": study.read_state,
        "claimed_by": study.claimed_by,
        "findings": [dict(f.payload) for f in study.findings],
        "acknowledged": list(study.acknowledged),
        "series": [_series_json(entry) for entry in series],
        "series_unavailable": [
            {"SeriesInstanceUID": uid, "reason": reason} for uid, reason in series_unavailable
        ],
        "overlays_unavailable": [
            {"finding": finding, "reason": reason} for finding, reason in overlays_unavailable
        ],
    }
