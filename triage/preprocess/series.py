"""What a series is, told from its DICOM headers, and declarative rules that choose one.

A model's spec carries a :class:`SeriesRule` (modality, image type, orientation, slice
thickness, coverage, preferred and avoided reconstruction kernels, regular expressions on
attributes in the style of MONAI Deploy's series selector). :func:`select_series` applies
it to every series of a study and returns the choice and, for every series, why it was or
was not chosen. Pixels are never read here.

Reasons name attributes and values of the acquisition (kernel, thickness, orientation),
never patient data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from triage.preprocess.views import view_position

__all__ = [
    "SeriesInfo",
    "SeriesRule",
    "SeriesSelection",
    "SeriesVerdict",
    "read_series_info",
    "select_series",
    "series_info_from_headers",
]

AXIS_TOLERANCE_DEG = 32.0
"""A slice normal this close to an axis names the orientation (above: "oblique")."""

_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_ENHANCED_CT = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")


@dataclass(frozen=True)
class SeriesInfo:
    """Facts about one series, from the headers of its files.

    Attributes:
        SeriesInstanceUID: the series.
        Modality: DICOM Modality (upper case), "" when absent.
        sop_classes: the SOP classes of its instances.
        n_instances: number of files.
        n_frames: number of images (frames of multi-frame objects counted).
        image_type: ImageType values (upper case) of the first image.
        kernel: ConvolutionKernel (upper case, values joined by "/"), "" when absent.
        slice_thickness_mm: SliceThickness, or the median spacing of the slice positions.
        orientation: "axial", "coronal", "sagittal" or "oblique" from ImageOrientationPatient
            (the slice normal within ``AXIS_TOLERANCE_DEG`` of an axis: a gantry tilt of up to
            30 degrees is still axial, and the CT loader corrects it), None when unknown.
        coverage_mm: extent of the slice positions along the slice normal plus one slice,
            None for a single image or when positions are missing.
        field_of_view_mm: ReconstructionDiameter, else PixelSpacing x Columns.
        contrast: ContrastBolusAgent is given.
        attributes: text attributes for routing and rules (descriptions, body part, view,
            laterality, SeriesNumber, AnatomicRegionSequence codes as "scheme:code").
    """

    SeriesInstanceUID: str
    Modality: str
    sop_classes: tuple[str, ...]
    n_instances: int
    n_frames: int
    image_type: tuple[str, ...] = ()
    kernel: str = ""
    slice_thickness_mm: float | None = None
    orientation: str | None = None
    coverage_mm: float | None = None
    field_of_view_mm: float | None = None
    contrast: bool = False
    attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def is_secondary_capture(self) -> bool:
        return all(c.startswith(_SECONDARY_CAPTURE_PREFIX) for c in self.sop_classes) and bool(
            self.sop_classes
        )

    def attr(self, keyword: str) -> str:
        return self.attributes.get(keyword, "")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["attributes"] = dict(self.attributes)
        return doc


def _floats(value: Any) -> list[float] | None:
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _first_number(value: Any) -> float | None:
    try:
        number = float(value[0] if isinstance(value, (list, tuple)) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _orientation(iop: list[float] | None) -> tuple[str | None, np.ndarray | None]:
    if iop is None or len(iop) != 6:
        return None, None
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None, None
    normal /= norm
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < math.cos(math.radians(AXIS_TOLERANCE_DEG)):
        return "oblique", normal
    return ("sagittal", "coronal", "axial")[axis], normal


def _frame_geometry(ds: Dataset) -> tuple[list[float] | None, list[list[float]]]:
    """ImageOrientationPatient and the positions of every frame of an enhanced object."""
    iop: list[float] | None = None
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        orient = shared[0].get("PlaneOrientationSequence")
        if orient:
            iop = _floats(orient[0].get("ImageOrientationPatient"))
    positions: list[list[float]] = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []) or []:
        if iop is None and frame.get("PlaneOrientationSequence"):
            iop = _floats(frame.PlaneOrientationSequence[0].get("ImageOrientationPatient"))
        plane = frame.get("PlanePositionSequence")
        if plane:
            pos = _floats(plane[0].get("ImagePositionPatient"))
            if pos is not None and len(pos) == 3:
                positions.append(pos)
    return iop, positions


# ContrastBolusAgent values that say "no contrast" (scanners fill the attribute with them).
_NO_CONTRAST = {
    "",
    "NONE",
    "NO",
    "N",
    "NA",
    "N/A",
    "NIL",
    "0",
    "-",
    "NATIVE",
    "NATIV",
    "KEIN",
    "KEINE",
    "SANS",
    "SIN",
    "NON",
    "WITHOUT",
    "W/O",
    "WO",
    "PLAIN",
    "UNENHANCED",
}


def _names_contrast(value: str) -> bool:
    """True when ContrastBolusAgent names an agent (not empty, not a "none" word)."""
    text = value.strip().upper()
    return text not in _NO_CONTRAST and not text.startswith(("NO ", "NONE", "WITHOUT "))


def _region_codes(ds: Dataset) -> str:
    codes: list[str] = []
    for item in ds.get("AnatomicRegionSequence", []) or []:
        scheme = str(item.get("CodingSchemeDesignator", "")).strip().upper()
        code = str(item.get("CodeValue", "")).strip()
        if code:
            codes.append(f"{scheme}:{code}")
    return " ".join(codes)


def series_info_from_headers(headers: Sequence[Dataset]) -> SeriesInfo:
    """Summarise the headers of one series (pixel data need not be loaded)."""
    if not headers:
        raise ValueError("a series needs at least one file")
    first = headers[0]
    text = {
        k: str(first.get(k, "") or "").strip()
        for k in (
            "BodyPartExamined",
            "StudyDescription",
            "SeriesDescription",
            "ProtocolName",
            "RequestedProcedureDescription",
            "SeriesNumber",
        )
    }
    # ViewPosition, else the view code or description words (radiographs without the
    # attribute): the normalised view, "" when unknown.
    text["ViewPosition"] = view_position(first) or ""
    text["Laterality"] = str(first.get("ImageLaterality", "") or first.get("Laterality", ""))
    text["AnatomicRegionCodes"] = _region_codes(first)
    image_type = tuple(str(v).strip().upper() for v in (first.get("ImageType") or []))
    kernel_value = first.get("ConvolutionKernel")
    if isinstance(kernel_value, MultiValue):
        kernel = "/".join(str(v) for v in kernel_value)
    else:
        kernel = str(kernel_value or "")
    iop = _floats(first.get("ImageOrientationPatient"))
    positions: list[list[float]] = []
    n_frames = 0
    for ds in headers:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        n_frames += frames
        if str(ds.get("SOPClassUID", "")) in _ENHANCED_CT or ds.get(
            "PerFrameFunctionalGroupsSequence"
        ):
            frame_iop, frame_positions = _frame_geometry(ds)
            iop = iop or frame_iop
            positions.extend(frame_positions)
            continue
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            continue
        pos = _floats(ds.get("ImagePositionPatient"))
        if pos is not None and len(pos) == 3:
            positions.append(pos)
    orientation, normal = _orientation(iop)
    coverage: float | None = None
    thickness = _first_number(first.get("SliceThickness"))
    if normal is not None and len(positions) >= 2:
        along = np.sort(np.array(positions) @ normal)
        steps = np.diff(along)
        steps = steps[steps > 1e-3]
        spacing = float(np.median(steps)) if steps.size else None
        coverage = float(along[-1] - along[0]) + (spacing or thickness or 0.0)
        thickness = thickness or spacing
    fov = _first_number(first.get("ReconstructionDiameter"))
    if fov is None:
        spacing_xy = _floats(first.get("PixelSpacing"))
        columns = first.get("Columns")
        if spacing_xy and columns and spacing_xy[-1] > 0:
            fov = spacing_xy[-1] * int(columns)
    return SeriesInfo(
        SeriesInstanceUID=str(first.get("SeriesInstanceUID", "")),
        Modality=str(first.get("Modality", "") or "").strip().upper(),
        sop_classes=tuple(sorted({str(ds.get("SOPClassUID", "")) for ds in headers})),
        n_instances=len(headers),
        n_frames=n_frames,
        image_type=image_type,
        kernel=kernel.strip().upper(),
        slice_thickness_mm=thickness,
        orientation=orientation,
        coverage_mm=None if coverage is None else round(coverage, 1),
        field_of_view_mm=None if fov is None else round(fov, 1),
        contrast=_names_contrast(str(first.get("ContrastBolusAgent", "") or "")),
        attributes=text,
    )


def read_series_info(paths: Iterable[Path]) -> SeriesInfo:
    """Read the headers (not the pixels) of a series' files and summarise them.

    Files that cannot be read as DICOM are skipped; a series with none raises ValueError.
    """
    headers: list[Dataset] = []
    for path in paths:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, KeyError, EOFError):
            continue
    if not headers:
        raise ValueError("no readable DICOM file in the series")
    return series_info_from_headers(headers)


@dataclass(frozen=True)
class SeriesRule:
    """Which series a model can read, and which it prefers (all fields optional).

    Hard conditions (a series failing one is not eligible): ``modalities``,
    ``require_image_type`` (all present), ``exclude_image_type`` (none present),
    ``orientations``, ``slice_thickness_mm`` (inclusive range), ``min_coverage_mm``,
    ``min_images``, ``exclude_contrast``, ``exclude_secondary_capture``, ``conditions``
    (attribute keyword -> regular expression that must match, case-insensitive, as in
    MONAI Deploy's series selector) and ``exclude_words`` in the series description,
    protocol name or kernel.

    Preferences, in this order, rank the eligible series: a kernel or description naming a
    ``prefer_kernels`` word, not naming an ``avoid_kernels`` word, slice thickness closest
    to ``prefer_thickness_mm``, then the most images.
    """

    modalities: tuple[str, ...] = ()
    require_image_type: tuple[str, ...] = ()
    exclude_image_type: tuple[str, ...] = ("LOCALIZER",)
    orientations: tuple[str, ...] = ()
    slice_thickness_mm: tuple[float, float] | None = None
    min_coverage_mm: float | None = None
    min_images: int = 1
    exclude_contrast: bool = False
    exclude_secondary_capture: bool = True
    conditions: Mapping[str, str] = field(default_factory=dict)
    exclude_words: tuple[str, ...] = ()
    prefer_kernels: tuple[str, ...] = ()
    avoid_kernels: tuple[str, ...] = ()
    prefer_thickness_mm: float | None = None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["conditions"] = dict(self.conditions)
        return doc

    def problems(self, info: SeriesInfo) -> list[str]:
        """Why the series cannot be used (empty: eligible)."""
        return [text for _kind, text in self.checks(info)]

    def checks(self, info: SeriesInfo) -> list[tuple[str, str]]:
        """(kind, why) for each failed condition; kind is ``"coverage"`` when the series is
        too short (too few images or too little coverage), else ``"rule"``."""
        out = _Problems()
        if self.modalities and info.Modality not in self.modalities:
            out.append(f"modality {info.Modality or 'missing'}, needs {'/'.join(self.modalities)}")
        if self.exclude_secondary_capture and info.is_secondary_capture:
            out.append("secondary capture (a screenshot, not an acquisition)")
        missing = [t for t in self.require_image_type if t not in info.image_type]
        if missing and info.image_type:
            have, need = "\\".join(info.image_type), "\\".join(missing)
            out.append(f"image type {have} is not {need}")
        excluded = [t for t in self.exclude_image_type if t in info.image_type]
        if excluded:
            out.append(f"image type {'/'.join(excluded)}")
        if self.orientations and info.orientation not in self.orientations:
            out.append(
                f"{info.orientation or 'unknown'} orientation, needs {'/'.join(self.orientations)}"
            )
        lo_hi = self.slice_thickness_mm
        thickness = info.slice_thickness_mm
        if lo_hi is not None and (thickness is None or not lo_hi[0] <= thickness <= lo_hi[1]):
            shown = "unknown" if thickness is None else f"{thickness:g} mm"
            out.append(f"slice thickness {shown}, needs {lo_hi[0]:g}-{lo_hi[1]:g} mm")
        if self.min_coverage_mm is not None and (
            info.coverage_mm is None or info.coverage_mm < self.min_coverage_mm
        ):
            shown = "unknown" if info.coverage_mm is None else f"{info.coverage_mm:g} mm"
            out.coverage(f"covers {shown}, needs at least {self.min_coverage_mm:g} mm")
        if info.n_frames < self.min_images:
            out.coverage(f"{info.n_frames} image(s), needs at least {self.min_images}")
        if self.exclude_contrast and info.contrast:
            out.append("contrast-enhanced (ContrastBolusAgent is set)")
        for keyword, pattern in self.conditions.items():
            if not re.search(pattern, info.attr(keyword), flags=re.IGNORECASE):
                out.append(f"{keyword} does not match {pattern!r}")
        words = _words(info.attr("SeriesDescription"), info.attr("ProtocolName"), info.kernel)
        hits = [w for w in self.exclude_words if _has_word(words, w)]
        if hits:
            out.append(f"description or kernel says {'/'.join(hits)}")
        return out.items

    def preference(self, info: SeriesInfo) -> tuple[int, int, float, int]:
        """A sort key: larger is better."""
        words = _words(info.kernel, info.attr("SeriesDescription"), info.attr("ProtocolName"))
        preferred = int(any(_has_word(words, w) for w in self.prefer_kernels))
        avoided = int(any(_has_word(words, w) for w in self.avoid_kernels))
        closeness = 0.0
        if self.prefer_thickness_mm is not None and info.slice_thickness_mm is not None:
            closeness = -abs(info.slice_thickness_mm - self.prefer_thickness_mm)
        return preferred, -avoided, round(closeness, 3), info.n_frames

    def describe(self, info: SeriesInfo) -> str:
        """Why an eligible series is good, in a few words."""
        parts = [info.orientation or "", info.Modality]
        if info.slice_thickness_mm is not None:
            parts.append(f"{info.slice_thickness_mm:g} mm")
        if info.kernel:
            parts.append(f"kernel {info.kernel}")
        parts.append(f"{info.n_frames} images")
        if info.coverage_mm is not None:
            parts.append(f"{info.coverage_mm:g} mm coverage")
        words = _words(info.kernel, info.attr("SeriesDescription"), info.attr("ProtocolName"))
        if any(_has_word(words, w) for w in self.avoid_kernels):
            parts.append("(a sharp/bone reconstruction: no soft-tissue one was eligible)")
        return " ".join(p for p in parts if p)


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def append(self, text: str) -> None:
        self.items.append(("rule", text))

    def coverage(self, text: str) -> None:
        self.items.append(("coverage", text))


def _words(*texts: str) -> set[str]:
    joined = " ".join(texts).upper()
    tokens = set(re.split(r"[^A-Z0-9]+", joined)) - {""}
    return tokens | {joined}


def _has_word(words: set[str], word: str) -> bool:
    """A whole token equal to ``word``, or a token starting with it when it ends in '*'."""
    w = word.upper()
    if w.endswith("*"):
        return any(t.startswith(w[:-1]) for t in words)
    return w in words


@dataclass(frozen=True)
class SeriesVerdict:
    """One series judged by one rule."""

    SeriesInstanceUID: str
    eligible: bool
    reasons: tuple[str, ...]
    too_short: bool = False
    """Not eligible only because it has too few images or covers too little."""

    def to_json(self) -> dict[str, Any]:
        return {
            "SeriesInstanceUID": self.SeriesInstanceUID,
            "eligible": self.eligible,
            "reasons": list(self.reasons),
            "too_short": self.too_short,
        }


@dataclass(frozen=True)
class SeriesSelection:
    """The chosen series (or None) and a verdict for every series."""

    chosen: SeriesInfo | None
    reason: str
    verdicts: tuple[SeriesVerdict, ...]

    @property
    def incomplete(self) -> bool:
        """Nothing chosen, and some series would do but for its coverage."""
        return self.chosen is None and any(v.too_short for v in self.verdicts)

    def to_json(self) -> dict[str, Any]:
        return {
            "SeriesInstanceUID": None if self.chosen is None else self.chosen.SeriesInstanceUID,
            "reason": self.reason,
            "series": [v.to_json() for v in self.verdicts],
        }


def select_series(rule: SeriesRule, series: Sequence[SeriesInfo]) -> SeriesSelection:
    """Apply ``rule`` to every series; choose the most preferred eligible one."""
    verdicts: list[SeriesVerdict] = []
    eligible: list[SeriesInfo] = []
    for info in series:
        checks = rule.checks(info)
        if checks:
            too_short = all(kind == "coverage" for kind, _ in checks)
            texts = tuple(text for _, text in checks)
            verdicts.append(SeriesVerdict(info.SeriesInstanceUID, False, texts, too_short))
        else:
            eligible.append(info)
    if not eligible:
        short = [v for v in verdicts if v.too_short]
        if short:
            reason = f"incomplete series: {'; '.join(short[0].reasons)}"
        else:
            reason = "no series meets the model's series rules"
        return SeriesSelection(None, reason, tuple(verdicts))
    ranked = sorted(eligible, key=rule.preference, reverse=True)
    chosen = ranked[0]
    for info in eligible:
        if info is chosen:
            why = f"chosen: {rule.describe(info)}"
        else:
            why = f"eligible, less preferred than the chosen series ({rule.describe(info)})"
        verdicts.append(SeriesVerdict(info.SeriesInstanceUID, True, (why,)))
    order = {info.SeriesInstanceUID: i for i, info in enumerate(series)}
    verdicts.sort(key=lambda v: order.get(v.SeriesInstanceUID, 0))
    reason = f"{rule.describe(chosen)}; {len(eligible)} of {len(series)} series eligible"
    return SeriesSelection(chosen, reason, tuple(verdicts))
